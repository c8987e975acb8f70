"""The Docker engine: where it is, one client per step run, and its errors in plain words.

The Docker SDK for Python is imported here, and only when a step runs (:func:`docker_sdk`), so
loading, listing or planning a pipelines file never needs it. asyncio is imported inside the
functions for the same reason: ``list`` and ``plan`` stay light.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any
from typing import Final
from typing import TypeVar
from typing import final

from shipyard.sdk import StepFailed

from ._labels import carries
from ._options import short

if TYPE_CHECKING:
    from shipyard.sdk import BlockingCalls
    from shipyard.sdk import StepContext

    from ._options import PullPolicy

_T = TypeVar("_T")

#: Where the SDK looks when ``DOCKER_HOST`` is not set.
DEFAULT_ENGINE: Final = "unix:///var/run/docker.sock"
#: Seconds one API call may take (not the container's run time: waiting for it has no limit).
API_TIMEOUT: Final = 60


def engine_address(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Where the Docker SDK will look for the engine, and why: ``(address, source)``."""
    env = os.environ if environ is None else environ
    host = env.get("DOCKER_HOST", "").strip()
    if host:
        return host, "from DOCKER_HOST"
    return DEFAULT_ENGINE, "the default socket; DOCKER_HOST is not set"


def engine_hostname(address: str) -> str:
    """The host a container with host networking answers on, seen from here.

    ``127.0.0.1`` for a local socket; the host part of ``tcp://`` and ``ssh://`` addresses.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    if parts.scheme in ("tcp", "ssh", "http", "https") and parts.hostname:
        return parts.hostname
    return "127.0.0.1"


def docker_sdk() -> Any:
    """The Docker SDK's top-level module, or a :class:`StepFailed` saying how to install it."""
    # Any: the SDK is an optional dependency without type information in every version.
    try:
        import docker  # the Docker SDK, never this package: imports are absolute
    except ImportError:
        raise StepFailed(
            "the docker steps need the Docker SDK for Python, which is not installed; "
            "install it with: pip install 'shipyard[docker]'"
        ) from None
    return docker


def cause(exc: BaseException) -> str:
    """Why a call to the engine failed, in a few words, from the SDK's nested exceptions."""
    text = str(exc)
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text += " " + str(cur)
        cur = cur.__cause__ or cur.__context__
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "no such file" in low or "filenotfounderror" in low:
        return "no socket there"
    if "permission denied" in low:
        return "permission denied (is your user in the docker group?)"
    if "timed out" in low or "timeout" in low:
        return "no answer in time"
    if "name or service not known" in low or "nodename nor servname" in low:
        return "unknown host name"
    if "certificate" in low or "ssl" in low or "tls" in low:
        return "TLS error: " + short(str(exc), 160)
    return short(" ".join(str(exc).split()), 200) or type(exc).__name__


def _unreachable(address: str, source: str, exc: BaseException) -> StepFailed:
    return StepFailed(
        f"cannot reach the Docker engine at {address} ({source}): {cause(exc)}; start the "
        "engine there, or set DOCKER_HOST to one that runs (unix:///path/to/docker.sock, "
        "ssh://user@host, or tcp://host:2376 with DOCKER_TLS_VERIFY=1 and DOCKER_CERT_PATH)"
    )


