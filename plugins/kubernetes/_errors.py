"""The client's errors in plain words: one :class:`~shipyard.sdk.StepFailed` sentence each.

Each message says what was being done, what the server (or the network) answered, and what to
do about it. The client library and urllib3 are imported only once there is an error to explain.
"""

from __future__ import annotations

import re
from typing import Any

from shipyard.sdk import StepFailed

from ._options import short

_NAMESPACE_MISSING = re.compile(r'namespaces "([^"]+)" not found')


def http_detail(exc: Any) -> tuple[int, str, str]:
    """``(status, reason, message)`` of an API error, from its ``Status`` body when there is one."""
    import json

    status = int(getattr(exc, "status", 0) or 0)
    reason = str(getattr(exc, "reason", "") or "")
    message = ""
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str) and body:
        try:
            doc = json.loads(body)
        except ValueError:
            message = " ".join(body.split())[:300]
        else:
            if isinstance(doc, dict):
                message = str(doc.get("message") or "")
                reason = str(doc.get("reason") or reason)
    # One line: a multi-conflict answer lists the fields on lines of their own.
    return status, reason, " ".join((message or reason).split())


def connection_problem(exc: BaseException, read_timeout: float) -> str:
    """A short reason for a failed connection, from urllib3's nested exceptions."""
    import urllib3.exceptions as ue

    reason: BaseException = exc
    if isinstance(exc, ue.MaxRetryError) and exc.reason is not None:
        reason = exc.reason
    text = str(reason)
    low = text.lower()
    if isinstance(reason, ue.NewConnectionError):
        if "refused" in low:
            return "connection refused"
        if (
            "name or service not known" in low
            or "nodename nor servname" in low
            or ("name resolution" in low)
        ):
            return "unknown host name"
        return short(text.split("]", 1)[-1].strip() or text, 160)
    if isinstance(reason, ue.ConnectTimeoutError):
        return "no connection within the connect timeout"
    if isinstance(reason, ue.ReadTimeoutError):
        return f"no answer within {read_timeout:g}s"
    if isinstance(reason, ue.SSLError):
        return "TLS error: " + short(text, 200)
    if isinstance(reason, ue.ProtocolError):
        return "the server closed the connection without answering"
    return short(" ".join(text.split()), 200) or type(reason).__name__


def call_error(
    exc: BaseException, where: str, read_timeout: float, doing: str, conflict: str = ""
) -> StepFailed:
    """A :class:`StepFailed` for an error met while ``doing`` something (a verb phrase).

    :param where: the cluster, as :attr:`Cluster.where` names it.
    :param read_timeout: the read timeout of one call, for a call that got no answer.
    :param conflict: what to do about a 409 Conflict.
    """
    import urllib3.exceptions as ue
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        status, reason, message = http_detail(exc)
        return _refused(status, reason, message, where, doing, conflict)
    if isinstance(exc, ue.HTTPError):
        return StepFailed(
            f"lost the Kubernetes API server at {where} while trying to {doing}: "
            f"{connection_problem(exc, read_timeout)}; check that the cluster is running and "
            "reachable from here (kubectl cluster-info)"
        )
    return StepFailed(f"could not {doing}: {type(exc).__name__}: {short(str(exc), 300)}")


def _refused(
    status: int, reason: str, message: str, where: str, doing: str, conflict: str
) -> StepFailed:
    """What an API error answer (or a status-0 one: no answer at all) means for ``doing``."""
    if status == 0:
        return StepFailed(
            f"cannot reach the Kubernetes API server at {where} to {doing}: "
            f"{short(' '.join(message.split()), 300)}; check the server address and "
            "certificate-authority data in the kubeconfig"
        )
    if status == 401:
        return StepFailed(
            f"the Kubernetes API server at {where} rejected the credentials "
            f"(401 Unauthorized) when asked to {doing}; log in again or renew the "
            "token in the kubeconfig"
        )
    if status == 403 and "because it is being terminated" in message:
        return StepFailed(
            f"cannot {doing}: its namespace is being deleted (Terminating: {message}); wait "
            "until it is gone and deploy again, or deploy to another namespace"
        )
    if status == 403:
        return StepFailed(
            f"not allowed to {doing} (403 Forbidden: {message}); ask a cluster admin "
            "for the RBAC permission, or use a kubeconfig context that has it"
        )
    missing = _NAMESPACE_MISSING.search(message) if status == 404 else None
    if missing:
        ns = missing.group(1)
        return StepFailed(
            f"cannot {doing}: namespace {ns!r} does not exist; create it "
            f"(kubectl create namespace {ns}) or add a Namespace document to the manifests"
        )
    if status == 409:
        return StepFailed(f"cannot {doing}: {message}; {conflict or 'try again'}")
    if status == 422:
        return StepFailed(
            f"the API server refused to {doing} because the object is invalid: "
            f"{message}; fix the manifest"
        )
    if status in (400, 404, 405, 415):
        return StepFailed(
            f"the API server refused to {doing} ({status} {reason}: {message}); check the manifest"
        )
    if status == 500 and message.startswith("failed to create typed patch object"):
        # Server-side apply could not merge the manifest: the manifest's doing, not the
        # cluster's health (trying again fails the same way).
        return StepFailed(
            f"cannot {doing}: the API server cannot merge it for server-side apply ({message}); "
            "fix the manifest: items of a keyed list (containers, env, ports...) must differ in "
            "their key, and servers before Kubernetes 1.21 need every port's protocol written "
            "out (protocol: TCP)"
        )
    return StepFailed(
        f"the Kubernetes API server at {where} could not {doing} ({status} "
        f"{reason}: {message}); try again later, or check the cluster's health"
    )


def connect_error(exc: Exception, where: str, timeout: tuple[float, float]) -> StepFailed:
    """An error met while discovering the API of the server ``where`` (URL and context)."""
    import urllib3.exceptions as ue
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        status, reason, message = http_detail(exc)
        if status == 401:
            return StepFailed(
                f"the Kubernetes API server at {where} rejected the credentials (401 "
                "Unauthorized); log in again or renew the token in the kubeconfig"
            )
        if status == 403:
            return StepFailed(
                f"not allowed to discover the Kubernetes API at {where} (403 Forbidden: "
                f"{message}); ask a cluster admin for the RBAC permission, or use another context"
            )
        if status == 0:
            return StepFailed(
                f"cannot reach the Kubernetes API server at {where}: {short(message, 300)}; "
                "check the server address and certificate-authority data in the kubeconfig"
            )
        return StepFailed(
            f"the Kubernetes API server at {where} answered {status} {reason} while being "
            f"discovered: {message}; check the cluster's health"
        )
    if isinstance(exc, ue.HTTPError):
        return StepFailed(
            f"cannot reach the Kubernetes API server at {where}: "
            f"{connection_problem(exc, timeout[1])}; check that the cluster is running and that "
            "the kubeconfig's server address is right (kubectl cluster-info)"
        )
    if isinstance(exc, ValueError) and "should start with https://" in str(exc):
        # The client's guess when the server closed the connection during discovery.
        return StepFailed(
            f"cannot reach the Kubernetes API server at {where}: the server closed the "
            "connection without answering; check that the cluster is running and that the "
            "kubeconfig's server address (http or https) is right"
        )
    return StepFailed(
        f"cannot discover the Kubernetes API at {where}: {type(exc).__name__}: "
        f"{short(str(exc), 300)}"
    )
