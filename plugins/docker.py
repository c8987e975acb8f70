"""The ``docker.run`` and ``docker.service`` steps: containers on a Docker engine.

::

    sy.docker.run("shipyard/migrate:1.4", ["./migrate", "up"], env={"DB_URL": sy.secret("DB_URL")})
    sy.docker.service(
        "webapp", image=f"webapp:{d.version}",
        health_check=sy.health_check("/healthz"), router=sy.nginx("/etc/nginx/shipyard"),
    )

The engine is the one ``DOCKER_HOST`` names (``unix://``, ``ssh://user@host``, ``tcp://host:2376``
with ``DOCKER_TLS_VERIFY``/``DOCKER_CERT_PATH``), else the default socket: whatever the Docker SDK
for Python's ``docker.from_env()`` reaches. The SDK is imported when a docker step runs, never when
a pipelines file is loaded or planned; each step run opens one client and closes it at the end.

The SDK blocks, so its calls run in worker threads and the runner keeps streaming other steps;
container output is read by a thread of its own and logged on the event loop, line by line.
Everything Shipyard creates carries ``shipyard.*`` labels, and only containers with the labels of
the same pipeline, environment and service are ever stopped or removed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import Final
from typing import Literal
from typing import TypeVar
from typing import cast
from typing import final

from shipyard._exceptions import PipelineDefinitionError
from shipyard._exceptions import StepFailed
from shipyard._output import ThreadedFollower
from shipyard._pipeline import Step
from shipyard._pipeline import reject_unknown_options
from shipyard._plugins import hookimpl
from shipyard._reports import StepResult

if TYPE_CHECKING:
    import asyncio

    from shipyard._plugins import StepTypeRegistry
    from shipyard._runner import StepContext
    from shipyard.plugins.healthcheck import HealthCheckStep

_T = TypeVar("_T")
_PullPolicy = Literal["missing", "always", "never"]

#: Where the SDK looks when ``DOCKER_HOST`` is not set.
DEFAULT_ENGINE: Final = "unix:///var/run/docker.sock"
#: Seconds one API call may take (not the container's run time: waiting for it has no limit).
API_TIMEOUT: Final = 60
#: Label keys Shipyard puts on every container it creates.
LABEL_PREFIX: Final = "shipyard."
PULL_POLICIES: Final = ("missing", "always", "never")
#: Without any health check, a new service container must still run after this many seconds.
MIN_UPTIME: Final = 1.0
#: Seconds between two looks at a starting container's state.
POLL_INTERVAL: Final = 0.2

_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*\Z")
_UNSAFE_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_.-]")


# -- definition-time checks -----------------------------------------------------------------------


def _str_list(value: Any, what: str, kind: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, Sequence) and all(
        isinstance(v, (str, int, float, os.PathLike)) for v in value
    ):
        return [os.fspath(v) if isinstance(v, os.PathLike) else str(v) for v in value]
    raise PipelineDefinitionError(
        f"{kind} step: {what} must be a string or a list of strings, got {value!r}"
    )


def _command(value: Any, kind: str) -> str | list[str] | None:
    if isinstance(value, str):
        if not value.strip():
            raise PipelineDefinitionError(f"{kind} step: command is an empty string")
        return value  # split by the engine's rules (the SDK uses shlex)
    return _str_list(value, "command", kind)


def _env(value: Any, kind: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise PipelineDefinitionError(
            f"{kind} step: env must map variable names to values, got {value!r}"
        )
    return {k: v if isinstance(v, str) else str(v) for k, v in value.items()}


def _labels(value: Any, kind: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise PipelineDefinitionError(
            f"{kind} step: labels must map label keys to values, got {value!r}"
        )
    return {k: str(v) for k, v in value.items()}


def _volumes(value: Any, kind: str) -> list[str]:
    """``{"./data": "/data:ro"}`` or ``["./data:/data:ro"]`` as ``host:container[:mode]`` strings."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        out = []
        for host, target in value.items():
            if not isinstance(host, (str, os.PathLike)) or not isinstance(target, str):
                raise PipelineDefinitionError(
                    f"{kind} step: volumes must map host paths (or volume names) to container "
                    f"paths, got {host!r}: {target!r}"
                )
            out.append(f"{os.fspath(host)}:{target}")
        return out
    items = _str_list(value, "volumes", kind) or []
    for item in items:
        if ":" not in item:
            raise PipelineDefinitionError(
                f"{kind} step: volume {item!r} must read 'HOST:CONTAINER[:MODE]'"
            )
    return items


def _pull(value: Any, kind: str) -> _PullPolicy:
    if value not in PULL_POLICIES:
        raise PipelineDefinitionError(
            f"{kind} step: pull must be 'missing', 'always' or 'never', got {value!r}"
        )
    return cast("_PullPolicy", value)