@final
class Engine:
    """One Docker client for one step run; blocking SDK calls run in worker threads."""

    def __init__(self, client: Any, address: str, source: str) -> None:
        # Imported here: the module that holds it imports asyncio, which `plan` must not.
        from shipyard.sdk import BlockingCalls

        # Any: docker.DockerClient, imported lazily.
        self.client = client
        #: The low-level API client: one HTTP request per call, nothing hidden.
        self.api = client.api
        self.address = address
        self.source = source
        self.errors: Any = docker_sdk().errors
        self._calls: BlockingCalls = BlockingCalls()

    @classmethod
    async def connect(cls, timeout: float = API_TIMEOUT) -> Engine:
        """Connect to the engine ``DOCKER_HOST`` names (or the default socket).

        :raises StepFailed: with one sentence saying where it looked and what to set.
        """
        import asyncio

        sdk = docker_sdk()
        address, source = engine_address()
        kwargs: dict[str, Any] = {"timeout": int(timeout)}
        if address.startswith("ssh://"):
            import importlib.util

            # Without paramiko, the SDK can still shell out to the system's ssh client.
            kwargs["use_ssh_client"] = importlib.util.find_spec("paramiko") is None

        def connect() -> Any:
            return sdk.from_env(**kwargs)  # asks the engine for its API version

        try:
            client = await asyncio.to_thread(connect)
        except sdk.errors.TLSParameterError as exc:
            raise StepFailed(
                f"cannot use the TLS settings for the Docker engine at {address} ({source}): "
                f"{exc}; check DOCKER_CERT_PATH and DOCKER_TLS_VERIFY"
            ) from None
        except Exception as exc:  # DockerException, requests' and paramiko's errors
            raise _unreachable(address, source, exc) from None
        return cls(client, address, source)

    async def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` in a worker thread (see :class:`shipyard.sdk.BlockingCalls`).

        If the caller is cancelled, the call still finishes in its thread; :meth:`settle` waits
        for it, so a container created at that moment is not missed by the clean-up.
        """
        return await self._calls.call(fn, *args, **kwargs)

    async def settle(self, timeout: float = API_TIMEOUT) -> None:
        """Wait for calls still running in threads after a cancellation."""
        await self._calls.settle(timeout)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass

    def explain(self, exc: BaseException, doing: str) -> StepFailed:
        """A :class:`StepFailed` for an SDK error met while ``doing`` something."""
        if isinstance(exc, self.errors.APIError):
            detail = exc.explanation or str(exc)
            return StepFailed(f"the Docker engine at {self.address} could not {doing}: {detail}")
        return StepFailed(
            f"lost the Docker engine at {self.address} ({self.source}) while trying to {doing}: "
            f"{cause(exc)}"
        )

    # -- images -----------------------------------------------------------------------------------

    async def pull(self, image: str, context: StepContext, why: str) -> None:
        """Pull ``image``; raise a :class:`StepFailed` naming it when that is impossible."""
        from docker.utils import parse_repository_tag

        repo, tag = parse_repository_tag(image)
        context.log(f"pulling {image} ({why})", "shipyard")

        def pull() -> str | None:
            last_error = None
            for item in self.api.pull(repo, tag=tag or "latest", stream=True, decode=True):
                if isinstance(item, dict) and item.get("error"):
                    last_error = str(item.get("error"))
            return last_error

        try:
            error = await self.call(pull)
        except self.errors.APIError as exc:
            error = exc.explanation or str(exc)
        except self.errors.DockerException as exc:
            error = cause(exc)
        except OSError as exc:
            error = cause(exc)
        if error:
            raise StepFailed(
                f"image {image!r} is not on the Docker engine at {self.address} and pulling it "
                f"failed ({why}): {short(' '.join(error.split()), 300)}; check the name and "
                "tag, that the engine can reach the registry (docker login for a private one), "
                "or build or load the image on the engine and use pull='never'"
            )
        context.log(f"pulled {image}", "shipyard")

    async def ensure_image(self, image: str, pull: PullPolicy, context: StepContext) -> None:
        """Make sure the engine has ``image`` (pulling as ``pull`` says) before anything stops."""
        if pull == "always":
            await self.pull(image, context, "pull='always'")
            return
        try:
            await self.call(self.api.inspect_image, image)
        except self.errors.ImageNotFound:
            if pull == "never":
                raise self._missing(image) from None
            await self.pull(image, context, "not on the engine, pull='missing'")

    def _missing(self, image: str) -> StepFailed:
        return StepFailed(
            f"image {image!r} is not on the Docker engine at {self.address} and pull='never'; "
            "build or load it there (docker build, docker load) or allow pulling with "
            "pull='missing'"
        )

    async def create(
        self, image: str, pull: PullPolicy, context: StepContext, **kwargs: Any
    ) -> str:
        """Create a container of ``image``, pulling as ``pull`` says; return its id."""
        if pull == "always":
            await self.pull(image, context, "pull='always'")
        try:
            return str((await self.call(self.api.create_container, image, **kwargs))["Id"])
        except self.errors.ImageNotFound:
            if pull == "never":
                raise self._missing(image) from None
            if pull == "always":
                raise  # pulled, yet missing: let explain() report the engine's words
        await self.pull(image, context, "not on the engine, pull='missing'")
        return str((await self.call(self.api.create_container, image, **kwargs))["Id"])

    # -- containers -------------------------------------------------------------------------------

    async def remove_ours(self, ref: str, labels: Mapping[str, str]) -> bool:
        """Force-remove container ``ref`` (an id or a name) if it carries all ``labels``.

        Used when a cancellation interrupted a create and only the name is known: a container
        of that name may belong to someone else, and Shipyard never touches those.
        """
        try:
            info = await self.inspect(ref)
        except self.errors.NotFound:
            return False
        if not carries(info.get("Config", {}).get("Labels"), labels):
            return False
        await self.stop_and_remove(info["Id"], None)
        return True

    async def inspect(self, cid: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(self.api.inspect_container, cid)
        return result

    async def stop_and_remove(self, cid: str, stop_timeout: float | None) -> None:
        """Stop (SIGTERM, ``stop_timeout`` seconds, SIGKILL) and remove; missing is fine."""
        if stop_timeout is not None:
            try:
                await self.call(self.api.stop, cid, timeout=max(0, round(stop_timeout)))
            except self.errors.NotFound:
                return
            except self.errors.APIError:
                pass  # already stopping, or dead: remove(force) below settles it
        try:
            await self.call(self.api.remove_container, cid, v=True, force=True)
        except self.errors.NotFound:
            pass
        except self.errors.APIError as exc:
            if exc.status_code != 409:  # "removal already in progress"
                raise


# Reprs, tracebacks and pickles name the package, as before it was split into modules.
Engine.__module__ = "shipyard.plugins.docker"
