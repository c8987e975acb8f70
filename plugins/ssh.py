"""Deploying to a fleet over SSH: host groups, remote commands, uploads, rolling batches (#16).

``hosts(name, [...])`` declares a group; ``ssh(program, *args, hosts=...)``, ``upload(local,
remote, hosts=...)`` and ``ssh.symlink_switch(hosts=...)`` are steps that act on every host of
their selection, a batch at a time (``batch=``, ``max_failures=``, ``bake=``, ``health_check=``,
``rollback="auto"``).

asyncssh is imported only by the functions that connect. One connection per host is opened
(concurrently, at most ``connections`` at once) the first time a deployment's step needs it and
reused by the deployment's later steps; the pool is closed when the deployment finishes
(``shipyard_deployment_finished``). Host keys are checked against ``known_hosts``.

Each host step's per-host outcome (status, attempt, times, exit code, last output) is kept as the
step's artifact ``hosts`` (JSON, host -> result), through :meth:`StepContext.record_artifact`.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections import deque
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

from shipyard.sdk import Step
from shipyard.sdk import StepFailed
from shipyard.sdk import StepResult
from shipyard.sdk import hookimpl
from shipyard.sdk import reject_unknown_options

if TYPE_CHECKING:
    import asyncio

    from shipyard.sdk import DeploymentFinished
    from shipyard.sdk import StepContext
    from shipyard.sdk import StepTypeRegistry

#: Lines of a host's output kept for its result and error message.
_TAIL = 10
#: Seconds a remote command gets to end after SIGTERM on cancel before its channel is closed.
_SIGNAL_GRACE = 2.0


def _definition_error(message: str) -> Exception:
    from shipyard.sdk import PipelineDefinitionError

    return PipelineDefinitionError(message)


# -------------------------------------------------------------------------------------------------
# Hosts
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One SSH host: where to connect and how it is grouped."""

    address: str
    port: int = 22
    user: str | None = None
    group: str = ""
    region: str | None = None
    tags: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How output and history name the host: its address (with the port unless 22)."""
        return self.address if self.port == 22 else f"{self.address}:{self.port}"


def _parse_host(spec: str, user: str | None, port: int) -> tuple[str, str | None, int]:
    """``[user@]address[:port]`` (``[v6]:port`` for IPv6) into its parts."""
    if "@" in spec:
        user, spec = spec.rsplit("@", 1)
    if spec.startswith("["):
        address, _, rest = spec[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif spec.count(":") == 1:
        address, port_text = spec.split(":")
        port = int(port_text)
    else:
        address = spec
    return address, user, port


class HostGroup:
    """A named group of hosts, as ``hosts(name, [...])`` returns it; a step's ``hosts=``."""

    def __init__(
        self,
        name: str,
        addresses: Iterable[str],
        *,
        region: str | None = None,
        user: str | None = None,
        port: int = 22,
        tags: Iterable[str] = (),
    ) -> None:
        if not isinstance(name, str) or not name:
            raise _definition_error(f"hosts: the group name must be a non-empty string: {name!r}")
        if isinstance(addresses, str):
            raise _definition_error(f"hosts {name!r}: give a list of addresses, not one string")
        self.name = name
        self.region = region
        self.tags = tuple(tags)
        members = []
        for spec in addresses:
            try:
                address, host_user, host_port = _parse_host(str(spec), user, port)
            except ValueError:
                raise _definition_error(
                    f"hosts {name!r}: bad address {spec!r}; write [user@]address[:port]"
                ) from None
            members.append(Host(address, host_port, host_user, name, region, self.tags))
        if not members:
            raise _definition_error(f"hosts {name!r}: the group has no host")
        self.hosts: tuple[Host, ...] = tuple(members)
        _GROUPS[name] = self

    def __repr__(self) -> str:
        return f"<hosts {self.name!r}: {len(self.hosts)} host(s)>"

    def describe(self) -> str:
        where = f" region={self.region}" if self.region else ""
        tags = f" tags={','.join(self.tags)}" if self.tags else ""
        return f"{self.name}[{', '.join(h.label for h in self.hosts)}]{where}{tags}"


#: Groups by name, as declared (the latest declaration of a name wins): ``hosts="web"``,
#: ``hosts="region:eu"``, ``hosts="tag:canary"`` look here.
_GROUPS: dict[str, HostGroup] = {}