def _image(value: Any, kind: str) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise PipelineDefinitionError(
            f"{kind} step: image must be an image reference such as 'web:1.2', got {value!r}"
        )
    return value


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show_command(command: str | list[str] | None) -> str:
    if command is None:
        return ""
    if isinstance(command, str):
        return command
    import shlex

    return shlex.join(command)


def _show_env(env: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in env.items())


# -- the engine -----------------------------------------------------------------------------------


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


def _sdk() -> Any:
    # Any: the SDK is an optional dependency without type information in every version.
    try:
        import docker  # the Docker SDK, never this module: imports are absolute
    except ImportError:
        raise StepFailed(
            "the docker steps need the Docker SDK for Python, which is not installed; "
            "install it with: pip install 'shipyard[docker]'"
        ) from None
    return docker


def _why(exc: BaseException) -> str:
    """A short reason for a failed connection, from the SDK's nested exceptions."""
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
        return "TLS error: " + _short(str(exc), 160)
    return _short(" ".join(str(exc).split()), 200) or type(exc).__name__


def _unreachable(address: str, source: str, exc: BaseException) -> StepFailed:
    return StepFailed(
        f"cannot reach the Docker engine at {address} ({source}): {_why(exc)}; start the "
        "engine there, or set DOCKER_HOST to one that runs (unix:///path/to/docker.sock, "
        "ssh://user@host, or tcp://host:2376 with DOCKER_TLS_VERIFY=1 and DOCKER_CERT_PATH)"
    )


