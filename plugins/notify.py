"""Built-in notification sinks: ``console``, ``jsonl`` (a JSON-lines file) and ``webhook``.

A sink is any object with ``send(payload: dict) -> None``, a ``name`` and a ``timeout`` (seconds
the deployment may wait for it at the end), and optionally ``open(resolve)`` (called in the
sink's thread before the first event, with a function that resolves secret placeholders) and
``close()``. Sinks run in their own thread; an exception is logged and recorded, never fatal
(see ``shipyard._notify``). Use them as ``@pipeline(notify=[sy.webhook(url), sy.jsonl(path)])``
or ``shipyard deploy --notify URL`` (``--notify jsonl:PATH``, ``--notify console:``).

The payload
-----------

Every sink receives the same JSON object per event (``Event.to_dict()``), secrets masked. The
webhook POSTs exactly that object as the request body. Keys present in every event::

    event        "deployment_started" | "stage_started" | "step_started" | "step_finished"
                 | "stage_finished" | "deployment_finished" | "rollback_started"
                 | "deployment_suspended" | "approval_decided" | "approval_expired"
                 | "approval_reminder" | "analysis_started" | "analysis_finished"
                 | "canary_step_reached"
    ts           when the event happened, ISO 8601 UTC ("2024-05-01T12:00:00.123456Z")
    deployment   {"id": 42, "pipeline": "webapp", "version": "1.4.2",
                  "environment": "production", "rollback_of": null | <id>}

and per event:

=====================  ============================================================================
deployment_started     ``status`` ("running"), ``stages`` (names)
stage_started          ``stage``, ``stage_index`` (0-based), ``stages_total``, ``status`` ("running")
step_started           ``stage``, ``step``, ``kind``, ``status`` ("running")
step_finished          ``stage``, ``step``, ``kind``, ``status``, ``attempts``, ``exit_code``,
                       ``error``, ``warning``, ``started_at``, ``finished_at``
stage_finished         ``stage``, ``stage_index``, ``status``
deployment_finished    ``status`` ("succeeded", "failed", "cancelled"), ``error`` (null or text),
                       ``started_at``, ``finished_at``
rollback_started       ``target_version``, ``reason``
deployment_suspended   ``status`` ("awaiting_approval"), ``stage``, ``stage_index``,
                       ``requested_at``, ``expires_at``, ``gate`` (approvers, required, timeout,
                       ...), ``commands`` (``approve``, ``reject``: the commands to decide it)
approval_decided       ``stage``, ``decision`` ("approve", "reject", "cancel", "supersede"),
                       ``user``, ``comment``, ``choice``, ``outcome`` ("resume", "recorded",
                       "rejected", "cancelled", "superseded"), ``approvals``, ``required``,
                       ``source``; ``commands`` while more approvals are needed
approval_expired       ``stage``, ``expires_at``, ``outcome`` ("approved", "rejected")
approval_reminder      ``status`` ("awaiting_approval"), ``stage``, ``requested_at``,
                       ``expires_at``, ``approvals``, ``required``, ``commands``
analysis_started       ``stage``, ``stage_index``, ``step``, ``metrics`` (per metric: ``metric``,
                       ``provider``, ``description``, ``conditions``, ``count``, ``interval``,
                       ``dry_run``)
analysis_finished      ``stage``, ``stage_index``, ``step``, ``verdict`` ("successful", "failed",
                       "inconclusive", "error", or null when stopped), ``outcome`` ("continue",
                       "fail", "wait for approval", "stopped"), ``summary``, ``metrics`` (per
                       metric: ``metric``, ``verdict``, ``counts``, ``dry_run``)
canary_step_reached    ``stage``, ``step``, ``service``, ``percent`` (the new version's share),
                       ``new``, ``old`` (container names), ``weights`` (by host port)
=====================  ============================================================================

Single measurements are no event: they go to the step's log and the history only.

A deployment resumed after an approval sends ``deployment_started`` again with ``"resumed":
true``. The approval events are sent by the process that decided (``approve``, ``reject``,
``cancel``, ``deploy --supersede``) or applied the timeout and the reminders (``expire``), to
the sinks of the pipeline and of ``[tool.shipyard] notify``.

New keys may be added; none is removed or renamed.

The webhook request
-------------------

``POST <url>`` with ``Content-Type: application/json`` and:

``X-Shipyard-Event``
    the event name, as in the payload.
``X-Shipyard-Delivery``
    a UUID per event, the same on every retry of it (receivers can drop duplicates).
``X-Shipyard-Sequence``
    1, 2, 3, ... per deployment and sink: events of one deployment are sent one at a time, in
    order; a receiver that sees a gap knows an event was lost.
``X-Shipyard-Signature-256``
    with ``secret=``: ``sha256=<hex>``, the HMAC-SHA256 of the exact body bytes keyed with the
    secret (like GitHub's ``X-Hub-Signature-256``). Check it with :func:`verify_signature`.

Any 2xx answer is a delivery. Connection errors, timeouts, 408, 425, 429 and 5xx are retried
with exponential backoff and jitter (``retries`` times, never beyond the sink's ``timeout``);
other answers (a 4xx, a redirect) fail at once. A refused connection (nothing listens) is not
retried, and until an event gets through again each later event gets a single attempt: a dead
receiver costs a deployment a refused connection per event, not retries. A failed event is logged, recorded in the
deployment's history, and the next event is still sent. ``deploy --notify URL`` signs with the
environment variable ``SHIPYARD_WEBHOOK_SECRET`` when it is set.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import ClassVar

from shipyard.sdk import PipelineDefinitionError
from shipyard.sdk import hookimpl

if TYPE_CHECKING:
    import httpx
    from shipyard.sdk import NotifierRegistry


class ConsoleNotifier:
    """One line per event on standard error."""

    name = "console"
    timeout = 2.0

    def send(self, payload: dict[str, Any]) -> None:
        d = payload["deployment"]
        what = payload["event"]
        subject = payload.get("step") or payload.get("stage") or ""
        status = payload.get("status") or ""
        if "decision" in payload:  # approval_decided
            status = f"{payload['decision']} by {payload['user']}: {payload['outcome']}"
        elif what == "approval_expired":
            status = f"expired: {payload['outcome']}"
        elif what == "analysis_finished":
            status = f"{payload['verdict'] or 'stopped'}: {payload['outcome']}"
        elif what == "canary_step_reached":
            status = f"{payload['percent']}% on {payload['new']}"
        elif payload.get("resumed"):
            status = "resumed"
        print(
            f"[notify] {what} {d['pipeline']} {d['version']} -> {d['environment']} "
            f"#{d['id']} {subject} {status}".rstrip(),
            file=sys.stderr,
        )


class JsonLinesNotifier:
    """Appends one JSON object per event to ``path`` (created 0600)."""

    timeout = 5.0

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = f"jsonl:{self.path}"
        self._lock = threading.Lock()

    def send(self, payload: dict[str, Any]) -> None:
        line = json.dumps(payload, sort_keys=True) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


def console() -> ConsoleNotifier:
    """A sink that prints one line per event to standard error."""
    return ConsoleNotifier()


def jsonl(path: str | os.PathLike[str]) -> JsonLinesNotifier:
    """A sink that appends each event as one JSON line to ``path``."""
    return JsonLinesNotifier(path)


# -- webhook --------------------------------------------------------------------------------------

#: Event names a sink can receive (``events=`` of :func:`webhook`).
EVENTS = frozenset(
    {
        "deployment_started",
        "deployment_finished",
        "stage_started",
        "stage_finished",
        "step_started",
        "step_finished",
        "rollback_started",
    }
)
#: The signature header, like GitHub's ``X-Hub-Signature-256``.
SIGNATURE_HEADER = "X-Shipyard-Signature-256"
_PLACEHOLDER_START = "{{shipyard.secret:"
_RETRY_STATUSES = frozenset({408, 425, 429})


class WebhookError(Exception):
    """A webhook could not deliver an event (message masked)."""


def signature(secret: str | bytes, body: bytes) -> str:
    """The ``X-Shipyard-Signature-256`` value of ``body``: ``sha256=<hex HMAC-SHA256>``."""
    import hashlib
    import hmac

    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is the signature of ``body`` with ``secret`` (constant-time).

    For receivers: pass the raw request body, before any JSON parsing.
    """
    import hmac

    return header is not None and hmac.compare_digest(signature(secret, body), header)


