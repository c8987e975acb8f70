"""The ``nginx`` router: ``docker.service`` switches traffic by rewriting an nginx upstream.

::

    router = sy.nginx("/etc/nginx/shipyard")   # writes /etc/nginx/shipyard/<service>.conf

    # nginx.conf, inside http { }:
    #     include /etc/nginx/shipyard/*.conf;
    #     server { listen 80; location / { proxy_pass http://shipyard_webapp; } }

A canary step (``sy.route``, ``docker.service(..., strategy=sy.canary(...))``) writes weighted
``server`` lines instead (``server 127.0.0.1:8082 weight=10;``; a port at 0% is left out, and
one port at 100% gives the switch's file). Either writes the upstream file atomically (a
temporary file renamed over it), validates the whole configuration with ``nginx -t``, and
reloads with ``nginx -s reload``. If either command fails, the previous file is put back (or the
new one removed, if there was none) and the change fails, so nginx keeps sending traffic where
it did. nginx itself does the rest: a reload starts new workers with the new upstream and lets
the old ones finish their requests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

from shipyard.sdk import PipelineDefinitionError
from shipyard.sdk import StepFailed
from shipyard.sdk import hookimpl

if TYPE_CHECKING:
    from collections.abc import Callable

    from shipyard.sdk import ArtifactRow
    from shipyard.sdk import StepContext

#: Seconds ``nginx -t`` or ``nginx -s reload`` may take.
COMMAND_TIMEOUT: Final = 30.0
#: Seconds to wait for nginx to start workers with the new configuration (needs ``pid_file``).
RELOAD_TIMEOUT: Final = 10.0
#: Without access to nginx's /proc entries, seconds to allow old workers to stop accepting.
UNKNOWN_STATE_WAIT: Final = 0.5
_UPSTREAM_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
_SERVER_RE = re.compile(r"^\s*server\s+\S+?:(\d+)(?:\s+weight=(\d+))?\s*;", re.MULTILINE)
#: The artifact a weight change records: how to reach this nginx (``nginx:<service>``).
SPEC_ARTIFACT: Final = "nginx"


class NginxRouter:
    """Route a service's traffic by writing its nginx upstream and reloading nginx.

    :param conf_path: a directory (the file is ``<conf_path>/<service>.conf``) or the ``.conf``
        file to write. nginx must ``include`` it inside ``http { }``.
    :param reload_cmd: the reload command; ``[nginx, *args, "-s", "reload"]`` by default.
    :param test_cmd: the validation command; ``[nginx, *args, "-t", "-q"]`` by default.
    :param nginx: the nginx program.
    :param args: arguments for every nginx command, e.g. ``["-c", "/srv/nginx.conf", "-p",
        "/srv"]``, so that validation and reload address the same instance.
    :param upstream: the upstream's name; ``shipyard_<service>`` by default.
    :param host: the address of the containers, as nginx reaches them.
    :param pid_file: nginx's pid file. When given, a switch returns only once every new
        connection gets the new upstream (nginx runs new workers and the old ones stopped
        accepting; a reload is otherwise asynchronous), and fails if that never happens.
    """

    def __init__(
        self,
        conf_path: str | os.PathLike[str],
        reload_cmd: Sequence[str] | None = None,
        test_cmd: Sequence[str] | None = None,
        *,
        nginx: str = "nginx",
        args: Sequence[str] = (),
        upstream: str | None = None,
        host: str = "127.0.0.1",
        pid_file: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(conf_path, (str, os.PathLike)) or not os.fspath(conf_path):
            raise PipelineDefinitionError(
                f"nginx router: conf_path must be a directory or a .conf file, got {conf_path!r}"
            )
        for what, cmd in (("reload_cmd", reload_cmd), ("test_cmd", test_cmd), ("args", args)):
            if cmd is not None and (
                isinstance(cmd, str) or not all(isinstance(c, (str, os.PathLike)) for c in cmd)
            ):
                raise PipelineDefinitionError(
                    f"nginx router: {what} must be a list of strings, got {cmd!r}"
                )
        if upstream is not None and not _UPSTREAM_RE.match(upstream):
            raise PipelineDefinitionError(
                f"nginx router: upstream must be letters, digits, '_', '.' or '-', got {upstream!r}"
            )
        self.conf_path = Path(conf_path)
        base = [nginx, *(os.fspath(a) for a in args)]
        self.test_cmd = [os.fspath(c) for c in test_cmd] if test_cmd else [*base, "-t", "-q"]
        self.reload_cmd = (
            [os.fspath(c) for c in reload_cmd] if reload_cmd else [*base, "-s", "reload"]
        )
        self.upstream = upstream
        self.host = host
        self.pid_file = Path(pid_file) if pid_file is not None else None

    def __repr__(self) -> str:
        return f"<nginx router {os.fspath(self.conf_path)!r}>"

    def describe(self) -> str:
        """One line for ``plan``."""
        return f"nginx({os.fspath(self.conf_path)})"

    def path_for(self, service: str) -> Path:
        """The upstream file of ``service``."""
        if self.conf_path.suffix == ".conf" and not self.conf_path.is_dir():
            return self.conf_path
        return self.conf_path / f"{service}.conf"

    def upstream_for(self, service: str) -> str:
        return self.upstream or "shipyard_" + re.sub(r"[^A-Za-z0-9_.-]", "_", service)

    def render(self, service: str, port: int) -> str:
        """The upstream file that sends ``service`` to ``port`` (also to create it by hand)."""
        return (
            f"# Written by Shipyard for the service {service!r}; do not edit: the next\n"
            f"# deployment replaces it.\n"
            f"upstream {self.upstream_for(service)} {{\n"
            f"    server {self.host}:{port};\n"
            f"}}\n"
        )

    def render_weights(self, service: str, weights: Mapping[int, int]) -> str:
        """The upstream file that splits ``service`` by ``weights`` (port -> percent).

        Ports at 0 are left out; one port at 100 gives exactly :meth:`render`'s file, so a
        canary that reached 100 and a switch leave nginx in the same state.
        """
        live = [(port, w) for port, w in weights.items() if w > 0]
        if len(live) == 1:
            return self.render(service, live[0][0])
        lines = "".join(f"    server {self.host}:{port} weight={w};\n" for port, w in live)
        return (
            f"# Written by Shipyard for the service {service!r}; do not edit: the next\n"
            f"# deployment replaces it.\n"
            f"upstream {self.upstream_for(service)} {{\n{lines}}}\n"
        )

    def current_weights(self, service: str) -> dict[int, int] | None:
        """The weights the upstream file of ``service`` holds now; None if it has none (or
        was not written by Shipyard)."""
        try:
            text = self.path_for(service).read_text()
        except OSError:
            return None
        found = {int(p): int(w or 1) for p, w in _SERVER_RE.findall(text)}
        if len(found) == 1:  # a switch's file: one server, without weight=
            return {port: 100 for port in found}
        return found if found and sum(found.values()) == 100 else None

    def spec(self) -> dict[str, Any]:
        """What a repair needs to drive this nginx without the pipelines file (JSON)."""
        return {
            "conf_path": os.fspath(self.conf_path),
            "test_cmd": self.test_cmd,
            "reload_cmd": self.reload_cmd,
            "upstream": self.upstream,
            "host": self.host,
            "pid_file": os.fspath(self.pid_file) if self.pid_file is not None else None,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> NginxRouter:
        return cls(
            spec["conf_path"],
            spec["reload_cmd"],
            spec["test_cmd"],
            upstream=spec.get("upstream"),
            host=spec.get("host", "127.0.0.1"),
            pid_file=spec.get("pid_file"),
        )

    async def switch(self, service: str, port: int, context: StepContext) -> bool:
        """Point ``service`` at ``port``: write, ``nginx -t``, reload; restore on failure."""
        path = self.path_for(service)
        done = await self._apply(path, self.render(service, port), context)
        context.log(
            f"nginx: {path} already sends {service} to port {port}"
            if not done
            else f"nginx: {self.upstream_for(service)} -> {self.host}:{port} ({path}), reloaded",
            "shipyard",
        )
        return True

    async def set_weights(
        self, service: str, weights: Mapping[int, int], context: StepContext
    ) -> bool:
        """Split ``service`` by ``weights``: write, ``nginx -t``, reload; restore on failure."""
        import json

        path = self.path_for(service)
        # A repair (another process, no pipelines file) must be able to drive this nginx.
        context.record_artifact(
            f"{SPEC_ARTIFACT}:{service}", json.dumps({"service": service, **self.spec()})
        )
        shown = ", ".join(f"{self.host}:{p} {w}%" for p, w in weights.items())
        done = await self._apply(path, self.render_weights(service, weights), context)
        context.log(
            f"nginx: {path} already splits {service} as {shown}"
            if not done
            else f"nginx: {self.upstream_for(service)} -> {shown} ({path}), reloaded",
            "shipyard",
        )
        return True

    async def _apply(self, path: Path, text: str, context: StepContext) -> bool:
        """Make ``path`` hold ``text`` and nginx run it; False if it already did."""
        try:
            previous: bytes | None = path.read_bytes()
        except FileNotFoundError:
            previous = None
        if previous == text.encode():
            return False
        workers = self._workers()
        _write_atomically(path, text.encode())
        try:
            await self._run(self.test_cmd, "validate the configuration")
            await self._run(self.reload_cmd, "reload")
            if workers is not None:
                await self._wait_for_new_workers(workers)
        except BaseException:
            _restore(path, previous)
            context.log(f"nginx: restored the previous {path}", "shipyard")
            raise
        return True

    def apply_blocking(self, path: Path, text: str) -> bool:
        """:meth:`_apply` without an event loop, for a repair; False if nothing changed."""
        import asyncio

        class _Quiet:
            def log(self, text: str, stream: str = "stdout") -> None:
                pass

        quiet: Any = _Quiet()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._apply(path, text, quiet))
        # Called on a thread that runs an event loop: run ours on a thread of its own.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self._apply(path, text, quiet)).result()

    async def _run(self, argv: list[str], what: str) -> None:
        import asyncio

        shown = " ".join(argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            raise StepFailed(
                f"cannot run {shown!r} to {what}: {exc.strerror or exc}; is nginx installed "
                "(pass nginx='/path/to/nginx')?"
            ) from None
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                out, _ = await proc.communicate()
        except BaseException as exc:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if isinstance(exc, TimeoutError):
                raise StepFailed(
                    f"`{shown}` did not {what} within {COMMAND_TIMEOUT:g}s and was killed; the "
                    "previous upstream file was restored"
                ) from None
            raise
        if proc.returncode != 0:
            lines = out.decode("utf-8", "replace").strip().splitlines()[-10:]
            detail = "\n".join(f"  {ln}" for ln in lines)
            raise StepFailed(
                f"`{shown}` failed to {what} (exit code {proc.returncode}); the previous upstream "
                "file was restored" + (f":\n{detail}" if detail else "")
            )

    def _workers(self) -> set[int] | None:
        """The pids of nginx's current workers, when the pid file tells where its master is."""
        if self.pid_file is None:
            return None
        try:
            master = int(self.pid_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise StepFailed(
                f"cannot read nginx's pid file {os.fspath(self.pid_file)!r}: {exc}; "
                "is nginx running?"
            ) from None
        return set(_children(master))

    async def _wait_for_new_workers(self, before: set[int]) -> None:
        # `nginx -s reload` only signals the master. The new upstream is live for every new
        # connection once the master runs new workers and the old ones have closed their
        # listening sockets (they keep serving the requests they have, then exit).
        import asyncio

        assert self.pid_file is not None
        master = int(self.pid_file.read_text().strip())
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < RELOAD_TIMEOUT:
            children = set(_children(master))
            if children - before:
                old = children & before
                if not old:
                    return
                accepting = _holding_listeners(old)
                if accepting is None:
                    # /proc of nginx's workers is not readable (another user): give the old
                    # workers a moment to stop accepting, which takes milliseconds.
                    if loop.time() - start > UNKNOWN_STATE_WAIT:
                        return
                elif not accepting:
                    return
            await asyncio.sleep(0.01)
        raise StepFailed(
            f"nginx (pid {master}) did not switch to the new configuration within "
            f"{RELOAD_TIMEOUT:g}s of the reload; see its error log"
        )


def _write_atomically(path: Path, data: bytes) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _restore(path: Path, previous: bytes | None) -> None:
    if previous is None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    else:
        _write_atomically(path, previous)


def _listening_inodes() -> set[str]:
    """Socket inodes of the host's listening TCP sockets (Linux ``/proc/net/tcp*``)."""
    found = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                found.add(fields[9])
    return found


def _holding_listeners(pids: set[int]) -> bool | None:
    """Whether any of ``pids`` still holds a listening socket; None if that cannot be read."""
    listening = _listening_inodes()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue  # exited meanwhile
        except PermissionError:
            return None
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listening:
                return True
    return False


def _children(pid: int) -> list[int]:
    """Pids of the live child processes of ``pid`` (Linux ``/proc``)."""
    from shipyard.sdk import children

    return children(pid)


nginx = NginxRouter


@hookimpl(trylast=True)
def shipyard_router_switch(
    router: Any, service: str, port: int, context: StepContext
) -> Any:  # Any: an awaitable of True, or None for routers that are not ours
    if isinstance(router, NginxRouter):
        return router.switch(service, port, context)
    return None


@hookimpl(trylast=True)
def shipyard_router_weights(
    router: Any, service: str, weights: Mapping[int, int], context: StepContext
) -> Any:  # Any: an awaitable of True, or None for routers that are not ours
    if isinstance(router, NginxRouter):
        return router.set_weights(service, weights, context)
    return None


@hookimpl
def shipyard_cleanup_interrupted(artifacts: list[ArtifactRow], log: Callable[[str], None]) -> None:
    """Put back the weights a killed weight change left uncertain (``route:<service>``).

    Each step that changed weights through this router recorded how to reach nginx
    (``nginx:<service>``) and, before each change, the weights to settle on if it is killed
    (``settle`` in ``route:<service>``); they are written again, validated and reloaded.
    """
    import json

    routes = {(a["stage_idx"], a["step_idx"], a["name"]): a for a in artifacts}
    for a in artifacts:
        if not a["name"].startswith(SPEC_ARTIFACT + ":"):
            continue
        spec = json.loads(a["content"])
        service = spec["service"]
        route = routes.get((a["stage_idx"], a["step_idx"], f"route:{service}"))
        if route is None:
            continue
        settle = json.loads(route["content"]).get("settle")
        if not settle:
            continue
        weights = {int(p): int(w) for p, w in settle.items()}
        router = NginxRouter.from_spec(spec)
        path = router.path_for(service)
        shown = ", ".join(f"{router.host}:{p} {w}%" for p, w in weights.items())
        try:
            changed = router.apply_blocking(path, router.render_weights(service, weights))
        except Exception as exc:
            text = exc.message if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"
            log(f"nginx could not put {service} back on {shown}: {text}")
            continue
        log(
            f"nginx sends {service} to {shown} again ({path}, reloaded)"
            if changed
            else f"nginx already sends {service} to {shown} ({path})"
        )