hosts = HostGroup

_Selection = HostGroup | Host | str | Sequence["HostGroup | Host | str"]


def select(selection: _Selection, label: str) -> list[Host]:
    """The hosts a step's ``hosts=`` names: groups, hosts, or ``"NAME"``, ``"region:R"``,
    ``"tag:T"`` strings; in order, each host once."""
    items = [selection] if isinstance(selection, (HostGroup, Host, str)) else list(selection)
    found: list[Host] = []
    for item in items:
        if isinstance(item, HostGroup):
            found += item.hosts
        elif isinstance(item, Host):
            found.append(item)
        elif isinstance(item, str):
            kind, _, value = item.partition(":") if ":" in item else ("group", "", item)
            groups = list(_GROUPS.values())
            if kind == "group":
                found += [h for g in groups if g.name == value for h in g.hosts]
            elif kind == "region":
                found += [h for g in groups for h in g.hosts if h.region == value]
            elif kind == "tag":
                found += [h for g in groups for h in g.hosts if value in h.tags]
            else:
                raise _definition_error(
                    f"{label}: bad host selection {item!r}; use a group name, "
                    "'region:NAME' or 'tag:NAME'"
                )
        else:
            raise _definition_error(f"{label}: hosts= takes host groups, not {item!r}")
    unique = list(dict.fromkeys(found))
    if not unique:
        known = ", ".join(sorted(_GROUPS)) or "none"
        raise _definition_error(
            f"{label}: hosts={selection!r} selects no host (groups declared: {known})"
        )
    return unique