@dataclass
class _Delivery:
    """One worker thread's connection to a webhook: resolved values and an HTTP client."""

    client: httpx.Client
    url: str
    headers: dict[str, str]
    key: bytes | None
    seq: int = 0
    #: The last attempt found nothing listening: later events get one attempt each, no retry,
    #: until one gets through (a dead receiver costs the deployment nothing but that attempt).
    refusing: bool = False


# Per-thread deliveries keyed by sink id: one sink object may serve several deployments at once,
# each from its own dispatcher thread. (Not an attribute: ``names_in`` walks sinks' attributes.)
_local = threading.local()


def _deliveries() -> dict[int, _Delivery]:
    d: dict[int, _Delivery] | None = getattr(_local, "deliveries", None)
    if d is None:
        d = _local.deliveries = {}
    return d


def _problem(message: str) -> PipelineDefinitionError:
    return PipelineDefinitionError(message)


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


class WebhookNotifier:
    """POSTs each event as one JSON object to ``url``; see the module docstring for the format.

    Subclasses change the body by overriding :meth:`render` (``contrib/slack.py`` does).

    :param url: the receiver; may contain secrets (``f"https://x/hook?t={sy.secret('T')}"``).
    :param secret: sign each body with HMAC-SHA256 in ``X-Shipyard-Signature-256``; use
        ``sy.secret(NAME)`` to read it from the environment when the deployment runs.
    :param headers: extra request headers; values may contain secrets.
    :param events: send only these events (names as in the payload's ``event``).
    :param timeout: the most the deployment waits for this sink at its end, and the most one
        event's retries may take (seconds).
    :param request_timeout: the timeout of one request (seconds; default: ``timeout``).
    :param retries: extra attempts per event after a connection error, timeout, 408, 425, 429
        or 5xx, with exponential backoff from ``backoff`` seconds, with jitter.
    :param verify: verify TLS (default), ``False``, or the path of a CA bundle.
    :param name: how the sink is named in warnings and the history.
    """

    #: What ``name`` starts with.
    kind: ClassVar[str] = "webhook"
    #: The events sent when ``events`` is not given (None: all).
    default_events: ClassVar[frozenset[str] | None] = None

    def __init__(
        self,
        url: str,
        secret: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        events: Iterable[str] | None = None,
        timeout: float = 2.0,
        request_timeout: float | None = None,
        retries: int = 3,
        backoff: float = 0.5,
        verify: Any = True,
        name: str | None = None,
    ) -> None:
        what = f"{self.kind}(...)"
        if not isinstance(url, str) or not (
            url.startswith(("http://", "https://", _PLACEHOLDER_START))
        ):
            raise _problem(f"{what}: url must be an http:// or https:// URL, got {_shown(url)!r}")
        if secret is not None and (not isinstance(secret, str) or not secret):
            raise _problem(f"{what}: secret must be a non-empty string or sy.secret(NAME)")
        if headers is not None and (
            not isinstance(headers, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
        ):
            raise _problem(f"{what}: headers must map strings to strings")
        if events is not None:
            if isinstance(events, str):
                events = [events]
            chosen = frozenset(e.removeprefix("shipyard_") for e in events)
            unknown = sorted(chosen - EVENTS)
            if unknown or not chosen:
                raise _problem(
                    f"{what}: unknown event {unknown[0] if unknown else None!r}; "
                    f"events are {', '.join(sorted(EVENTS))}"
                )
        else:
            chosen = self.default_events or EVENTS
        if request_timeout is None:
            request_timeout = timeout
        for label, value in (
            ("timeout", timeout),
            ("request_timeout", request_timeout),
            ("backoff", backoff),
        ):
            if not _positive(value):
                raise _problem(
                    f"{what}: {label} must be a positive number of seconds, got {value!r}"
                )
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise _problem(f"{what}: retries must be a whole number >= 0, got {retries!r}")
        self.url = url
        self.secret = secret
        self.headers = dict(headers or {})
        self.events = chosen
        #: Seconds the deployment waits for this sink at its end; also the most one event's
        #: retries may take.
        self.timeout = float(timeout)
        self.request_timeout = float(request_timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.verify = verify
        self.name = name or f"{self.kind}:{self.shown_url()}"

    def shown_url(self) -> str:
        """The URL fit to show: secrets masked, no password, no query."""
        return _shown(self.url)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # -- the sink protocol ------------------------------------------------------------------------

    def open(self, resolve: Callable[[Any], Any]) -> None:
        """Resolve the URL, headers and secret and open a connection pool for this thread."""
        import httpx
        from shipyard import __version__
        from shipyard.sdk import register_secrets as register
        from shipyard.sdk import ssl_verify

        self.close()
        url = str(resolve(self.url))
        if _PLACEHOLDER_START in url or not url.startswith(("http://", "https://")):
            raise WebhookError(
                f"the URL {self.shown_url()!r} is not an http(s) URL once its secrets are resolved"
            )
        key: bytes | None = None
        if self.secret is not None:
            value = str(resolve(self.secret))
            if _PLACEHOLDER_START in value:
                raise WebhookError("the signing secret is not resolved; is the deployment running?")
            register([value])  # also a plain-text secret stays out of every output
            key = value.encode()
        headers = {str(k): str(v) for k, v in resolve(dict(self.headers)).items()}
        client = httpx.Client(
            timeout=self.request_timeout,
            follow_redirects=False,
            verify=ssl_verify(self.verify, url),
            headers={"User-Agent": f"shipyard/{__version__}"},
        )
        _deliveries()[id(self)] = _Delivery(client, url, headers, key)

    def close(self) -> None:
        delivery = _deliveries().pop(id(self), None)
        if delivery is not None:
            delivery.client.close()

    def render(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The JSON body for ``payload``, or None to send nothing."""
        return payload

    def send(self, payload: dict[str, Any]) -> None:
        event = str(payload.get("event", ""))
        if event not in self.events:
            return
        body_obj = self.render(payload)
        if body_obj is None:
            return
        delivery = _deliveries().get(id(self))
        if delivery is None:
            self.open(lambda value: value)
            delivery = _deliveries()[id(self)]
        body = json.dumps(body_obj, sort_keys=True, separators=(",", ":")).encode()
        delivery.seq += 1
        import uuid

        headers = {
            **delivery.headers,
            "Content-Type": "application/json",
            "X-Shipyard-Event": event,
            "X-Shipyard-Delivery": str(uuid.uuid4()),
            "X-Shipyard-Sequence": str(delivery.seq),
        }
        if delivery.key is not None:
            headers[SIGNATURE_HEADER] = signature(delivery.key, body)
        self._deliver(delivery, body, headers)

    def _deliver(self, delivery: _Delivery, body: bytes, headers: dict[str, str]) -> None:
        import httpx
        import tenacity
        from shipyard.sdk import body_excerpt
        from shipyard.sdk import classify_error
        from shipyard.sdk import mask

        start = time.monotonic()
        attempts = 0

        def post() -> None:
            nonlocal attempts
            attempts += 1
            try:
                response = delivery.client.post(delivery.url, content=body, headers=headers)
            except (httpx.HTTPError, OSError) as exc:
                label, error, _hint = classify_error(exc, delivery.url, self.request_timeout)
                if label == "connection refused":  # nobody listens: retrying cannot help now
                    delivery.refusing = True
                    raise _Final(error) from exc
                raise _Retryable(error) from exc
            delivery.refusing = False
            status = response.status_code
            if 200 <= status < 300:
                return
            excerpt = body_excerpt(response.content)
            text = f"HTTP {status} {response.reason_phrase}".rstrip()
            if 300 <= status < 400 and response.headers.get("location"):
                text += f", redirect to {response.headers['location']} (not followed)"
            if excerpt:
                text += f": {excerpt!r}"
            if status >= 500 or status in _RETRY_STATUSES:
                raise _Retryable(text)
            raise _Final(text)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(1 if delivery.refusing else self.retries + 1)
            | tenacity.stop_after_delay(self.timeout),
            # (wait_exponential_jitter renamed its arguments in tenacity 9; these exist in 8.2+)
            wait=tenacity.wait_exponential(multiplier=self.backoff, max=self.backoff * 8)
            + tenacity.wait_random(0, self.backoff / 2),
            retry=tenacity.retry_if_exception_type(_Retryable),
            reraise=True,
        )
        try:
            retrying(post)
        except (_Retryable, _Final) as exc:
            took = time.monotonic() - start
            raise WebhookError(
                mask(
                    f"POST {self.shown_url()} failed after {attempts} attempt"
                    f"{'s' if attempts != 1 else ''} in {took:.1f}s: {exc}"
                )
            ) from None


class _Retryable(Exception):
    pass


class _Final(Exception):
    pass


def _shown(url: Any) -> str:
    """``url`` with secrets masked and without password or query (tokens often live there)."""
    from shipyard.sdk import mask

    text = mask(str(url))
    from urllib.parse import urlsplit
    from urllib.parse import urlunsplit

    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    netloc = parts.netloc
    if parts.password:
        netloc = f"{parts.username}:***@{netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


#: ``shipyard.webhook(url, secret=None, ...)``: a sink that POSTs each event as JSON to ``url``.
webhook = WebhookNotifier


def _webhook_from_cli(url: str) -> WebhookNotifier:
    """``deploy --notify URL``: signed with ``SHIPYARD_WEBHOOK_SECRET`` when it is set."""
    from shipyard.sdk import Secret

    secret = (
        Secret("SHIPYARD_WEBHOOK_SECRET") if os.environ.get("SHIPYARD_WEBHOOK_SECRET") else None
    )
    return WebhookNotifier(url, secret)


@hookimpl
def shipyard_register_notifiers(registry: NotifierRegistry) -> None:
    registry.add("console", lambda _value: ConsoleNotifier())
    registry.add("jsonl", jsonl)
    registry.add("webhook", _webhook_from_cli)
