"""Deploying to a fleet over SSH: host groups, remote commands, uploads, rolling batches,
regions in waves (#16).

``hosts(name, [...])`` declares a group; ``ssh(program, *args, hosts=...)``, ``upload(local,
remote, hosts=...)`` and ``ssh.symlink_switch(hosts=...)`` are steps that act on every host of
their selection, a batch at a time (``batch=``, ``max_failures=``, ``bake=``, ``health_check=``,
``rollback="auto"``). ``waves(["canary", "eu", "us"], *steps, bake=, check=)`` runs such steps
region by region and, when a wave fails, undoes the waves done, the latest first.

asyncssh is imported only by the functions that connect. One connection per host is opened
(concurrently, at most ``connections`` at once) the first time a deployment's step needs it and
reused by the deployment's later steps; the pool is closed when the deployment finishes
(``shipyard_deployment_finished``). Host keys are checked against ``known_hosts``. A step's
``env=`` travels on the remote command's stdin, never on its command line.

Each fleet step (and each ``waves`` step) keeps what it did as its artifact ``hosts``
(:class:`_Record`: JSON with, per host, its status, the version it ended on and every action
of every attempt), through :meth:`StepContext.record_artifact`; a rollback deployment's
``symlink_switch`` reads the restored deployment's record to send each host back to its own
release.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections import deque
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
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
        if not isinstance(addresses, Iterable) or not all(isinstance(a, str) for a in addresses):
            raise _definition_error(f"hosts {name!r}: hosts must be a list of addresses")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise _definition_error(f"hosts {name!r}: port must be 1-65535, not {port!r}")
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            raise _definition_error(f"hosts {name!r}: tags must be a list of names, not {tags!r}")
        for key, value in (("region", region), ("user", user)):
            if value is not None and not isinstance(value, str):
                raise _definition_error(f"hosts {name!r}: {key} must be a string, not {value!r}")
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
        #: The loading of pipelines during which it was declared (see ``shipyard_configure``).
        self.generation = _GENERATION[0]
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
#: How many times pipelines were loaded and configured in this process.
_GENERATION = [0]

hosts = HostGroup


@hookimpl
def shipyard_configure(config: Any) -> None:
    """Forget the groups of the pipelines files loaded before this one.

    Groups are declared while a pipelines file loads, which is before this hook: the ones older
    than the previous configure belong to another file, loaded earlier in the same process (the
    test harness, a pytest run of several projects), and must not answer ``"tag:web"`` here.
    """
    stale = [name for name, g in _GROUPS.items() if g.generation < _GENERATION[0]]
    for name in stale:
        del _GROUPS[name]
    _GENERATION[0] += 1


#: What a group of an inventory file may say, as ``hosts(...)`` takes it.
_INVENTORY_KEYS = ("hosts", "region", "user", "port", "tags")


def inventory(path: str | os.PathLike[str]) -> dict[str, HostGroup]:
    """Host groups from a TOML or YAML file (by its extension), one table per group::

        [web]
        hosts = ["10.0.1.11", "deploy@10.0.1.12:2222"]
        region = "eu"
        tags = ["web"]

    Each group is declared as ``hosts(name, ...)`` would declare it, so steps can name it
    (``hosts="web"``, ``"region:eu"``, ``"tag:web"``); they are returned by name. A relative
    ``path`` is relative to the file that calls this (``pipelines.py``). YAML is read with
    ``yaml.safe_load``.

    :raises PipelineDefinitionError: naming the file (and the group) and what to change.
    """
    import sys
    from pathlib import Path

    from shipyard.sdk import PipelineDefinitionError

    file = Path(path)
    if not file.is_absolute():
        caller = sys._getframe(1).f_globals.get("__file__")
        file = (Path(caller).parent if caller else Path.cwd()) / file
    where = f"inventory {file}"
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise _definition_error(f"{where}: cannot read it ({exc.strerror or exc})") from None
    data: Any
    if file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise _definition_error(f"{where}: not valid YAML: {exc}") from None
    elif file.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise _definition_error(f"{where}: not valid TOML: {exc}") from None
    else:
        raise _definition_error(f"{where}: name a .toml, .yaml or .yml file")
    if not isinstance(data, dict) or not data:
        raise _definition_error(f"{where}: expected a table of host groups, like [web]")
    groups: dict[str, HostGroup] = {}
    for name, spec in data.items():
        if not isinstance(spec, dict):
            raise _definition_error(
                f"{where}: group {name!r} must be a table with hosts = [...], not {spec!r}"
            )
        unknown = sorted(set(spec) - set(_INVENTORY_KEYS))
        if unknown:
            raise _definition_error(
                f"{where}: group {name!r}: unknown key(s) {', '.join(unknown)}; "
                f"a group takes {', '.join(_INVENTORY_KEYS)}"
            )
        options = {k: v for k, v in spec.items() if k != "hosts"}
        try:  # sy.hosts checks the values, for a file as for pipelines.py
            groups[str(name)] = HostGroup(str(name), spec.get("hosts") or [], **options)
        except PipelineDefinitionError as exc:
            raise _definition_error(f"{where}: {exc}") from None
    return groups


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


def _group_lines(hosts: Iterable[Host]) -> list[str]:
    """``web (region eu): 10.0.0.1, 10.0.0.2``: the hosts by group, in order."""
    groups: dict[str, list[str]] = {}
    for h in hosts:
        groups.setdefault(h.group + (f" (region {h.region})" if h.region else ""), []).append(
            h.label
        )
    return [f"{name}: {', '.join(labels)}" for name, labels in groups.items()]


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


def _asyncssh() -> Any:
    """asyncssh, imported without the warning cryptography gives about its DSA support.

    asyncssh still knows ``ssh-dss`` keys, and recent cryptography releases deprecate DSA with a
    warning raised while asyncssh imports: noise in every deployment's output about something
    its author cannot change (and an error under ``-W error``). Only that warning is silenced.
    """
    import sys

    module = sys.modules.get("asyncssh")
    if module is not None:
        return module
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DSA is deprecated", module="asyncssh")
        import asyncssh
    return asyncssh


async def _open(host: Host, how: _Connect, limit: asyncio.Semaphore) -> Any:
    import asyncio

    asyncssh = _asyncssh()

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
# What each host did: the step's ``hosts`` artifact
# -------------------------------------------------------------------------------------------------


def _ts(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


@dataclass
class _HostRun:
    """One action on one host in one attempt of a step: apply, revert, or a health re-check."""

    action: str = "apply"
    step: str = ""
    attempt: int = 0
    status: str = "running"
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    error: str | None = None
    last_output: list[str] | None = None
    #: The release this action left the host on, when the action knows it (symlink_switch).
    version: str | None = None

    def as_json(self) -> dict[str, Any]:
        from shipyard.sdk import mask

        return {
            "step": mask(self.step), "action": self.action, "attempt": self.attempt,
            "status": self.status, "started_at": _ts(self.started_at),
            "finished_at": _ts(self.finished_at), "exit_code": self.exit_code,
            "error": mask(self.error) if self.error else None,
            "last_output": [mask(t) for t in (self.last_output or [])],
        }  # fmt: skip


@dataclass
class _HostState:
    """Where one host stands after a step: its status, its version, every action on it."""

    host: Host
    status: str = "not touched"
    version: str | None = None
    previous_version: str | None = None
    #: What ``current`` pointed at before the switch (symlink_switch), for its revert.
    previous_link: str | None = None
    runs: list[_HostRun] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        h = self.host
        return {
            "address": h.address, "port": h.port, "group": h.group, "region": h.region,
            "status": self.status, "version": self.version,
            "previous_version": self.previous_version,
            "attempts": [r.as_json() for r in self.runs],
        }  # fmt: skip


class _Record:
    """What a fleet step (or a ``waves`` step) did to its hosts, kept as its ``hosts`` artifact.

    One record per step per deployment, carried across the step's attempts (retries)."""

    def __init__(self, kind: str, version: str, hosts: Iterable[Host], versioned: bool) -> None:
        self.kind = kind
        self.version = version
        #: Whether some step of the record knows each host's release (a symlink_switch): then
        #: only such steps set a host's ``version``; else a host that succeeded is on ``version``.
        self.versioned = versioned
        self.status = "running"
        self.error: str | None = None
        self.failed_region: str | None = None
        self.hosts: dict[Host, _HostState] = {h: _HostState(h) for h in hosts}
        self.batches: list[dict[str, Any]] = []
        self.waves: list[dict[str, Any]] = []

    def state(self, host: Host) -> _HostState:
        return self.hosts.setdefault(host, _HostState(host))

    def as_json(self) -> str:
        from shipyard.sdk import mask

        return mask(
            json.dumps(
                {
                    "kind": self.kind,
                    "version": self.version,
                    "status": self.status,
                    "error": mask(self.error) if self.error else None,
                    "failed_region": self.failed_region,
                    "waves": self.waves,
                    "batches": self.batches,
                    "hosts": {h.label: s.as_json() for h, s in self.hosts.items()},
                },
                ensure_ascii=False,
                separators=(",", ":"),
            )
        )