@final
class Engine:
    """One Docker client for one step run; blocking SDK calls run in worker threads."""

    def __init__(self, client: Any, address: str, source: str) -> None:
        # Any: docker.DockerClient, imported lazily.
        self.client = client
        #: The low-level API client: one HTTP request per call, nothing hidden.
        self.api = client.api
        self.address = address
        self.source = source
        self.errors: Any = _sdk().errors
        self._inflight: set[asyncio.Future[Any]] = set()

    @classmethod
    async def connect(cls, timeout: float = API_TIMEOUT) -> Engine:
        """Connect to the engine ``DOCKER_HOST`` names (or the default socket).

        :raises StepFailed: with one sentence saying where it looked and what to set.
        """
        import asyncio

        sdk = _sdk()
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
        """``fn(*args, **kwargs)`` in a worker thread.

        If the caller is cancelled, the call still finishes in its thread; :meth:`settle` waits
        for it, so a container created at that moment is not missed by the clean-up.
        """
        import asyncio

        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        return await asyncio.shield(fut)

    async def settle(self, timeout: float = API_TIMEOUT) -> None:
        """Wait for calls still running in threads after a cancellation."""
        import asyncio

        pending = [f for f in self._inflight if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

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
            f"{_why(exc)}"
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
            error = _why(exc)
        except OSError as exc:
            error = _why(exc)
        if error:
            raise StepFailed(
                f"image {image!r} is not on the Docker engine at {self.address} and pulling it "
                f"failed ({why}): {_short(' '.join(error.split()), 300)}; check the name and tag, "
                "that the engine can reach the registry (docker login for a private one), or "
                "build or load the image on the engine and use pull='never'"
            )
        context.log(f"pulled {image}", "shipyard")

    async def ensure_image(self, image: str, pull: _PullPolicy, context: StepContext) -> None:
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
        self, image: str, pull: _PullPolicy, context: StepContext, **kwargs: Any
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
        have = info.get("Config", {}).get("Labels") or {}
        if any(have.get(k) != v for k, v in labels.items()):
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


# -- streaming container output -------------------------------------------------------------------


class LogPump(ThreadedFollower):
    """Follows a container's output; stdout and stderr arrive merged, as ``docker logs`` shows."""

    kind = "docker-logs"

    def __init__(self, engine: Engine, cid: str, context: StepContext, label: str) -> None:
        super().__init__(context, label)
        self.engine = engine
        self.cid = cid

    def open(self) -> tuple[Any, Iterable[bytes]]:
        stream = self.engine.api.logs(self.cid, stream=True, follow=True)
        return stream, stream

    def interrupt(self, handle: Any) -> None:
        handle.close()


def _tail_text(lines: Iterable[str], n: int = 10) -> str:
    lines = list(lines)[-n:]
    return ("; last output:\n" + "\n".join(f"  {ln}" for ln in lines)) if lines else ""


def _exit_text(rc: int, oom: bool = False) -> str:
    if oom:
        return f"was killed for lack of memory (exit code {rc})"
    if rc > 128:
        import signal

        try:
            return f"exited with {rc} (killed by {signal.Signals(rc - 128).name})"
        except ValueError:
            pass
    return f"exited with {rc}"


def _container_name(*parts: str) -> str:
    name = "-".join(_UNSAFE_NAME_CHARS.sub("_", p) for p in parts if p)
    return name if name[:1].isalnum() else "c" + name


def _resolve_binds(binds: list[str], context: StepContext) -> list[str]:
    """Relative host paths (``./data``, ``conf/x``) are relative to the pipelines file."""
    out = []
    for bind in binds:
        host, _, rest = bind.partition(":")
        if host.startswith(".") or ("/" in host and not host.startswith("/")):
            host = os.fspath((context.rootdir / host).resolve())
        out.append(f"{host}:{rest}")
    return out


def _base_labels(context: StepContext) -> dict[str, str]:
    d = context.deployment
    return {
        "shipyard.pipeline": d.pipeline,
        "shipyard.environment": d.environment,
        "shipyard.version": d.version,
        "shipyard.deployment": str(d.id),
    }


# -- docker.run -----------------------------------------------------------------------------------


class DockerRunStep(Step):
    """Run a one-shot container; its exit code decides.

    :param image: the image, e.g. ``"migrate:1.4"``.
    :param command: the command (a list, or a string split like a shell would); the image's
        default when None.
    :param env: extra environment variables (values may be secrets); ``DEPLOYMENT_*`` are set.
    :param volumes: ``{"./data": "/data:ro"}`` or ``["./data:/data:ro"]``; relative host paths
        are relative to the pipelines file, a bare name is a named volume.
    :param workdir: the working directory inside the container.
    :param user: ``"uid[:gid]"`` or a user name known to the image.
    :param network: ``"none"`` (default), ``"host"``, or a network of the engine.
    :param pull: ``"missing"`` pulls only an image the engine lacks, ``"always"`` pulls first,
        ``"never"`` fails when the image is missing.
    :param labels: extra container labels.
    """

    kind = "docker.run"

    def __init__(
        self,
        image: str,
        command: str | Sequence[str] | None = None,
        *,
        env: Mapping[str, Any] | None = None,
        volumes: Mapping[str, str] | Sequence[str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        network: str = "none",
        pull: _PullPolicy = "missing",
        labels: Mapping[str, str] | None = None,
        name: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        **unknown: Any,
    ) -> None:
        reject_unknown_options(self, unknown)
        self.image = _image(image, self.kind)
        self.command = _command(command, self.kind)
        self.env = _env(env, self.kind)
        self.volumes = _volumes(volumes, self.kind)
        if workdir is not None and (not isinstance(workdir, str) or not workdir.startswith("/")):
            raise PipelineDefinitionError(
                f"docker.run step: workdir must be an absolute path inside the container, "
                f"got {workdir!r}"
            )
        self.workdir = workdir
        if user is not None and (not isinstance(user, (str, int)) or not str(user)):
            raise PipelineDefinitionError(f"docker.run step: user must be a string, got {user!r}")
        self.user = None if user is None else str(user)
        if not isinstance(network, str) or not network:
            raise PipelineDefinitionError(
                f"docker.run step: network must be 'none', 'host' or a network name, "
                f"got {network!r}"
            )
        self.network = network
        self.pull = _pull(pull, self.kind)
        self.labels = _labels(labels, self.kind)
        super().__init__(name=name, timeout=timeout, retries=retries)

    def default_name(self) -> str:
        return _short(f"docker run {self.image} {_show_command(self.command)}".rstrip())

    def describe(self) -> str:
        text = f"docker run {self.image}"
        if self.command is not None:
            text += f" {_show_command(self.command)}"
        extra = [f"network={self.network}", f"pull={self.pull}"]
        if self.env:
            extra.append("env=" + _show_env(self.env))
        if self.volumes:
            extra.append("volumes=" + ",".join(self.volumes))
        if self.workdir:
            extra.append(f"workdir={self.workdir}")
        if self.user:
            extra.append(f"user={self.user}")
        return f"{text}  ({'; '.join(extra)})"

    def options(self) -> dict[str, Any]:
        return {"image": self.image, "command": self.command, "env": self.env,
                "volumes": self.volumes, "workdir": self.workdir, "user": self.user,
                "network": self.network, "pull": self.pull, "labels": self.labels}  # fmt: skip

    async def run(self, context: StepContext) -> StepResult:
        engine = await Engine.connect()
        try:
            return await self._run(engine, context)
        finally:
            engine.close()

    async def _run(self, engine: Engine, context: StepContext) -> StepResult:
        import asyncio
        import secrets

        d = context.deployment
        cname = _container_name(
            "shipyard-run", d.pipeline, str(d.id), f"{context.stage_index}.{context.index}",
            secrets.token_hex(3),
        )  # fmt: skip
        env = {**context.deployment_env, **context.resolve(self.env)}
        labels = {**self.labels, **_base_labels(context), "shipyard.step": self.name}
        host_config = engine.api.create_host_config(
            network_mode=self.network, binds=_resolve_binds(self.volumes, context) or None
        )
        command = context.resolve(self.command)
        cid: str | None = None
        pump: LogPump | None = None
        cancelled = False
        try:
            cid = await engine.create(
                self.image, self.pull, context, command=command, environment=env,
                working_dir=self.workdir, user=self.user, labels=labels, name=cname,
                host_config=host_config, detach=True,
            )  # fmt: skip
            context.log(f"container {cname} ({cid[:12]}) of {self.image}", "shipyard")
            await engine.call(engine.api.start, cid)
            pump = LogPump(engine, cid, context, cname)
            pump.start()
            await pump.wait()  # the output ends when the container exits
            status = await engine.call(engine.api.wait, cid, timeout=None)
            rc = int(status.get("StatusCode", -1))
        except asyncio.CancelledError:
            cancelled = True
            raise
        except StepFailed:
            raise
        except (engine.errors.DockerException, OSError) as exc:
            raise engine.explain(exc, f"run {self.image}") from None
        finally:
            if pump is not None:
                pump.close()
            await self._clean_up(engine, cid, cname, labels, cancelled, context)
        if rc != 0:
            tail = list(pump.tail) if pump is not None else []
            oom = rc == 137 and bool(status.get("Error"))
            raise StepFailed(
                f"container {cname} of {self.image} {_exit_text(rc, oom)}{_tail_text(tail)}",
                step_exit_code=rc,
                output=tail,
            )
        return StepResult(exit_code=0)

    async def _clean_up(
        self,
        engine: Engine,
        cid: str | None,
        cname: str,
        labels: Mapping[str, str],
        cancelled: bool,
        context: StepContext,
    ) -> None:
        """Remove the container; after a cancel or timeout, stop it gracefully first."""
        try:
            if cid is None:
                # Cancelled while creating: the create may still finish in its thread.
                await engine.settle()
                await engine.remove_ours(cname, labels)
                return
            await engine.stop_and_remove(cid, context.grace if cancelled else None)
        except Exception as exc:
            context.log(f"could not remove container {cname}: {_why(exc)}", "shipyard")
            return
        if cancelled:
            context.log(f"stopped and removed container {cname}", "shipyard")


# -- docker.service -------------------------------------------------------------------------------


def _health_spec(value: Any) -> HealthCheckStep | dict[str, Any] | None:
    """``health_check=`` as a probe (a health_check step) or a Docker HEALTHCHECK definition."""
    if value is None:
        return None
    from shipyard.plugins.healthcheck import HealthCheckStep

    if isinstance(value, HealthCheckStep):
        return value
    if isinstance(value, str):
        return HealthCheckStep(value)
    if isinstance(value, Mapping):
        test = value.get("test")
        if isinstance(test, str):
            test = ["CMD-SHELL", test]
        if not isinstance(test, Sequence) or not test or not all(isinstance(t, str) for t in test):
            raise PipelineDefinitionError(
                "docker.service step: a Docker health check needs 'test', a command string or "
                f"list such as ['CMD', 'wget', '-q', '-O-', 'http://127.0.0.1:8080/'], got {test!r}"
            )
        spec: dict[str, Any] = {"test": list(test)}
        for key in ("interval", "timeout", "start_period"):
            if key in value:
                seconds = value[key]
                if (
                    isinstance(seconds, bool)
                    or not isinstance(seconds, (int, float))
                    or seconds <= 0
                ):
                    raise PipelineDefinitionError(
                        f"docker.service step: health_check {key} must be a positive number of "
                        f"seconds, got {seconds!r}"
                    )
                spec[key] = int(seconds * 1_000_000_000)
        if "retries" in value:
            spec["retries"] = int(value["retries"])
        unknown = set(value) - {"test", "interval", "timeout", "start_period", "retries"}
        if unknown:
            raise PipelineDefinitionError(
                f"docker.service step: unknown health_check key {sorted(unknown)[0]!r} "
                "(keys: test, interval, timeout, start_period, retries)"
            )
        return spec
    raise PipelineDefinitionError(
        "docker.service step: health_check must be a path such as '/healthz', "
        "shipyard.health_check(...), or a Docker health check {'test': [...]}, "
        f"got {value!r}"
    )


def _slots(value: Any) -> tuple[int, int]:
    if (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in value)
        and value[0] != value[1]
    ):
        return int(value[0]), int(value[1])
    raise PipelineDefinitionError(
        f"docker.service step: slots must be two different TCP ports, got {value!r}"
    )


def _describe_router(router: Any) -> str:
    describe = getattr(router, "describe", None)
    return describe() if callable(describe) else repr(router)


class _ServiceFailed(Exception):
    """The new container did not become healthy, or the router failed; carries the reason."""

    def __init__(self, message: str, output: list[str], *, router_failed: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.output = output
        self.router_failed = router_failed


class DockerServiceStep(Step):
    """Replace a long-running service by its new version, blue-green, on one engine.

    The new version starts as ``<service>-<version>`` with host networking, in the slot (port)
    the old one does not use, with ``PORT`` set to it. When it is healthy the router sends the
    traffic there, and the old container is stopped and removed. If it does not become healthy,
    it is removed and the old one keeps serving, the router untouched.

    Without a router nothing can move traffic between ports: the old container is stopped, the
    new one starts on the same port (restarting the old one if the new fails). That is **not**
    zero-downtime.

    :param service: the service's name; containers are ``<service>-<version>``.
    :param image: the image of the new version.
    :param command: the command; the image's default when None.
    :param env: extra environment variables (values may be secrets); ``DEPLOYMENT_*`` and
        ``PORT`` are set.
    :param slots: the two ports the versions alternate between.
    :param health_check: a path (``"/healthz"``) or :func:`shipyard.health_check` probed at the
        new slot; a Docker health check ``{"test": [...], "interval": 1}``; None uses the
        image's own HEALTHCHECK, or else only checks the container keeps running.
    :param router: a router such as :func:`shipyard.nginx`; a plugin implementing
        ``shipyard_router_switch`` drives it.
    :param stop_timeout: seconds the old container gets between SIGTERM and SIGKILL.
    :param drain: seconds between the traffic switch and stopping the old container, for
        requests in flight.
    :param health_timeout: the deadline of a Docker health check (a ``health_check`` step has
        its own ``timeout``).
    :param restart: the container's restart policy.
    """

    kind = "docker.service"

    def __init__(
        self,
        service: str | None = None,
        /,
        image: str | None = None,
        *,
        command: str | Sequence[str] | None = None,
        env: Mapping[str, Any] | None = None,
        slots: Sequence[int] = (8081, 8082),
        health_check: Any = None,
        router: Any = None,
        stop_timeout: float = 10,
        drain: float = 2.0,
        health_timeout: float = 60.0,
        pull: _PullPolicy = "missing",
        volumes: Mapping[str, str] | Sequence[str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        restart: Literal["no", "on-failure", "unless-stopped", "always"] = "unless-stopped",
        labels: Mapping[str, str] | None = None,
        name: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        **unknown: Any,
    ) -> None:
        reject_unknown_options(self, unknown)
        # docker.service(name="web", image=...) reads naturally: `name` then names the service.
        service = service if service is not None else name
        if not isinstance(service, str) or not _NAME_RE.match(service):
            raise PipelineDefinitionError(
                "docker.service step: the service name must be letters, digits, '_', '.' or '-' "
                f"(a container name prefix), got {service!r}"
            )
        self.service = service
        self.image = _image(image, self.kind)
        self.command = _command(command, self.kind)
        self.env = _env(env, self.kind)
        self.slots = _slots(slots)
        self.health_check = _health_spec(health_check)
        self.router = router
        for opt, value in (("stop_timeout", stop_timeout), ("drain", drain)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise PipelineDefinitionError(
                    f"docker.service step: {opt} must be a number of seconds >= 0, got {value!r}"
                )
        if (
            isinstance(health_timeout, bool)
            or not isinstance(health_timeout, (int, float))
            or (health_timeout <= 0)
        ):
            raise PipelineDefinitionError(
                f"docker.service step: health_timeout must be a positive number of seconds, "
                f"got {health_timeout!r}"
            )
        if restart not in ("no", "on-failure", "unless-stopped", "always"):
            raise PipelineDefinitionError(
                "docker.service step: restart must be 'no', 'on-failure', 'unless-stopped' or "
                f"'always', got {restart!r}"
            )
        self.stop_timeout = float(stop_timeout)
        self.drain = float(drain)
        self.health_timeout = float(health_timeout)
        self.pull = _pull(pull, self.kind)
        self.volumes = _volumes(volumes, self.kind)
        self.workdir = workdir
        self.user = None if user is None else str(user)
        self.restart = restart
        self.labels = _labels(labels, self.kind)
        step_name = name if name and name != service else None
        super().__init__(name=step_name, timeout=timeout, retries=retries)

    def default_name(self) -> str:
        return f"docker service {self.service}"

    def _describe_check(self) -> str:
        hc = self.health_check
        if hc is None:
            return "the image's HEALTHCHECK if any, else still running after 1s"
        if isinstance(hc, dict):
            return (
                f"Docker health check {_show_command(hc['test'])} within {self.health_timeout:g}s"
            )
        return f"{hc.method} {hc.url_for('http://127.0.0.1:<slot>')} within {hc.deadline:g}s"

    def describe(self) -> str:
        text = (
            f"start {self.image} as {self.service}-<version> on 127.0.0.1:<slot> "
            f"(slots {self.slots[0]}/{self.slots[1]}, host network, PORT=<slot>, pull={self.pull})"
            f"; check {self._describe_check()}"
        )
        if self.router is not None:
            text += (
                f"; switch router {_describe_router(self.router)}; after {self.drain:g}s stop "
                f"the old container (stop_timeout {self.stop_timeout:g}s)"
            )
        else:
            text += "; no router: the old container stops first (not zero-downtime)"
        if self.command is not None:
            text += f"; command {_show_command(self.command)}"
        if self.env:
            text += f"; env {_show_env(self.env)}"
        return text

    def options(self) -> dict[str, Any]:
        hc = self.health_check
        check: Any = hc if isinstance(hc, dict) or hc is None else hc.options()
        return {"service": self.service, "image": self.image, "command": self.command,
                "env": self.env, "slots": list(self.slots), "health_check": check,
                "router": None if self.router is None else _describe_router(self.router),
                "stop_timeout": self.stop_timeout, "drain": self.drain, "pull": self.pull,
                "volumes": self.volumes, "workdir": self.workdir, "user": self.user,
                "restart": self.restart, "labels": self.labels}  # fmt: skip

    async def run(self, context: StepContext) -> StepResult:
        engine = await Engine.connect()
        try:
            return await self._run(engine, context)
        except (engine.errors.DockerException, OSError) as exc:
            raise engine.explain(exc, f"deploy service {self.service!r}") from None
        finally:
            engine.close()

    # -- the protocol -----------------------------------------------------------------------------

    async def _run(self, engine: Engine, context: StepContext) -> StepResult:
        import asyncio

        d = context.deployment
        scope = {
            "shipyard.service": self.service,
            "shipyard.pipeline": d.pipeline,
            "shipyard.environment": d.environment,
        }
        filters = {"label": [f"{k}={v}" for k, v in scope.items()]}
        found = await engine.call(engine.api.containers, all=True, filters=filters)
        # The engine filters by label; check again, so nothing outside the scope is touched.
        mine = [
            c for c in found if all((c.get("Labels") or {}).get(k) == v for k, v in scope.items())
        ]
        cname = _container_name(self.service, d.version)
        running = [c for c in mine if c.get("State") == "running"]
        for c in mine:
            if c.get("State") != "running":
                context.log(f"removing stale container {_cname(c)} ({c.get('State')})", "shipyard")
                await engine.stop_and_remove(c["Id"], None)
        if len(running) > 1:
            names = ", ".join(_cname(c) for c in running)
            raise StepFailed(
                f"service {self.service!r} has {len(running)} running containers ({names}), "
                "probably left by an interrupted deployment; Shipyard cannot tell which one "
                "serves traffic: remove the other one (docker rm -f NAME) and deploy again"
            )
        old = running[0] if running else None
        if old is not None and _cname(old) == cname:
            return await self._already_running(engine, context, old)
        await self._refuse_foreign(engine, cname, scope)
        old_port = _port_of(old)
        if self.router is None:
            port = old_port if old_port is not None else self.slots[0]
        else:
            port = self.slots[1] if old_port == self.slots[0] else self.slots[0]
        new_labels = {**self.labels, **_base_labels(context), **scope, "shipyard.port": str(port)}
        env = {**context.deployment_env, **context.resolve(self.env), "PORT": str(port)}
        old_stopped = False
        pull = self.pull
        if old is not None and self.router is None:
            # The old version stops first: pull before that, not during the downtime.
            await engine.ensure_image(self.image, self.pull, context)
            pull = "never"
            context.log(
                f"no router: stopping {_cname(old)} first; the service is down until "
                f"{cname} is healthy",
                "shipyard",
            )
            await engine.call(engine.api.stop, old["Id"], timeout=round(self.stop_timeout))
            old_stopped = True

        cid: str | None = None
        pump: LogPump | None = None
        switched = False
        try:
            slot = self.slots.index(port) + 1 if port in self.slots else 0
            context.log(
                f"starting {cname} from {self.image} on 127.0.0.1:{port} "
                f"(slot {slot} of {self.slots[0]}/{self.slots[1]}, PORT={port})",
                "shipyard",
            )
            host_config = engine.api.create_host_config(
                network_mode="host",
                binds=_resolve_binds(self.volumes, context) or None,
                restart_policy={"Name": self.restart} if self.restart != "no" else None,
            )
            extra: dict[str, Any] = {}
            if isinstance(self.health_check, dict):
                extra["healthcheck"] = self.health_check
            try:
                cid = await engine.create(
                    self.image, pull, context, command=context.resolve(self.command),
                    environment=env, working_dir=self.workdir, user=self.user,
                    labels=new_labels, name=cname, host_config=host_config, detach=True, **extra,
                )  # fmt: skip
            except engine.errors.APIError as exc:
                if exc.status_code == 409:  # created meanwhile by someone else
                    raise self._name_taken(cname, scope) from None
                raise
            await engine.call(engine.api.start, cid)
            pump = LogPump(engine, cid, context, cname)
            pump.start()
            try:
                await self._wait_healthy(engine, context, cid, cname, port, pump)
            finally:
                pump.close()
            if self.router is not None:
                await self._switch(context, port)
                switched = True
        except BaseException as exc:
            if switched:
                raise
            await self._undo(engine, context, cid, cname, new_labels, old if old_stopped else None)
            if isinstance(exc, _ServiceFailed):
                raise StepFailed(
                    exc.message + self._aftermath(cname, old, exc.router_failed), output=exc.output
                ) from None
            raise
        finally:
            if pump is not None:
                pump.close()

        # The new version serves; the old one goes, even if the deployment is cancelled now.
        if old is not None:
            retire = asyncio.ensure_future(self._retire(engine, context, old))
            try:
                await asyncio.shield(retire)
            except asyncio.CancelledError:
                await retire  # the engine client must outlive it
                raise
        context.log(f"{cname} serves {self.service} on 127.0.0.1:{port}", "shipyard")
        return StepResult()

    async def _refuse_foreign(self, engine: Engine, cname: str, scope: Mapping[str, str]) -> None:
        """Fail before touching anything if another container already has the new name."""
        try:
            info = await engine.inspect(cname)
        except engine.errors.NotFound:
            return
        labels = info.get("Config", {}).get("Labels") or {}
        if any(labels.get(k) != v for k, v in scope.items()):
            raise self._name_taken(cname, scope)

    def _name_taken(self, cname: str, scope: Mapping[str, str]) -> StepFailed:
        return StepFailed(
            f"a container named {cname!r} already exists and does not belong to service "
            f"{self.service!r} of pipeline {scope['shipyard.pipeline']!r} in "
            f"{scope['shipyard.environment']!r}; Shipyard never touches it: remove or rename it, "
            "or give this service another name"
        )

    def _aftermath(self, cname: str, old: dict[str, Any] | None, router_failed: bool) -> str:
        """The last line of a failure: what was undone, what serves now."""
        text = f"\n  removed {cname}"
        if self.router is not None and not router_failed:
            text += "; the router was not touched"
        if old is not None:
            text += f"; {_cname(old)} " + (
                "keeps serving" if self.router is not None else "was restarted"
            )
        return text

    async def _already_running(
        self, engine: Engine, context: StepContext, current: dict[str, Any]
    ) -> StepResult:
        """The version is deployed already (a retry, a rollback to it): check it, route to it."""
        name = _cname(current)
        port = _port_of(current) or self.slots[0]
        context.log(
            f"{name} already runs version {context.deployment.version} on 127.0.0.1:{port}; "
            "checking it instead of starting another",
            "shipyard",
        )
        pump = LogPump(engine, current["Id"], context, name)
        try:
            await self._wait_healthy(engine, context, current["Id"], name, port, pump)
            if self.router is not None:
                await self._switch(context, port)
        except _ServiceFailed as exc:
            raise StepFailed(exc.message, output=exc.output) from None
        return StepResult()

    async def _undo(
        self,
        engine: Engine,
        context: StepContext,
        cid: str | None,
        cname: str,
        labels: Mapping[str, str],
        stopped_old: dict[str, Any] | None,
    ) -> None:
        """The new version failed (or we were cancelled): remove it, restore the old one."""
        try:
            if cid is not None:
                await engine.stop_and_remove(cid, None)
                context.log(f"removed {cname}", "shipyard")
            else:
                await engine.settle()  # a create cut short by a cancel may still finish
                if await engine.remove_ours(cname, labels):
                    context.log(f"removed {cname}", "shipyard")
        except Exception as err:
            context.log(f"could not remove {cname}: {_why(err)}", "shipyard")
        if stopped_old is not None:
            try:
                await engine.call(engine.api.start, stopped_old["Id"])
                context.log(f"restarted {_cname(stopped_old)}", "shipyard")
            except Exception as err:
                context.log(f"could not restart {_cname(stopped_old)}: {_why(err)}", "shipyard")

    async def _retire(self, engine: Engine, context: StepContext, old: dict[str, Any]) -> None:
        import asyncio

        name = _cname(old)
        if self.router is not None and self.drain > 0:
            context.log(f"draining {name} for {self.drain:g}s", "shipyard")
            await asyncio.sleep(self.drain)
        try:
            await engine.stop_and_remove(old["Id"], self.stop_timeout)
            context.log(f"stopped and removed {name}", "shipyard")
        except Exception as exc:
            context.log(
                f"warning: could not remove the old container {name}: {_why(exc)}", "shipyard"
            )

    async def _switch(self, context: StepContext, port: int) -> None:
        import asyncio

        desc = _describe_router(self.router)
        try:
            result = context.pluginmanager.router_switch(self.router, self.service, port, context)
            if result is None:
                raise StepFailed(
                    f"no plugin handles the router {desc} (router=): is the plugin that "
                    "provides it installed and enabled? `shipyard plugins` lists them"
                )
            if not isinstance(result, bool):
                result = await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            text = exc.message if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"
            raise _ServiceFailed(
                f"router {desc} could not send {self.service} to 127.0.0.1:{port}: {text}",
                [],
                router_failed=True,
            ) from None
        context.log(f"router {desc}: {self.service} -> 127.0.0.1:{port}", "shipyard")

    async def _wait_healthy(
        self,
        engine: Engine,
        context: StepContext,
        cid: str,
        cname: str,
        port: int,
        pump: LogPump,
    ) -> None:
        """Return when the new container is healthy; raise :class:`_ServiceFailed` otherwise."""
        import asyncio

        hc = self.health_check
        loop = asyncio.get_running_loop()
        if hc is None or isinstance(hc, dict):
            info = await engine.inspect(cid)
            if info["State"].get("Health") is None:
                context.log(
                    f"no health check (none given, none in the image): only checking that "
                    f"{cname} keeps running for {MIN_UPTIME:g}s",
                    "shipyard",
                )
                await asyncio.sleep(MIN_UPTIME)
                await self._check_running(engine, cid, cname, pump, "while starting")
                return
            deadline = loop.time() + self.health_timeout
            while True:
                state = info["State"]
                if not state.get("Running") or state.get("Restarting"):
                    await self._check_running(engine, cid, cname, pump, "during its health check")
                health = state.get("Health") or {}
                status = health.get("Status")
                if status == "healthy":
                    context.log(f"{cname} is healthy (Docker health check)", "shipyard")
                    return
                if status == "unhealthy" or loop.time() > deadline:
                    log = health.get("Log") or []
                    out = " ".join(str(log[-1].get("Output", "")).split()) if log else ""
                    why = (
                        "is unhealthy"
                        if status == "unhealthy"
                        else f"was not healthy within {self.health_timeout:g}s ({status})"
                    )
                    raise _ServiceFailed(
                        f"{cname} {why}"
                        + (f"; last health check output: {_short(out, 300)}" if out else "")
                        + _tail_text(pump.tail),
                        [*pump.tail, *([out] if out else [])],
                    )
                await asyncio.sleep(POLL_INTERVAL)
                info = await engine.inspect(cid)

        from shipyard.plugins.healthcheck import probe_until_healthy

        scheme = "https" if hc.url.startswith("https:") else "http"
        url = hc.url_for(f"{scheme}://{engine_hostname(engine.address)}:{port}")
        probe = asyncio.ensure_future(
            probe_until_healthy(hc, url, log=context.log, resolve=context.resolve)
        )
        watch = asyncio.ensure_future(self._watch(engine, cid, cname, pump))
        try:
            done, _ = await asyncio.wait([probe, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (probe, watch):
                t.cancel()
            await asyncio.gather(probe, watch, return_exceptions=True)
        if watch in done and not watch.cancelled() and watch.exception() is not None:
            raise watch.exception()  # type: ignore[misc]
        exc = probe.exception() if not probe.cancelled() else None
        if exc is not None:
            if isinstance(exc, StepFailed):
                raise _ServiceFailed(
                    f"{cname} did not become healthy: {exc.message}" + _tail_text(pump.tail),
                    [*pump.tail, *exc.output],
                )
            raise exc
        # Something else may answer on that port: make sure it is our container that runs.
        await self._check_running(engine, cid, cname, pump, "although the port answered")
        context.log(f"{cname} is healthy", "shipyard")

    async def _watch(self, engine: Engine, cid: str, cname: str, pump: LogPump) -> None:
        """Raise as soon as the container stops running (the health check would only time out)."""
        import asyncio

        while True:
            await asyncio.sleep(POLL_INTERVAL)
            await self._check_running(engine, cid, cname, pump, "during its health check")

    async def _check_running(
        self, engine: Engine, cid: str, cname: str, pump: LogPump, when: str
    ) -> None:
        state = (await engine.inspect(cid))["State"]
        if state.get("Running") and not state.get("Restarting"):
            return
        await pump.wait(timeout=1.0)  # let the last lines of output arrive
        rc = int(state.get("ExitCode") or 0)
        how = _exit_text(rc, bool(state.get("OOMKilled")))
        if state.get("Restarting"):
            how = f"keeps restarting (last {how})"
        raise _ServiceFailed(
            f"{cname} {how} {when}{_tail_text(pump.tail)}",
            list(pump.tail),
        )


def _cname(container: Mapping[str, Any]) -> str:
    names = container.get("Names") or [container.get("Id", "?")[:12]]
    return str(names[0]).lstrip("/")


def _port_of(container: Mapping[str, Any] | None) -> int | None:
    if container is None:
        return None
    try:
        return int((container.get("Labels") or {})["shipyard.port"])
    except (KeyError, ValueError):
        return None


# -- the façade -----------------------------------------------------------------------------------


@final
class DockerSteps:
    """``shipyard.docker``: the Docker step types, ``docker.run`` and ``docker.service``."""

    run: Final = DockerRunStep
    service: Final = DockerServiceStep

    def __repr__(self) -> str:
        return "<shipyard.docker: run, service>"


docker: Final = DockerSteps()


@hookimpl
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    registry.add(DockerRunStep)
    registry.add(DockerServiceStep)
