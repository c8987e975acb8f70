"""The cluster client of one step run: the dynamic client, discovery, and the calls the steps make.

The official client is imported when a step connects (:func:`client_library`), never when a
pipelines file is loaded or planned. It blocks, so every call runs in a worker thread (through
:class:`shipyard.sdk.BlockingCalls`), with an explicit connect and read timeout and no silent
retries (urllib3 would retry a GET three times).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Any
from typing import Final
from typing import TypeVar
from typing import final

from shipyard.sdk import StepFailed

from ._config import discovery_cache
from ._config import kubeconfig
from ._config import load_config
from ._config import remove_tree
from ._errors import call_error
from ._errors import connect_error

if TYPE_CHECKING:
    import asyncio

    from shipyard.sdk import BlockingCalls

    from ._render import Obj

_T = TypeVar("_T")

#: The field manager of every server-side apply.
FIELD_MANAGER: Final = "shipyard"


def client_library() -> Any:
    """The ``kubernetes`` package, with the parts the steps use imported.

    :raises StepFailed: when it is not installed, saying how to install it.
    """
    # Any: the kubernetes client is an optional dependency without type information.
    try:
        import kubernetes  # the official client, never this package: imports are absolute
        import kubernetes.client
        import kubernetes.config
        import kubernetes.dynamic
    except ImportError:
        raise StepFailed(
            "the kubernetes steps need the official Kubernetes client for Python, which is not "
            "installed; install it with: pip install 'shipyard[kubernetes]'"
        ) from None
    return kubernetes


@final
class Cluster:
    """One API client for one step run; blocking calls run in worker threads.

    :ivar namespace: the kubeconfig context's namespace (``default`` when it names none).
    :ivar where: how to name the cluster in messages (server, context and kubeconfig).
    """

    def __init__(
        self,
        api: Any,
        dyn: Any,
        *,
        server: str,
        where: str,
        namespace: str,
        request_timeout: tuple[float, float],
        cleanup: str | None,
    ) -> None:
        # Imported here: the module that holds it imports asyncio, which `plan` must not.
        from shipyard.sdk import BlockingCalls

        # Any: kubernetes.client.ApiClient and kubernetes.dynamic.DynamicClient, imported lazily.
        self.api = api
        self.dyn = dyn
        self.server = server
        self.where = where
        self.namespace = namespace
        self.request_timeout = request_timeout
        self._cleanup = cleanup
        self._calls: BlockingCalls = BlockingCalls()
        self._resources: dict[tuple[str, str], Any] = {}

    @classmethod
    async def connect(cls, context: str | None, request_timeout: tuple[float, float]) -> Cluster:
        """Read the kubeconfig (or the in-cluster config) and discover the API.

        :raises StepFailed: with one sentence saying what was looked for and what to do.
        """
        import asyncio

        k8s = client_library()
        config_file, source = kubeconfig()
        if config_file is None and context is not None:
            raise StepFailed(
                f"context {context!r} was asked for, but there is no kubeconfig (only {source}); "
                "set KUBECONFIG to a kubeconfig that has this context"
            )

        def build() -> Cluster:
            return cls._build(k8s, config_file, source, context, request_timeout)

        fut = asyncio.ensure_future(asyncio.to_thread(build))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(_close_when_built)
            raise

    @classmethod
    def _build(
        cls,
        k8s: Any,
        config_file: str | None,
        source: str,
        context: str | None,
        request_timeout: tuple[float, float],
    ) -> Cluster:
        """Configure the client and discover the API (blocking)."""
        cfg = k8s.client.Configuration()
        where, namespace = load_config(k8s, cfg, config_file, source, context)
        # A dead server must not hide behind urllib3's silent retries (3 per GET).
        cfg.retries = 0
        api = k8s.client.ApiClient(cfg)
        _enforce_timeouts(api, request_timeout)
        cache_file, cleanup = discovery_cache(cfg.host)
        where = f"{cfg.host} ({where})"
        try:
            dyn = k8s.dynamic.DynamicClient(api, cache_file=cache_file)
        except BaseException as exc:
            api.close()
            remove_tree(cleanup)
            if isinstance(exc, Exception):
                raise connect_error(exc, where, request_timeout) from None
            raise
        return cls(
            api, dyn, server=cfg.host, where=where, namespace=namespace,
            request_timeout=request_timeout, cleanup=cleanup,
        )  # fmt: skip

    # -- calls ------------------------------------------------------------------------------------

    async def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` in a worker thread (see :class:`shipyard.sdk.BlockingCalls`).

        If the caller is cancelled, the call still finishes in its thread (within the request
        timeout); :meth:`settle` waits for it, so a Job created at that moment is not missed.
        """
        return await self._calls.call(fn, *args, **kwargs)

    async def settle(self) -> None:
        """Wait for calls still running in threads after a cancellation."""
        await self._calls.settle(sum(self.request_timeout) + 1)

    def resource(self, api_version: str, kind: str) -> Any:
        """The dynamic client's resource for a kind (discovery, cached; blocking)."""
        key = (api_version, kind)
        found = self._resources.get(key)
        if found is None:
            found = self._resources[key] = self.dyn.resources.get(
                api_version=api_version, kind=kind
            )
        return found

    def rediscover(self) -> None:
        """Discover the API again (blocking): a CustomResourceDefinition just added a kind."""
        self.dyn.resources.invalidate_cache()

    def known_resource(self, api_version: str, kind: str) -> Any:
        """A resource :meth:`resource` found already, else None (no request)."""
        return self._resources.get((api_version, kind))

    def request(self, method: str, path: str, **params: Any) -> Any:
        """One raw request (blocking): the urllib3 response, unread."""
        params.setdefault("_request_timeout", self.request_timeout)
        return self.dyn.request(method, path, serialize=False, **params)

    def read(self, resource: Any, name: str, namespace: str | None) -> Obj:
        """GET one object as a dict (blocking)."""
        resp = resource.get(
            name=name, namespace=namespace, serialize=False, _request_timeout=self.request_timeout
        )
        return dict(_body_of(resp))

    def read_or_none(self, resource: Any, name: str, namespace: str | None) -> Obj | None:
        """:meth:`read`, or None when there is no such object (blocking)."""
        try:
            return self.read(resource, name, namespace)
        except self.errors.NotFoundError:
            return None

    def list(self, resource: Any, namespace: str | None, selector: str) -> list[Obj]:
        """LIST objects as dicts (blocking)."""
        resp = resource.get(
            namespace=namespace, label_selector=selector or None, serialize=False,
            _request_timeout=self.request_timeout,
        )  # fmt: skip
        return list(_body_of(resp).get("items") or [])

    def apply(
        self, resource: Any, body: Obj, namespace: str | None, force: bool
    ) -> tuple[int, Obj]:
        """Server-side apply ``body`` as :data:`FIELD_MANAGER` (blocking): (HTTP status, object)."""
        resp = resource.server_side_apply(
            body=body, name=body["metadata"]["name"], namespace=namespace,
            field_manager=FIELD_MANAGER, force_conflicts=True if force else None,
            serialize=False, _request_timeout=self.request_timeout,
        )  # fmt: skip
        return int(resp.status), _body_of(resp)

    def create(self, resource: Any, body: Obj, namespace: str | None) -> Obj:
        """POST a new object (blocking)."""
        resp = resource.create(
            body=body, namespace=namespace, serialize=False, _request_timeout=self.request_timeout
        )
        return _body_of(resp)

    def delete(self, resource: Any, name: str, namespace: str | None) -> None:
        """DELETE an object and, in the background, what it owns (blocking)."""
        resp = resource.delete(
            name=name, namespace=namespace, propagation_policy="Background", serialize=False,
            _request_timeout=self.request_timeout,
        )  # fmt: skip
        _body_of(resp)

    @property
    def errors(self) -> Any:
        """``kubernetes.dynamic.exceptions``: ``NotFoundError``, ``DynamicApiError``, ..."""
        # Any: kubernetes.dynamic.exceptions, imported lazily.
        from kubernetes.dynamic import exceptions

        return exceptions

    def close(self) -> None:
        """Close the client, once calls still running in threads (after a cancel) are done."""
        pending = self._calls.pending
        if not pending:
            self._close_now()
            return

        def finished(fut: asyncio.Future[Any]) -> None:
            pending.discard(fut)
            if not pending:
                self._close_now()

        for fut in list(pending):
            fut.add_done_callback(finished)

    def _close_now(self) -> None:
        try:
            self.api.close()
        except Exception:
            pass
        remove_tree(self._cleanup)

    # -- errors -----------------------------------------------------------------------------------

    def explain(self, exc: BaseException, doing: str, conflict: str = "") -> StepFailed:
        """A :class:`StepFailed` for an error met while ``doing`` something (a verb phrase).

        :param conflict: what to do about a 409 Conflict.
        """
        return call_error(exc, self.where, self.request_timeout[1], doing, conflict)


def _close_when_built(fut: asyncio.Future[Cluster]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()


def _body_of(resp: Any) -> Obj:
    """The JSON body of a raw response, read to the end so its connection goes back to the pool.

    (A response left unread would keep its socket until garbage collection.)
    """
    import json

    try:
        data = resp.data
    finally:
        resp.release_conn()
    body = json.loads(data) if data else {}
    return body if isinstance(body, dict) else {}


def _enforce_timeouts(api: Any, timeout: tuple[float, float]) -> None:
    """Give every request of ``api`` a (connect, read) timeout, also the client's own.

    The dynamic client's discovery requests pass none, and without one a server that accepts
    the connection and never answers would hang the step until its deadline.
    """
    rest = api.rest_client
    original = rest.request

    def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("_request_timeout"):
            kwargs["_request_timeout"] = timeout
        return original(method, url, *args, **kwargs)

    rest.request = request


# Reprs, tracebacks and pickles name the package, as before it was split into modules.
Cluster.__module__ = "shipyard.plugins.kubernetes"