def _restored_versions(context: StepContext) -> dict[str, str]:
    """In a rollback, each host's version as the restored deployment's step left it."""
    text = context.restored_artifact("hosts")
    if not text:
        return {}
    try:
        hosts = json.loads(text).get("hosts") or {}
        return {k: v["version"] for k, v in hosts.items() if isinstance(v.get("version"), str)}
    except (ValueError, AttributeError, TypeError, KeyError):
        return {}


# -------------------------------------------------------------------------------------------------
# Running remote commands
# -------------------------------------------------------------------------------------------------

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Run by the remote ``/bin/sh`` before the program: reads ``NAME=value`` lines from stdin up to
#: an empty line and exports them, so that ``env=`` values never appear on a command line.
_READ_ENV = 'while IFS= read -r v && [ -n "$v" ]; do export "$v"; done; exec "$@"'


def remote_command(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    shell: bool,
    piped: bool = False,
) -> str:
    """The command line the login shell runs: ``cd`` to the folder, ``export`` the variables,
    then ``exec`` the program in place of the shell, so that a signal over the channel reaches
    it; its input is ``/dev/null``. Every word is quoted (shlex.quote) unless ``shell=True``
    asks for the remote shell. With ``piped``, a ``/bin/sh`` first exports the variables sent
    on stdin (:func:`env_input`), which is then the program's input.

    Plain POSIX shell syntax, no helper program: ``env -C`` would need GNU coreutils on every
    host, and each helper ``exec`` costs a measurable part of a short command's round trip."""
    for k in env:
        if not _ENV_NAME.fullmatch(k):
            raise StepFailed(f"the variable name {k!r} cannot be exported (letters, digits, _)")
    words = ["/bin/sh", "-c", " ".join(argv)] if shell else list(argv)
    if piped:
        words = ["/bin/sh", "-c", _READ_ENV, "shipyard-env", *words]
    parts = [f"cd {shlex.quote(cwd)}"] if cwd else []
    if env:
        parts.append("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
    run = "exec " + " ".join(shlex.quote(w) for w in words) + ("" if piped else " </dev/null")
    return " && ".join([*parts, run])


def env_input(env: Mapping[str, str], label: str) -> str:
    """``env`` as the stdin of a ``piped`` :func:`remote_command`: one ``NAME=value`` a line."""
    for k, v in env.items():
        if "\n" in v or "\r" in v or "\0" in v:
            raise StepFailed(f"{label}: env {k!r} holds a line break or NUL, which cannot be sent")
    return "".join(f"{k}={v}\n" for k, v in env.items()) + "\n"


class _Output:
    """Receives one remote command's channel events (an asyncssh ``SSHClientSession``, duck
    typed): its output, cut into lines and logged as ``host | line``, and how it ended.

    Callbacks rather than stream readers: no task per stream, no line awaited one by one."""

    def __init__(self, host: Host, context: StepContext, done: asyncio.Future[int]) -> None:
        from shipyard.sdk import LineSplitter

        self.host, self.context, self.done = host, context, done
        self.splitters = {"stdout": LineSplitter(), "stderr": LineSplitter()}
        self.tail: deque[str] = deque(maxlen=_TAIL)
        self.code: int | None = None

    def _log(self, lines: list[str], stream: str) -> None:
        if lines:
            self.tail.extend(lines)
            label = self.host.label
            self.context.log_lines([f"{label} | {t}" for t in lines], stream)

    # -- SSHClientSession ---------------------------------------------------------------------

    def connection_made(self, chan: Any) -> None:
        pass

    def session_started(self) -> None:
        pass

    def data_received(self, data: bytes, datatype: int | None) -> None:
        stream = "stdout" if datatype is None else "stderr"
        self._log(self.splitters[stream].feed(data), stream)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def xon_xoff_requested(self, client_can_do: bool) -> None:
        pass

    def exit_status_received(self, status: int) -> None:
        self.code = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.code = -1

    def connection_lost(self, exc: Exception | None) -> None:
        for stream, splitter in self.splitters.items():
            self._log(splitter.finish(), stream)
        if self.done.done():
            return
        if exc is not None:
            self.done.set_exception(exc)
        else:
            self.done.set_result(-1 if self.code is None else self.code)


async def run_remote(
    conn: Any,
    host: Host,
    command: str,
    context: StepContext,
    run: _HostRun,
    stdin: str | None = None,
) -> int:
    """Run ``command`` on ``host``, each output line logged as ``host | line``; the exit code.
    ``stdin`` is written to the command's input, which is then closed; without it,
    nothing is sent (the command line gives the program /dev/null: see :func:`remote_command`).

    A cancel sends SIGTERM over the channel, waits a moment, then closes the channel."""
    import asyncio

    asyncssh = _asyncssh()

    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    output = _Output(host, context, done)
    try:
        chan, _ = await conn.create_session(lambda: output, command, encoding=None)
    except (asyncssh.Error, OSError) as exc:
        raise StepFailed(f"host {host.label}: cannot run the command: {_reason(exc)}") from None
    if stdin is not None:
        chan.write(stdin.encode())
        chan.write_eof()
    try:
        code = await asyncio.shield(done)
    except asyncio.CancelledError:
        try:
            chan.send_signal("TERM")
            await asyncio.wait_for(chan.wait_closed(), _SIGNAL_GRACE)
        except (asyncssh.Error, OSError, TimeoutError):
            pass
        finally:
            chan.close()
        raise
    except (asyncssh.Error, OSError) as exc:
        run.last_output = list(output.tail)
        raise StepFailed(f"host {host.label}: connection lost: {_reason(exc)}") from None
    finally:
        if done.done() and not done.cancelled():
            done.exception()  # retrieved: never "exception was never retrieved"
    run.last_output = list(output.tail)
    return code


# -------------------------------------------------------------------------------------------------
# The steps: a rolling engine and what it runs on each host
# -------------------------------------------------------------------------------------------------


@dataclass
class _Outcome:
    """How a rollout over some hosts went."""

    #: Hosts the step changed (to revert if the rollout is undone), in order.
    updated: list[Host]
    #: Hosts that failed (a failed command, or an unhealthy host after it).
    failed: list[Host]
    #: Why the rollout stopped (more failures than allowed), or None.
    stopped: str | None = None


class FleetStep(Step):
    """Something done on every host of a selection, a batch at a time; see the module docstring."""

    kind = "ssh.fleet"
    #: Whether the step knows which release it leaves each host on (symlink_switch).
    sets_version = False

    def _fleet_options(
        self,
        label: str,
        *,
        hosts: _Selection | None,
        batch: int | str | None = None,
        max_failures: int | str | None = 0,
        bake: float = 0,
        health_check: Any = None,
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
        self.batch_spec, self.max_failures_spec = batch, max_failures
        self.batch = _count(batch, n, "batch", label, n)
        self.max_failures = _count(max_failures, n, "max_failures", label, 0)
        if rollback not in (None, "auto"):
            raise _definition_error(f"{label}: rollback= is 'auto' or None, got {rollback!r}")
        self.rollback = rollback
        if isinstance(bake, bool) or not isinstance(bake, (int, float)) or bake < 0:
            raise _definition_error(f"{label}: bake= takes seconds >= 0, got {bake!r}")
        self.bake = float(bake)
        self.probe: Any = None
        self.health_url = ""
        if health_check is not None:
            if isinstance(health_check, str):
                from shipyard.sdk import HttpProbe

                self.probe = HttpProbe(
                    health_check, timeout=health_timeout, label=f"{label} health check"
                )
            elif hasattr(health_check, "probe") and hasattr(health_check.probe, "url"):
                self.probe = health_check.probe  # sy.health_check(...): its probe, as is
            else:
                raise _definition_error(
                    f"{label}: health_check= takes a URL or sy.health_check(URL), "
                    f"not {health_check!r}"
                )
            self.health_url = self.probe.url
            if "{host}" not in self.health_url:
                raise _definition_error(
                    f"{label}: the health check URL needs '{{host}}' in it (each host's address)"
                )
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
        self.client_keys = None if client_keys is None else tuple(os.fspath(k) for k in client_keys)
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.host_timeout = host_timeout
        if not isinstance(connections, int) or connections < 1:
            raise _definition_error(f"{label}: connections= takes a count >= 1")
        self.connections = connections
        self._records: dict[int, _Record] = {}

    def _rolling_text(self) -> str:
        parts = [f"on {len(self.hosts)} host(s): {', '.join(h.label for h in self.hosts)}"]
        if self.batch < len(self.hosts):
            parts.append(f"batch={self.batch}")
        if self.max_failures:
            parts.append(f"max_failures={self.max_failures}")
        if self.bake:
            parts.append(f"bake={self.bake:g}s")
        if self.probe is not None:
            parts.append(f"health check {self.health_url}")
        if self.rollback:
            parts.append(f"rollback={self.rollback}")
        if self.insecure:
            parts.append("HOST KEYS NOT CHECKED")
        return "; ".join(parts)

    def targets(self) -> list[str]:
        return _group_lines(self.hosts)

    def plan_details(self, deployment: Any, rootdir: Any) -> list[str]:
        return [f"hosts {line}" for line in self.targets()]

    # -- what subclasses provide ------------------------------------------------------------

    @property
    def can_revert(self) -> bool:
        """Whether :meth:`revert` can undo :meth:`apply` (``rollback="auto"``, waves)."""
        return False

    async def apply(
        self, conn: Any, host: Host, context: StepContext, run: _HostRun, state: _HostState
    ) -> None:
        raise NotImplementedError

    async def revert(
        self, conn: Any, host: Host, context: StepContext, run: _HostRun, state: _HostState
    ) -> None:
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

    def _warn_insecure(self, context: StepContext) -> None:
        if self.insecure:
            context.log(
                f"WARNING: {self.name}: host keys are NOT verified "
                "(insecure_no_host_key_check=True): anyone on the network path can impersonate "
                "these hosts",
                "shipyard",
            )

    async def _check_health(self, host: Host, context: StepContext) -> None:
        from shipyard.sdk import probe_until_healthy

        address = f"[{host.address}]" if ":" in host.address else host.address
        await probe_until_healthy(
            self.probe, self.health_url.replace("{host}", address),
            lambda t: context.log(f"{host.label} | {t}", "shipyard"), resolve=context.resolve,
        )  # fmt: skip

    async def _on_host(
        self, action: str, host: Host, context: StepContext, record: _Record,
        how: _Connect, limit: asyncio.Semaphore,
    ) -> str:  # fmt: skip
        """Do ``action`` (``apply``, ``revert`` or ``check``) on one host, recording it.

        Returns ``succeeded``, ``failed``, or ``unhealthy`` (applied, then its health check
        failed: the host is changed and failed)."""
        import asyncio

        state = record.state(host)
        run = _HostRun(action, self.name, context.attempt, started_at=time.time())
        state.runs.append(run)
        state.status = {"apply": "running", "revert": "rolling back"}.get(action, state.status)
        applied = False
        try:
            async with asyncio.timeout(self.host_timeout):
                conn = None if action == "check" else await _pool_for(context).get(host, how, limit)
                if action == "apply":
                    await self.apply(conn, host, context, run, state)
                    applied = True
                    if self.probe is not None:
                        await self._check_health(host, context)
                elif action == "revert":
                    await self.revert(conn, host, context, run, state)
                else:
                    await self._check_health(host, context)
        except TimeoutError:
            run.status, run.error = "failed", f"timed out after {self.host_timeout:g}s"
        except StepFailed as exc:
            run.status, run.error = "failed", exc.message
            if exc.step_exit_code is not None:
                run.exit_code = exc.step_exit_code
        except asyncio.CancelledError:
            run.status, run.error, run.finished_at = "cancelled", "cancelled", time.time()
            state.status = "cancelled"
            _host_finished(context, host, run)
            raise
        except Exception as exc:  # a host's failure is that host's: the rollout decides
            run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            run.status = "succeeded"
        run.finished_at = time.time()
        _host_finished(context, host, run)
        ok = run.status == "succeeded"
        if action == "apply":
            state.status = "succeeded" if ok else "failed"
            if applied and (self.sets_version or not record.versioned):
                state.version = run.version or context.deployment.version
        elif action == "revert":
            state.status = "rolled back" if ok else "rollback failed"
            if ok and (self.sets_version or not record.versioned):
                state.version = state.previous_version
        elif not ok:
            state.status = "failed"
        if not ok:
            what = {"revert": "ROLLBACK FAILED", "check": "UNHEALTHY"}.get(action, "FAILED")
            context.log(f"{host.label} | {what}: {run.error}", "shipyard")
        if ok:
            return "succeeded"
        return "unhealthy" if applied else "failed"

    async def rollout(
        self, context: StepContext, hosts: Sequence[Host], record: _Record,
        how: _Connect, limit: asyncio.Semaphore, region: str | None = None,
    ) -> _Outcome:  # fmt: skip
        """Apply the step to ``hosts`` a batch at a time, baking (and re-checking health)
        between batches, until done or more than ``max_failures`` hosts failed."""
        import asyncio

        n = len(hosts)
        size = _count(self.batch_spec, n, "batch", self.name, n)
        allowed = _count(self.max_failures_spec, n, "max_failures", self.name, 0)
        batches = [list(hosts[i : i + size]) for i in range(0, n, size)]
        out = _Outcome([], [])
        where = f" (region {region})" if region else ""
        for bi, batch in enumerate(batches):
            if bi and self.bake:
                context.log(f"baking {self.bake:g}s before batch {bi + 1}{where}", "shipyard")
                await asyncio.sleep(self.bake)
                if self.probe is not None:
                    recheck = [h for h in batches[bi - 1] if h in out.updated]
                    oks = await asyncio.gather(
                        *(self._on_host("check", h, context, record, how, limit) for h in recheck)
                    )
                    out.failed += [
                        h for h, ok in zip(recheck, oks, strict=True) if ok != "succeeded"
                    ]
                if len(out.failed) > allowed:
                    out.stopped = self._stop_text(out.failed, allowed, batches[bi:])
                    break
            if len(batches) > 1:
                context.log(
                    f"batch {bi + 1}/{len(batches)}{where}: {', '.join(h.label for h in batch)}",
                    "shipyard",
                )
            entry: dict[str, Any] = {
                "step": self.name, "attempt": context.attempt, "batch": bi + 1,
                "region": region, "hosts": [h.label for h in batch],
                "started_at": _ts(time.time()), "finished_at": None,
            }  # fmt: skip
            record.batches.append(entry)
            oks = await asyncio.gather(
                *(self._on_host("apply", h, context, record, how, limit) for h in batch)
            )
            entry["finished_at"] = _ts(time.time())
            for h, ok in zip(batch, oks, strict=True):
                if ok != "failed":
                    out.updated.append(h)
                if ok != "succeeded":
                    out.failed.append(h)
            if len(out.failed) > allowed:
                out.stopped = self._stop_text(out.failed, allowed, batches[bi + 1 :])
                break
        if out.stopped:
            context.log(out.stopped, "shipyard")
        return out

    def _stop_text(self, failed: list[Host], allowed: int, rest: list[list[Host]]) -> str:
        untouched = [h.label for b in rest for h in b]
        return (
            f"{len(failed)} host(s) failed ({', '.join(h.label for h in failed)}), "
            f"more than max_failures={allowed}: rollout stopped"
            + (f"; not touched: {', '.join(untouched)}" if untouched else "")
        )

    async def unroll(
        self, context: StepContext, hosts: Sequence[Host], record: _Record,
        how: _Connect, limit: asyncio.Semaphore,
    ) -> list[Host]:  # fmt: skip
        """Revert the step on ``hosts`` (all at once); the hosts rolled back."""
        import asyncio

        oks = await asyncio.gather(
            *(self._on_host("revert", h, context, record, how, limit) for h in hosts)
        )
        return [h for h, ok in zip(hosts, oks, strict=True) if ok == "succeeded"]

    def _record(self, context: StepContext) -> _Record:
        d = context.deployment
        record = self._records.get(d.id)
        if record is None:
            record = self._records[d.id] = _Record(
                self.kind, d.version, self.hosts, self.sets_version
            )
        return record

    async def run(self, context: StepContext) -> StepResult:
        import asyncio

        self._warn_insecure(context)
        how = self._connect_options(context)
        limit = asyncio.Semaphore(self.connections)
        record = self._record(context)
        record.status = "running"
        try:
            out = await self.rollout(context, self.hosts, record, how, limit)
            if out.stopped and self.rollback == "auto" and out.updated:
                context.log(
                    f"rolling back {len(out.updated)} updated host(s): "
                    + ", ".join(h.label for h in out.updated),
                    "shipyard",
                )
                back = await self.unroll(context, out.updated, record, how, limit)
                out.stopped += "; rolled back: " + (", ".join(h.label for h in back) or "none")
                if len(back) < len(out.updated):
                    out.stopped += "; ROLLBACK FAILED on: " + ", ".join(
                        h.label for h in out.updated if h not in back
                    )
            record.status, record.error = ("failed", out.stopped) if out.stopped else (
                "succeeded", None,
            )  # fmt: skip
        except asyncio.CancelledError:
            record.status, record.error = "cancelled", "cancelled"
            raise
        finally:
            context.record_artifact("hosts", record.as_json())
        if out.stopped:
            first = _last_failure(record, out.failed[0])
            raise StepFailed(
                f"{out.stopped}; {out.failed[0].label}: {first.error}",
                step_exit_code=first.exit_code,
                output=[f"{h.label} | {t}" for h in out.failed for t in _last_output(record, h)],
            )
        if out.failed:
            context.log(
                f"{len(out.failed)} host(s) failed, within max_failures={self.max_failures}: "
                + ", ".join(h.label for h in out.failed),
                "shipyard",
            )
        return StepResult(exit_code=0)


def _host_finished(context: StepContext, host: Host, run: _HostRun) -> None:
    """Tell the plugins (tracing, for one) that ``run`` on ``host`` ended."""
    from shipyard.sdk import HostFinished
    from shipyard.sdk import mask

    assert run.started_at is not None
    assert run.finished_at is not None
    context.emit(
        HostFinished, host=host.label, address=host.address, port=host.port, group=host.group,
        region=host.region, action=run.action, attempt=run.attempt, status=run.status,
        exit_code=run.exit_code, error=mask(run.error) if run.error else None,
        started_at=run.started_at, finished_at=run.finished_at,
    )  # fmt: skip


def _last_failure(record: _Record, host: Host) -> _HostRun:
    runs = record.state(host).runs
    return next((r for r in reversed(runs) if r.status == "failed"), runs[-1])


def _last_output(record: _Record, host: Host) -> list[str]:
    return _last_failure(record, host).last_output or []


_FLEET_OPTIONS = (
    "batch", "max_failures", "bake", "health_check", "health_timeout", "rollback",
    "known_hosts", "insecure_no_host_key_check", "client_keys", "connect_timeout", "keepalive",
    "host_timeout", "connections",
)  # fmt: skip


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    step: dict[str, Any] = {
        k: options.pop(k) for k in ("name", "timeout", "retries") if k in options
    }
    fleet: dict[str, Any] = {k: options.pop(k) for k in _FLEET_OPTIONS if k in options}
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
        for k in self.env:
            if not isinstance(k, str) or not _ENV_NAME.fullmatch(k):
                raise _definition_error(
                    f"ssh step: env name {k!r} is not a variable name (letters, digits, _)"
                )
        self.cwd = cwd
        self.shell = shell
        self.undo = list(undo) if undo is not None else None
        super().__init__(**step_options)
        self._fleet_options("ssh step", hosts=hosts, **fleet)
        if self.rollback == "auto" and self.undo is None:
            raise _definition_error("ssh step: rollback='auto' needs undo=[program, *args]")

    @property
    def can_revert(self) -> bool:
        return self.undo is not None

    def default_name(self) -> str:
        text = "ssh " + " ".join([self.program, *map(str, self.args)])
        return text if len(text) <= 60 else text[:57] + "..."

    def describe(self) -> str:
        argv = shlex.join([self.program, *map(str, self.args)])
        return f"{argv}  ({self._rolling_text()}{'; shell=True' if self.shell else ''})"

    def _command(self, argv: Sequence[Any], context: StepContext) -> tuple[str, str | None]:
        """The remote command line, and its stdin: ``env=`` goes there, never on a command
        line (which any user of the host can read with ``ps``)."""
        env = {**context.deployment_env, **context.process_env}
        own = {str(k): str(v) for k, v in context.resolve(self.env).items()}
        resolved = [str(a) for a in context.resolve(list(argv))]
        command = remote_command(resolved, env, self.cwd, self.shell, piped=bool(own))
        return command, env_input(own, self.name) if own else None

    async def _exec(
        self, argv: Sequence[Any], conn: Any, host: Host, context: StepContext, run: _HostRun
    ) -> None:
        command, stdin = self._command(argv, context)
        code = await run_remote(conn, host, command, context, run, stdin)
        run.exit_code = code
        if code != 0:
            tail = "".join(f"\n  {t}" for t in (run.last_output or [])[-5:])
            raise StepFailed(
                f"host {host.label}: {argv[0]} exited with {code}"
                + (f"; last output:{tail}" if tail else ""),
                step_exit_code=code,
            )

    async def apply(
        self, conn: Any, host: Host, context: StepContext, run: _HostRun, state: _HostState
    ) -> None:
        await self._exec([self.program, *self.args], conn, host, context, run)

    async def revert(
        self, conn: Any, host: Host, context: StepContext, run: _HostRun, state: _HostState
    ) -> None:
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

    async def apply(
        self, conn: Any, host: Host, context: StepContext, run: _HostRun, state: _HostState
    ) -> None:
        asyncssh = _asyncssh()

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
    temporary name, then ``mv -T``); rolled back by pointing it at what it pointed at before.

    In a rollback deployment each host goes back to the release it had after the deployment
    being restored (from that deployment's ``hosts`` artifact), not necessarily all the same."""

    kind = "ssh.symlink_switch"
    sets_version = True

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
        self._restored: dict[int, dict[str, str]] = {}
        super().__init__("ln", hosts=hosts, undo=[], **options)

    def default_name(self) -> str:
        return f"switch {self.current} -> {self.releases}/<version>"

    def describe(self) -> str:
        release = self.release or "${DEPLOYMENT_VERSION}"
        return f"{self.current} -> {self.releases}/{release}  ({self._rolling_text()})"

    def _version_of(self, link: str | None) -> str | None:
        if link is None:
            return None
        prefix = self.releases + "/"
        return link[len(prefix) :] if link.startswith(prefix) else link

    async def _point(
        self, target: str, conn: Any, host: Host, context: StepContext, run: _HostRun
    ) -> None:
        tmp = f"{self.current}.shipyard-tmp"
        await self._exec(["ln", "-sfn", target, tmp], conn, host, context, run)
        await self._exec(["mv", "-T", tmp, self.current], conn, host, context, run)

    def _release_for(self, host: Host, context: StepContext) -> str:
        if self.release:
            return self.release
        d = context.deployment
        if d.restores is not None:
            if d.id not in self._restored:
                self._restored[d.id] = _restored_versions(context)
            back = self._restored[d.id].get(host.label)
            if back:
                return back
        return d.version

    async def apply(
        self, conn: Any, host: Host, context: StepContext, run: _HostRun, state: _HostState
    ) -> None:
        release = self._release_for(host, context)
        target = f"{self.releases}/{release}"
        check = await conn.run(
            f"readlink {shlex.quote(self.current)}; test -d {shlex.quote(target)}", check=False
        )
        previous = str(check.stdout).strip() or None
        if not any(r.action == "apply" and r.version for r in state.runs):
            # The first switch of this deployment on the host: what it had before the deployment.
            state.previous_link, state.previous_version = previous, self._version_of(previous)
            state.version = state.previous_version
        if check.exit_status != 0:
            raise StepFailed(f"host {host.label}: release folder {target} does not exist")
        await self._point(target, conn, host, context, run)
        run.version = release
        context.log(
            f"{host.label} | {self.current} -> {target} (was {previous or 'nothing'})", "shipyard"
        )

    async def revert(
        self, conn: Any, host: Host, context: StepContext, run: _HostRun, state: _HostState
    ) -> None:
        previous = state.previous_link
        if previous is None:
            await self._exec(["rm", "-f", self.current], conn, host, context, run)
        else:
            await self._point(previous, conn, host, context, run)
        run.version = state.previous_version
        context.log(f"{host.label} | {self.current} back to {previous or 'nothing'}", "shipyard")


# -------------------------------------------------------------------------------------------------
# Waves: region by region
# -------------------------------------------------------------------------------------------------


class Waves(Step):
    """Run fleet steps region by region: every step on the first region's hosts, then (after
    ``bake`` seconds and the optional ``check``) on the next region's, and so on. A failure in a
    wave (a step's rollout stopping, or the check after a wave failing) stops it; with
    ``rollback="auto"`` every wave done so far is undone, the latest first, each step in
    reverse order, on the hosts it changed."""

    kind = "ssh.waves"

    def __init__(
        self,
        regions: Sequence[str],
        *steps: FleetStep,
        bake: float = 0,
        check: Any = None,
        rollback: str | None = "auto",
        name: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        **unknown: Any,
    ) -> None:
        reject_unknown_options(self, unknown)
        label = "waves"
        if (
            isinstance(regions, str)
            or not regions
            or not all(isinstance(r, str) and r for r in regions)
        ):
            raise _definition_error(
                f"{label}: give the regions as a list of names, e.g. ['canary', 'eu', 'us'], "
                f"not {regions!r}"
            )
        if len(set(regions)) != len(regions):
            raise _definition_error(f"{label}: a region appears twice in {list(regions)!r}")
        self.regions = list(regions)
        if not steps:
            raise _definition_error(f"{label}: give the fleet steps to run in each wave")
        for s in steps:
            if not isinstance(s, FleetStep):
                raise _definition_error(
                    f"{label}: {s!r} is not a fleet step; waves run sy.ssh, sy.upload and "
                    "sy.ssh.symlink_switch steps"
                )
            if s.retries or s.timeout is not None:
                raise _definition_error(
                    f"{label}: step {s.name!r} sets retries= or timeout=; inside waves set them "
                    "on sy.waves(...) itself"
                )
            outside = [h.label for h in s.hosts if h.region not in self.regions]
            if outside:
                raise _definition_error(
                    f"{label}: step {s.name!r} has hosts in no wave: {', '.join(outside)} "
                    f"(their regions: {sorted({str(h.region) for h in s.hosts})}); "
                    "add their region to the waves or leave them out of the step"
                )
        for r in self.regions:
            if not any(h.region == r for s in steps for h in s.hosts):
                raise _definition_error(f"{label}: region {r!r} has no host in any step")
        self.steps = list(steps)
        if isinstance(bake, bool) or not isinstance(bake, (int, float)) or bake < 0:
            raise _definition_error(f"{label}: bake= takes seconds >= 0, got {bake!r}")
        self.bake = float(bake)
        if check is not None and not callable(getattr(check, "run", None)):
            raise _definition_error(
                f"{label}: check= takes a step such as sy.analysis(...), not {check!r}"
            )
        self.check = check
        if rollback not in (None, "auto"):
            raise _definition_error(f"{label}: rollback= is 'auto' or None, got {rollback!r}")
        self.rollback = rollback
        super().__init__(name=name, timeout=timeout, retries=retries)
        self._records: dict[int, _Record] = {}

    def default_name(self) -> str:
        return "waves " + " -> ".join(self.regions)

    def _wave_hosts(self, region: str) -> list[Host]:
        return list(dict.fromkeys(h for s in self.steps for h in s.hosts if h.region == region))

    def describe(self) -> str:
        parts = [
            " -> ".join(f"{r} ({len(self._wave_hosts(r))} host(s))" for r in self.regions),
            f"{len(self.steps)} step(s) per wave",
        ]
        if self.bake:
            parts.append(f"bake={self.bake:g}s")
        if self.check is not None:
            parts.append(f"check {getattr(self.check, 'name', type(self.check).__name__)}")
        if self.rollback:
            parts.append(f"rollback={self.rollback}")
        return "; ".join(parts)

    def targets(self) -> list[str]:
        return _group_lines(h for r in self.regions for h in self._wave_hosts(r))

    def plan_details(self, deployment: Any, rootdir: Any) -> list[str]:
        lines = [
            f"wave {i}: region {r}: {', '.join(h.label for h in self._wave_hosts(r))}"
            for i, r in enumerate(self.regions, 1)
        ]
        return lines + [f"each wave: {s.kind}: {s.describe()}" for s in self.steps]

    async def _run_check(self, context: StepContext) -> str | None:
        """Run the check between waves; why it failed, or None."""
        from shipyard.sdk import Status

        try:
            result = await self.check.run(context)
        except StepFailed as exc:
            return exc.message
        except Exception as exc:  # the check's failure is the wave's, with its reason
            return f"{type(exc).__name__}: {exc}"
        if getattr(result, "status", None) == Status.FAILED:
            return getattr(result, "error", None) or "failed"
        return None

    async def run(self, context: StepContext) -> StepResult:
        import asyncio

        d = context.deployment
        record = self._records.get(d.id)
        if record is None:
            hosts = [h for r in self.regions for h in self._wave_hosts(r)]
            versioned = any(s.sets_version for s in self.steps)
            record = self._records[d.id] = _Record(self.kind, d.version, hosts, versioned)
        record.status, record.error, record.failed_region = "running", None, None
        record.waves = [
            {"wave": i, "region": r, "attempt": context.attempt, "status": "not started",
             "hosts": [h.label for h in self._wave_hosts(r)], "started_at": None,
             "finished_at": None, "error": None, "rolled_back": False}
            for i, r in enumerate(self.regions, 1)
        ]  # fmt: skip
        prepared = {}
        for s in self.steps:
            s._warn_insecure(context)
            prepared[s] = (s._connect_options(context), asyncio.Semaphore(s.connections))
        done: list[tuple[dict[str, Any], list[tuple[FleetStep, list[Host]]]]] = []
        failure: str | None = None
        try:
            for wi, region in enumerate(self.regions):
                if wi:
                    failure = await self._between(context, record.waves[wi - 1])
                    if failure:
                        record.failed_region = self.regions[wi - 1]
                        break
                wave = record.waves[wi]
                wave["status"], wave["started_at"] = "running", _ts(time.time())
                hosts = self._wave_hosts(region)
                context.log(
                    f"wave {wi + 1}/{len(self.regions)}: region {region}: "
                    + ", ".join(h.label for h in hosts),
                    "shipyard",
                )
                applied: list[tuple[FleetStep, list[Host]]] = []
                done.append((wave, applied))
                for s in self.steps:
                    sub = [h for h in s.hosts if h.region == region]
                    if not sub:
                        continue
                    out = await s.rollout(context, sub, record, *prepared[s], region=region)
                    applied.append((s, out.updated))
                    if out.stopped:
                        first = _last_failure(record, out.failed[0])
                        failure = (
                            f"step {s.name!r}: {out.stopped}; {out.failed[0].label}: {first.error}"
                        )
                        break
                wave["finished_at"] = _ts(time.time())
                if failure:
                    wave["status"], wave["error"] = "failed", failure
                    record.failed_region = region
                    break
                wave["status"] = "succeeded"
            if failure:
                failure = f"wave {record.failed_region!r} failed: {failure}"
                context.log(failure, "shipyard")
                if self.rollback == "auto":
                    failure += await self._roll_back(context, record, done, prepared)
            record.status, record.error = ("failed", failure) if failure else ("succeeded", None)
        except asyncio.CancelledError:
            record.status, record.error = "cancelled", "cancelled"
            raise
        finally:
            context.record_artifact("hosts", record.as_json())
        if failure:
            raise StepFailed(failure)
        return StepResult(exit_code=0)

    async def _between(self, context: StepContext, wave: dict[str, Any]) -> str | None:
        """Bake, then check, after ``wave``: why the wave is judged failed, or None."""
        import asyncio

        if self.bake:
            context.log(f"baking {self.bake:g}s after wave {wave['region']}", "shipyard")
            await asyncio.sleep(self.bake)
        if self.check is None:
            return None
        name = getattr(self.check, "name", "check")
        context.log(f"checking wave {wave['region']}: {name}", "shipyard")
        why = await self._run_check(context)
        wave["check"] = "failed" if why else "passed"
        if why:
            error = f"check {name!r} failed: {why}"
            wave["status"], wave["error"] = "failed", error
            return error
        return None

    async def _roll_back(
        self, context: StepContext, record: _Record,
        done: list[tuple[dict[str, Any], list[tuple[FleetStep, list[Host]]]]],
        prepared: dict[FleetStep, tuple[_Connect, asyncio.Semaphore]],
    ) -> str:  # fmt: skip
        """Undo the waves done, latest first; what to add to the failure's message."""
        back_regions, kept, failed = [], [], []
        for wave, applied in reversed(done):
            context.log(f"rolling back wave {wave['region']}", "shipyard")
            for s, updated in reversed(applied):
                if not updated:
                    continue
                if not s.can_revert:
                    kept.append(s.name)
                    context.log(f"{s.name}: cannot be undone; left as is", "shipyard")
                    continue
                back = await s.unroll(context, updated, record, *prepared[s])
                failed += [h.label for h in updated if h not in back]
            wave["rolled_back"] = True
            if wave["status"] == "succeeded":
                wave["status"] = "rolled back"
            back_regions.append(wave["region"])
        text = "; rolled back waves: " + ", ".join(back_regions)
        if kept:
            text += "; left as they are (no undo): " + ", ".join(dict.fromkeys(kept))
        if failed:
            text += "; ROLLBACK FAILED on: " + ", ".join(dict.fromkeys(failed))
        return text


waves = Waves


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
    registry.add(Waves)