def _count(value: int | str | None, total: int, what: str, label: str, default: int) -> int:
    """A count or ``"NN%"`` of ``total`` (rounded up for batches, down for failures)."""
    if value is None:
        return default
    if isinstance(value, str) and value.endswith("%"):
        try:
            pct = float(value[:-1])
        except ValueError:
            pct = -1
        if not 0 <= pct <= 100:
            raise _definition_error(f"{label}: {what}={value!r} is not a percentage 0-100%")
        share = total * pct / 100
        return max(1, -int(-share // 1)) if what == "batch" else int(share)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < (1 if what == "batch" else 0)
    ):
        raise _definition_error(f"{label}: {what}= takes a count or 'NN%', got {value!r}")
    return value


# -------------------------------------------------------------------------------------------------
# Connections: one per host per deployment
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Connect:
    """How to connect: host key checking, client keys, timeouts."""

    known_hosts: str | None
    client_keys: tuple[str, ...] | None
    connect_timeout: float
    keepalive: float


class _Pool:
    """The connections of one deployment, opened on first use, closed at its end."""

    def __init__(self) -> None:
        self.connections: dict[Host, Any] = {}
        self.opening: dict[Host, asyncio.Future[Any]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    async def get(self, host: Host, how: _Connect, limit: asyncio.Semaphore) -> Any:
        import asyncio

        self.loop = asyncio.get_running_loop()
        conn = self.connections.get(host)
        if conn is not None and not conn.is_closed():
            return conn
        pending = self.opening.get(host)
        if pending is None:
            pending = self.opening[host] = asyncio.ensure_future(_open(host, how, limit))
        try:
            conn = await asyncio.shield(pending)
        finally:
            if pending.done():
                self.opening.pop(host, None)
        self.connections[host] = conn
        return conn

    def close(self) -> None:
        for conn in self.connections.values():
            if self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(conn.close)
            else:
                conn.close()
        self.connections.clear()


#: Connection pools by deployment (pipeline, environment, id).
_POOLS: dict[tuple[str, str, int], _Pool] = {}


def _pool_for(context: StepContext) -> _Pool:
    d = context.deployment
    return _POOLS.setdefault((d.pipeline, d.environment, d.id), _Pool())


@hookimpl
def shipyard_deployment_finished(event: DeploymentFinished) -> None:
    d = event.deployment
    pool = _POOLS.pop((d.pipeline, d.environment, d.id), None)
    if pool is not None:
        pool.close()


def _known_entries(path: str, host: Host) -> bool:
    """Whether ``known_hosts`` has a (plain, unhashed) entry for the host."""
    names = {f"[{host.address}]:{host.port}"} | ({host.address} if host.port == 22 else set())
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3 and names & set(fields[0].split(",")):
                    return True
    except OSError:
        return False
    return False


async def _open(host: Host, how: _Connect, limit: asyncio.Semaphore) -> Any:
    import asyncio

    import asyncssh

    options: dict[str, Any] = {
        "port": host.port,
        "known_hosts": how.known_hosts,
        "connect_timeout": how.connect_timeout,
        "keepalive_interval": how.keepalive,
        "keepalive_count_max": 3,
    }
    if host.user:
        options["username"] = host.user
    if how.client_keys is not None:
        options["client_keys"] = list(how.client_keys)
        options["agent_path"] = None
    async with limit:
        try:
            return await asyncssh.connect(host.address, **options)
        except asyncssh.HostKeyNotVerifiable:
            fingerprint = "?"
            try:
                key = await asyncio.wait_for(
                    asyncssh.get_server_host_key(host.address, host.port), how.connect_timeout
                )
                if key is not None:
                    fingerprint = key.get_fingerprint()
            except (OSError, TimeoutError, asyncssh.Error):
                pass
            assert how.known_hosts is not None
            what = "changed" if _known_entries(how.known_hosts, host) else "unknown"
            raise StepFailed(
                f"host {host.label}: host key {fingerprint} is {what} "
                f"(known_hosts {how.known_hosts}); "
                + (
                    "it does not match the recorded key: check the host before trusting it"
                    if what == "changed"
                    else "add the host's key to known_hosts (ssh-keyscan, then check it)"
                )
            ) from None
        except asyncssh.PermissionDenied as exc:
            raise StepFailed(
                f"host {host.label}: login as {host.user or 'the current user'} refused "
                f"({exc.reason}); check the user and the keys (agent or client_keys=)"
            ) from None
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            raise StepFailed(f"host {host.label}: cannot connect: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return str(text)


# -------------------------------------------------------------------------------------------------
# Running remote commands
# -------------------------------------------------------------------------------------------------


@dataclass
class _HostRun:
    """What one host did in one step (kept in the step's ``hosts`` artifact)."""

    status: str = "not touched"
    attempt: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    error: str | None = None
    last_output: list[str] | None = None
    previous: str | None = None

    def as_json(self) -> dict[str, Any]:
        from shipyard.sdk import mask

        def ts(t: float | None) -> str | None:
            if t is None:
                return None
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"

        return {
            "status": self.status, "attempt": self.attempt,
            "started_at": ts(self.started_at), "finished_at": ts(self.finished_at),
            "exit_code": self.exit_code, "error": mask(self.error) if self.error else None,
            "last_output": [mask(t) for t in (self.last_output or [])],
        }  # fmt: skip


def remote_command(
    argv: Sequence[str], env: Mapping[str, str], cwd: str | None, shell: bool
) -> str:
    """The command line the remote side runs: ``env`` sets the variables and the folder, and
    ``exec`` replaces the login shell, so that a signal over the channel reaches the program.
    Every argument is quoted (shlex.quote) unless ``shell=True`` asks for the remote shell."""
    prefix = ["env"]
    if cwd:
        prefix += ["-C", cwd]
    prefix += [f"{k}={v}" for k, v in env.items()]
    head = " ".join(shlex.quote(p) for p in prefix)
    if shell:
        body = " ".join(argv)
        return f"exec {head} /bin/sh -c {shlex.quote(body)}"
    return f"exec {head} " + " ".join(shlex.quote(a) for a in argv)


async def run_remote(
    conn: Any, host: Host, command: str, context: StepContext, run: _HostRun
) -> int:
    """Run ``command`` on ``host``, each output line logged as ``host | line``; the exit code.

    A cancel sends SIGTERM over the channel, waits a moment, then closes the channel."""
    import asyncio

    import asyncssh

    tail: deque[str] = deque(maxlen=_TAIL)
    proc = await conn.create_process(command, stdin=asyncssh.DEVNULL, errors="replace")

    async def pump(stream: Any, name: str) -> None:
        async for line in stream:
            text = line.rstrip("\r\n")
            tail.append(text)
            context.log(f"{host.label} | {text}", name)

    pumps = [
        asyncio.ensure_future(pump(proc.stdout, "stdout")),
        asyncio.ensure_future(pump(proc.stderr, "stderr")),
    ]
    try:
        completed = await proc.wait()
        await asyncio.gather(*pumps)
    except asyncio.CancelledError:
        try:
            proc.send_signal("TERM")
            await asyncio.wait_for(proc.wait_closed(), _SIGNAL_GRACE)
        except (asyncssh.Error, OSError, TimeoutError):
            pass
        finally:
            proc.close()
            for p in pumps:
                p.cancel()
        raise
    except (asyncssh.Error, OSError) as exc:
        for p in pumps:
            p.cancel()
        run.last_output = list(tail)
        raise StepFailed(f"host {host.label}: connection lost: {_reason(exc)}") from None
    run.last_output = list(tail)
    code = completed.exit_status
    if code is None:
        code = -1
    return int(code)


# -------------------------------------------------------------------------------------------------
# The steps: a rolling engine and what it runs on each host
# -------------------------------------------------------------------------------------------------

_Action = Callable[[Any, Host, "StepContext", _HostRun], Awaitable[None]]


class FleetStep(Step):
    """Something done on every host of a selection, a batch at a time; see the module docstring."""

    kind = "ssh.fleet"

    def _fleet_options(
        self,
        label: str,
        *,
        hosts: _Selection | None,
        batch: int | str | None = None,
        max_failures: int | str | None = 0,
        bake: float = 0,
        health_check: str | None = None,
        health_timeout: float = 30,
        rollback: str | None = None,
        known_hosts: str | os.PathLike[str] | None = None,
        insecure_no_host_key_check: bool = False,
        client_keys: Sequence[str | os.PathLike[str]] | None = None,
        connect_timeout: float = 15,
        keepalive: float = 5,
        host_timeout: float | None = None,
        connections: int = 32,
    ) -> None:
        if hosts is None:
            raise _definition_error(f"{label}: hosts= is required (a hosts(...) group)")
        self.hosts = select(hosts, label)
        n = len(self.hosts)
        self.batch = _count(batch, n, "batch", label, n)
        self.max_failures = _count(max_failures, n, "max_failures", label, 0)
        if rollback not in (None, "auto"):
            raise _definition_error(f"{label}: rollback= is 'auto' or None, got {rollback!r}")
        self.rollback = rollback
        if not isinstance(bake, (int, float)) or bake < 0:
            raise _definition_error(f"{label}: bake= takes seconds >= 0, got {bake!r}")
        self.bake = float(bake)
        self.probe = None
        if health_check is not None:
            from shipyard.sdk import HttpProbe

            if "{host}" not in health_check:
                raise _definition_error(f"{label}: health_check URL needs '{{host}}' in it")
            self.health_url = health_check
            self.probe = HttpProbe(
                health_check.replace("{host}", "127.0.0.1"), timeout=health_timeout,
                label=f"{label} health check",
            )  # fmt: skip
        if insecure_no_host_key_check and known_hosts is not None:
            raise _definition_error(
                f"{label}: known_hosts= and insecure_no_host_key_check=True contradict each other"
            )
        self.insecure = bool(insecure_no_host_key_check)
        self.known_hosts = (
            None
            if self.insecure
            else os.fspath(known_hosts)
            if known_hosts is not None
            else "~/.ssh/known_hosts"
        )
        self.client_keys = None if client_keys is None else tuple(map(os.fspath, client_keys))
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.host_timeout = host_timeout
        if not isinstance(connections, int) or connections < 1:
            raise _definition_error(f"{label}: connections= takes a count >= 1")
        self.connections = connections

    def _rolling_text(self) -> str:
        parts = [f"on {len(self.hosts)} host(s): {', '.join(h.label for h in self.hosts)}"]
        if self.batch < len(self.hosts):
            parts.append(f"batch={self.batch}")
        if self.max_failures:
            parts.append(f"max_failures={self.max_failures}")
        if self.bake:
            parts.append(f"bake={self.bake:g}s")
        if self.rollback:
            parts.append(f"rollback={self.rollback}")
        if self.insecure:
            parts.append("HOST KEYS NOT CHECKED")
        return "; ".join(parts)

    def plan_details(self, deployment: Any, rootdir: Any) -> list[str]:
        groups: dict[str, list[str]] = {}
        for h in self.hosts:
            groups.setdefault(h.group + (f" (region {h.region})" if h.region else ""), []).append(
                h.label
            )
        return [f"hosts {name}: {', '.join(labels)}" for name, labels in groups.items()]

    # -- what subclasses provide ------------------------------------------------------------

    async def apply(self, conn: Any, host: Host, context: StepContext, run: _HostRun) -> None:
        raise NotImplementedError

    async def revert(self, conn: Any, host: Host, context: StepContext, run: _HostRun) -> None:
        """Undo :meth:`apply` on one host (``rollback="auto"``)."""
        raise StepFailed(f"{self.kind} steps cannot be rolled back")

    # -- the rolling engine ------------------------------------------------------------------

    def _connect_options(self, context: StepContext) -> _Connect:
        known = self.known_hosts
        if known is not None:
            known = os.path.expanduser(known)
            if not os.path.isabs(known):
                known = str(context.rootdir / known)
        return _Connect(known, self.client_keys, self.connect_timeout, self.keepalive)

    async def _on_host(
        self, action: _Action, host: Host, context: StepContext, run: _HostRun,
        how: _Connect, limit: asyncio.Semaphore,
    ) -> bool:  # fmt: skip
        import asyncio

        run.attempt = context.attempt
        run.started_at = time.time()
        run.status = "running"
        try:
            async with asyncio.timeout(self.host_timeout):
                conn = await _pool_for(context).get(host, how, limit)
                await action(conn, host, context, run)
                if self.probe is not None and action == self.apply:
                    from shipyard.sdk import probe_until_healthy

                    url = self.health_url.replace("{host}", host.address)
                    await probe_until_healthy(
                        self.probe, url, lambda t: context.log(f"{host.label} | {t}", "shipyard"),
                        resolve=context.resolve,
                    )  # fmt: skip
        except TimeoutError:
            run.status, run.error = "failed", f"timed out after {self.host_timeout:g}s"
        except StepFailed as exc:
            run.status, run.error = "failed", exc.message
            if exc.step_exit_code is not None:
                run.exit_code = exc.step_exit_code
        except asyncio.CancelledError:
            run.status, run.error, run.finished_at = "cancelled", "cancelled", time.time()
            raise
        except Exception as exc:  # a host's failure is that host's: the rollout decides
            run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            run.status = "succeeded"
        run.finished_at = time.time()
        if run.status == "failed":
            context.log(f"{host.label} | FAILED: {run.error}", "shipyard")
        return run.status == "succeeded"

    async def run(self, context: StepContext) -> StepResult:
        import asyncio

        if self.insecure:
            context.log(
                "WARNING: host keys are NOT verified (insecure_no_host_key_check=True): "
                "anyone on the network path can impersonate these hosts",
                "shipyard",
            )
        how = self._connect_options(context)
        limit = asyncio.Semaphore(self.connections)
        runs = {h: _HostRun() for h in self.hosts}
        updated: list[Host] = []
        failed: list[Host] = []
        stopped: str | None = None
        batches = [self.hosts[i : i + self.batch] for i in range(0, len(self.hosts), self.batch)]
        try:
            for bi, batch in enumerate(batches):
                if bi and self.bake:
                    context.log(f"baking {self.bake:g}s before batch {bi + 1}", "shipyard")
                    await asyncio.sleep(self.bake)
                if len(batches) > 1:
                    context.log(
                        f"batch {bi + 1}/{len(batches)}: {', '.join(h.label for h in batch)}",
                        "shipyard",
                    )
                oks = await asyncio.gather(
                    *(self._on_host(self.apply, h, context, runs[h], how, limit) for h in batch)
                )
                for h, ok in zip(batch, oks, strict=True):
                    (updated if ok else failed).append(h)
                if len(failed) > self.max_failures:
                    untouched = [h.label for b in batches[bi + 1 :] for h in b]
                    stopped = (
                        f"{len(failed)} host(s) failed ({', '.join(h.label for h in failed)}), "
                        f"more than max_failures={self.max_failures}: rollout stopped"
                        + (f"; not touched: {', '.join(untouched)}" if untouched else "")
                    )
                    context.log(stopped, "shipyard")
                    break
            if stopped and self.rollback == "auto" and updated:
                context.log(
                    f"rolling back {len(updated)} updated host(s): "
                    + ", ".join(h.label for h in updated),
                    "shipyard",
                )
                back = await asyncio.gather(
                    *(
                        self._on_host(self.revert, h, context, _HostRun(), how, limit)
                        for h in updated
                    )
                )
                for h, ok in zip(updated, back, strict=True):
                    runs[h].status = "rolled back" if ok else "rollback failed"
                stopped += "; rolled back: " + ", ".join(
                    h.label for h in updated if runs[h].status == "rolled back"
                )
        finally:
            context.record_artifact(
                "hosts", json.dumps({h.label: r.as_json() for h, r in runs.items()}, indent=1)
            )
        if stopped:
            first = runs[failed[0]]
            raise StepFailed(
                f"{stopped}; {failed[0].label}: {first.error}",
                step_exit_code=first.exit_code,
                output=[f"{h.label} | {t}" for h in failed for t in runs[h].last_output or []],
            )
        if failed:
            context.log(
                f"{len(failed)} host(s) failed, within max_failures={self.max_failures}: "
                + ", ".join(h.label for h in failed),
                "shipyard",
            )
        return StepResult(exit_code=0)


_FLEET_OPTIONS = (
    "batch", "max_failures", "bake", "health_check", "health_timeout", "rollback",
    "known_hosts", "insecure_no_host_key_check", "client_keys", "connect_timeout", "keepalive",
    "host_timeout", "connections",
)  # fmt: skip


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    step = {k: options.pop(k) for k in ("name", "timeout", "retries") if k in options}
    fleet = {k: options.pop(k) for k in _FLEET_OPTIONS if k in options}
    return step, fleet


class SshStep(FleetStep):
    """Run ``program`` with ``args`` on every host; a non-zero exit fails that host."""

    kind = "ssh"

    def __init__(
        self,
        program: str,
        *args: Any,
        hosts: _Selection | None = None,
        env: Mapping[str, Any] | None = None,
        cwd: str | None = None,
        shell: bool = False,
        undo: Sequence[Any] | None = None,
        **options: Any,
    ) -> None:
        step_options, fleet = _split_options(options)
        reject_unknown_options(self, options)
        if not isinstance(program, str) or not program:
            raise _definition_error(
                f"ssh step: the program must be a non-empty string: {program!r}"
            )
        self.program = program
        self.args = [a if isinstance(a, str) else str(a) for a in args]
        self.env = dict(env or {})
        self.cwd = cwd
        self.shell = shell
        self.undo = list(undo) if undo is not None else None
        super().__init__(**step_options)
        self._fleet_options("ssh step", hosts=hosts, **fleet)
        if self.rollback == "auto" and self.undo is None:
            raise _definition_error("ssh step: rollback='auto' needs undo=[program, *args]")

    def default_name(self) -> str:
        text = "ssh " + " ".join([self.program, *map(str, self.args)])
        return text if len(text) <= 60 else text[:57] + "..."

    def describe(self) -> str:
        argv = shlex.join([self.program, *map(str, self.args)])
        return f"{argv}  ({self._rolling_text()}{'; shell=True' if self.shell else ''})"

    def _command(self, argv: Sequence[Any], context: StepContext) -> str:
        env = {**context.deployment_env, **context.process_env}
        env.update({str(k): str(v) for k, v in context.resolve(self.env).items()})
        resolved = [str(a) for a in context.resolve(list(argv))]
        return remote_command(resolved, env, self.cwd, self.shell)

    async def _exec(
        self, argv: Sequence[Any], conn: Any, host: Host, context: StepContext, run: _HostRun
    ) -> None:
        code = await run_remote(conn, host, self._command(argv, context), context, run)
        run.exit_code = code
        if code != 0:
            tail = "".join(f"\n  {t}" for t in (run.last_output or [])[-5:])
            raise StepFailed(
                f"host {host.label}: {argv[0]} exited with {code}"
                + (f"; last output:{tail}" if tail else ""),
                step_exit_code=code,
            )

    async def apply(self, conn: Any, host: Host, context: StepContext, run: _HostRun) -> None:
        await self._exec([self.program, *self.args], conn, host, context, run)

    async def revert(self, conn: Any, host: Host, context: StepContext, run: _HostRun) -> None:
        assert self.undo is not None
        await self._exec(self.undo, conn, host, context, run)


class UploadStep(FleetStep):
    """Copy a local file to every host over SFTP: written under a temporary name, then renamed."""

    kind = "ssh.upload"

    def __init__(
        self,
        local: str | os.PathLike[str],
        remote: str,
        *,
        hosts: _Selection | None = None,
        mode: int | None = None,
        **options: Any,
    ) -> None:
        step_options, fleet = _split_options(options)
        reject_unknown_options(self, options)
        self.local = os.fspath(local)
        self.remote = remote
        self.mode = mode
        super().__init__(**step_options)
        self._fleet_options("upload step", hosts=hosts, **fleet)

    def default_name(self) -> str:
        return f"upload {self.local} -> {self.remote}"

    def describe(self) -> str:
        mode = f"; mode={self.mode:o}" if self.mode is not None else ""
        return f"{self.local} -> {self.remote}  ({self._rolling_text()}{mode})"

    async def apply(self, conn: Any, host: Host, context: StepContext, run: _HostRun) -> None:
        import asyncssh

        local = context.rootdir / self.local
        if not local.is_file():
            raise StepFailed(f"upload: {local} is not a file")
        remote = self.remote.replace("${DEPLOYMENT_VERSION}", context.deployment.version)
        tmp = f"{remote}.shipyard-{os.getpid()}-{context.deployment.id}.tmp"
        try:
            async with conn.start_sftp_client() as sftp:
                await sftp.put(str(local), tmp)
                if self.mode is not None:
                    await sftp.chmod(tmp, self.mode)
                await sftp.posix_rename(tmp, remote)
        except (asyncssh.Error, OSError) as exc:
            raise StepFailed(
                f"host {host.label}: upload to {remote} failed: {_reason(exc)}"
            ) from None
        context.log(f"{host.label} | uploaded {self.local} -> {remote}", "shipyard")
        run.exit_code = 0


class SymlinkSwitch(SshStep):
    """Point ``current`` at ``releases/<version>`` on every host, atomically (``ln -s`` under a
    temporary name, then ``mv -T``); rolled back by pointing it at what it pointed at before."""

    kind = "ssh.symlink_switch"

    def __init__(
        self,
        *,
        releases: str = "releases",
        current: str = "current",
        release: str | None = None,
        hosts: _Selection | None = None,
        **options: Any,
    ) -> None:
        self.releases = releases.rstrip("/")
        self.current = current
        self.release = release
        self._previous: dict[tuple[int, Host], str | None] = {}
        super().__init__("ln", hosts=hosts, undo=[], **options)

    def default_name(self) -> str:
        return f"switch {self.current} -> {self.releases}/<version>"

    def describe(self) -> str:
        release = self.release or "${DEPLOYMENT_VERSION}"
        return f"{self.current} -> {self.releases}/{release}  ({self._rolling_text()})"

    async def _point(
        self, target: str, conn: Any, host: Host, context: StepContext, run: _HostRun
    ) -> None:
        tmp = f"{self.current}.shipyard-tmp"
        await self._exec(["ln", "-sfn", target, tmp], conn, host, context, run)
        await self._exec(["mv", "-T", tmp, self.current], conn, host, context, run)

    async def apply(self, conn: Any, host: Host, context: StepContext, run: _HostRun) -> None:
        release = self.release or context.deployment.version
        target = f"{self.releases}/{release}"
        check = await conn.run(
            "test -d " + shlex.quote(target) + " && readlink " + shlex.quote(self.current)
            + " ; test -d " + shlex.quote(target), check=False,
        )  # fmt: skip
        if check.exit_status != 0:
            raise StepFailed(f"host {host.label}: release folder {target} does not exist")
        previous = str(check.stdout).strip() or None
        self._previous[(context.deployment.id, host)] = previous
        await self._point(target, conn, host, context, run)
        context.log(
            f"{host.label} | {self.current} -> {target} (was {previous or 'nothing'})", "shipyard"
        )

    async def revert(self, conn: Any, host: Host, context: StepContext, run: _HostRun) -> None:
        previous = self._previous.get((context.deployment.id, host))
        if previous is None:
            await self._exec(["rm", "-f", self.current], conn, host, context, run)
        else:
            await self._point(previous, conn, host, context, run)
        context.log(f"{host.label} | {self.current} back to {previous or 'nothing'}", "shipyard")


class _SshFactory:
    """``ssh(program, *args, hosts=...)``; ``ssh.symlink_switch(...)`` for releases/current."""

    symlink_switch = SymlinkSwitch

    def __call__(self, program: str, *args: Any, **options: Any) -> SshStep:
        return SshStep(program, *args, **options)

    def __repr__(self) -> str:
        return "shipyard.ssh"


ssh = _SshFactory()
upload = UploadStep


@hookimpl
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    registry.add(SshStep)
    registry.add(UploadStep)
    registry.add(SymlinkSwitch)
