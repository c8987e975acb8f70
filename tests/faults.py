"""Fault-injection helpers: real ``shipyard`` processes, marker files, kills, ``/proc`` inspection.

The history is read through the store port (:meth:`Harness.store`), like any other reader;
only what the port does not ask (the lock queue, the file's integrity, its write lock) is read
from SQLite directly.

Synchronisation is always on something a process wrote (a marker file, a history row), never on
sleeping and hoping. Timeouts here only turn a hang into a readable failure.

Every process a test starts carries ``SHIPYARD_TEST_TAG`` in its environment, and so does every
step and grandchild it spawns (they inherit it); :meth:`Harness.cleanup` finds them all through
``/proc/*/environ`` and kills them, so no process outlives its test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from shipyard import HistoryStore

SHIPYARD = Path(sys.executable).parent / "shipyard"

#: The step program every test pipeline runs: ``step.py MODE NAME [ARG]``.
#: It writes ``$MARKERS/NAME.$DEPLOYMENT_ID`` (JSON: pid, pgid, children) once it is running.
STEP_PROGRAM = r"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MARKERS = Path(os.environ["MARKERS"])
mode, name = sys.argv[1], sys.argv[2]
dep = os.environ.get("DEPLOYMENT_ID", "x")


def mark(label: str, **extra: object) -> None:
    data = {"pid": os.getpid(), "pgid": os.getpgid(0), "version": os.environ.get("DEPLOYMENT_VERSION"), **extra}
    tmp = MARKERS / f".{label}.{dep}.{os.getpid()}"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, MARKERS / f"{label}.{dep}")


def released(label: str) -> bool:
    return (MARKERS / f"release-{label}").exists() or (MARKERS / "release-all").exists()


def block(label: str) -> None:
    while not released(label):
        time.sleep(0.02)


def spawn(child_mode: str, label: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, child_mode, label])
    while not (MARKERS / f"{label}.{dep}").exists():
        if proc.poll() is not None:
            sys.exit(f"grandchild {label} exited with {proc.returncode}")
        time.sleep(0.01)
    return proc


print(f"step {name} ({mode}) running as pid {os.getpid()}", flush=True)
if mode == "ok":
    mark(name)
elif mode == "fail":
    mark(name)
    print(f"step {name} fails on purpose", file=sys.stderr, flush=True)
    sys.exit(1)
elif mode == "failflag":
    mark(name)
    version_flag = MARKERS / f"fail-flag-{os.environ.get('DEPLOYMENT_VERSION')}"
    if (MARKERS / "fail-flag").exists() or version_flag.exists():
        print(f"step {name} fails: fail-flag is set", file=sys.stderr, flush=True)
        sys.exit(1)
elif mode == "block":
    mark(name)
    block(name)
elif mode in ("trap", "trapgc"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    children = [spawn("trapgc", f"{name}-gc").pid] if mode == "trap" else []
    mark(name, children=children)
    block(name)
elif mode in ("tree", "gc"):
    children = [spawn("gc", f"{name}-gc").pid] if mode == "tree" else []
    mark(name, children=children)
    block(name)
elif mode == "spam":
    lines = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    mark(name)
    for i in range(lines):
        print(f"{name} line {i} " + "x" * 60, flush=(i % 10 == 0))
        if i % 50 == 0:
            time.sleep(0.005)
    mark(f"{name}-done")
else:
    sys.exit(f"unknown mode {mode!r}")
"""

#: The pipelines of the fault tests; ``--var mode=block`` etc. select a step's behaviour.
PIPELINES = '''
from __future__ import annotations

import os
import sys

import shipyard as sy

STEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step.py")


def step(mode, name, *extra):
    return sy.command(sys.executable, STEP, mode, name, *extra, name=name)


def three_stages(d):
    release = "fail" if d.version.startswith("bad") else d.vars.get("mode", "ok")
    return [
        sy.stage("build", step("ok", "build")),
        sy.stage("release", step(release, "release")),
        sy.stage("verify", step("failflag", "verify")),
    ]


@sy.pipeline(rollback="auto")
def app(d):
    """Three stages; versions starting with 'bad' fail in release; rolls back automatically."""
    return three_stages(d)


@sy.pipeline(rollback="manual")
def manual(d):
    """The same stages, rolled back only by hand."""
    return three_stages(d)


@sy.pipeline(rollback=False)
def pinned(d):
    """The same stages; rollback refused."""
    return three_stages(d)


@sy.pipeline()
def fanout(d):
    """A parallel stage of a plain, a SIGTERM-trapping and a process-tree step."""
    return [
        sy.stage("prepare", step("ok", "prepare")),
        sy.stage(
            "run", step("block", "plain"), step("trap", "trap"), step("tree", "tree"),
            parallel=True,
        ),
        sy.stage("after", step("ok", "after")),
    ]


def think(name):
    """A blocking (sync) Python step: runs in a thread of the CLI until released."""
    import json
    import time
    from pathlib import Path

    markers = Path(os.environ["MARKERS"])
    (markers / f"{name}.{os.environ.get('SHIPYARD_TEST_DEP', 'x')}").write_text(
        json.dumps({"pid": os.getpid()})
    )
    while not (markers / "release-all").exists():
        time.sleep(0.02)


@sy.pipeline()
def thinker(d):
    """A stage whose step is a blocking Python function, not a process."""
    return [sy.stage("think", sy.python(think, "think"))]


@sy.pipeline()
def chatty(d):
    """n stages of steps that write many log lines; --var hold=1 adds a last blocking stage."""
    n = int(d.vars.get("n", "6"))
    lines = d.vars.get("lines", "200")
    stages = [sy.stage(f"s{i}", step("spam", f"s{i}", lines)) for i in range(n)]
    if d.vars.get("hold") == "1":
        stages.append(sy.stage("hold", step("block", "hold")))
    return stages
'''


class Result:
    """A finished ``shipyard`` process."""

    def __init__(self, args: list[str], code: int, out: str, err: str) -> None:
        self.args = args
        self.code = code
        self.out = out
        self.err = err

    def __repr__(self) -> str:
        return (
            f"<shipyard {' '.join(self.args)} exit {self.code}>\n"
            f"--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}"
        )


class Proc:
    """A running ``shipyard`` process (its own session), output captured to files."""

    def __init__(self, harness: Harness, args: list[str], popen: subprocess.Popen[bytes]) -> None:
        self.harness = harness
        self.args = args
        self.popen = popen
        self.pid = popen.pid

    @property
    def out(self) -> str:
        return self.harness.out_path(self.pid, "out").read_text(errors="replace")

    @property
    def err(self) -> str:
        return self.harness.out_path(self.pid, "err").read_text(errors="replace")

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float = 60.0) -> Result:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"shipyard {' '.join(self.args)} still runs after {timeout}s\n"
                f"--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}"
            ) from None
        return Result(self.args, code, self.out, self.err)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(10)


class Harness:
    """A project directory with the fault pipelines, a private HOME and history."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.root = tmp_path / "project"
        self.markers = tmp_path / "markers"
        self.outdir = tmp_path / "out"
        self.home = tmp_path / "home"
        for d in (self.root, self.markers, self.outdir, self.home):
            d.mkdir(parents=True, exist_ok=True)
        self.history = self.root / ".shipyard" / "history.db"
        (self.root / "pipelines.py").write_text(PIPELINES)
        (self.root / "step.py").write_text(STEP_PROGRAM)
        self.tag = uuid.uuid4().hex
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "NO_COLOR": "1",
            "LANG": "C.UTF-8",
            "USER": "fault-tester",
            "SHIPYARD_HEARTBEAT": "0.2",
            "SHIPYARD_HISTORY": str(self.history),
            "SHIPYARD_DISABLE_PLUGIN_AUTOLOAD": "1",
            "SHIPYARD_RETRY_BACKOFF": "0.01",
            "SHIPYARD_TEST_TAG": self.tag,
            "MARKERS": str(self.markers),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        self.procs: list[Proc] = []

    # -- processes ----------------------------------------------------------------------------

    def out_path(self, pid: int, kind: str) -> Path:
        return self.outdir / f"{pid}.{kind}"

    def start(self, *args: str, env: dict[str, str] | None = None, **popen: Any) -> Proc:
        """Start ``shipyard ARGS`` in its own session; stdout and stderr go to files."""
        argv = [str(a) for a in args]
        out = (self.outdir / f"tmp-{uuid.uuid4().hex}.out").open("wb")
        err = (self.outdir / f"tmp-{uuid.uuid4().hex}.err").open("wb")
        with out, err:
            p = subprocess.Popen(
                [str(SHIPYARD), *argv], cwd=self.root, env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                **popen,
            )  # fmt: skip
        os.replace(out.name, self.out_path(p.pid, "out"))
        os.replace(err.name, self.out_path(p.pid, "err"))
        proc = Proc(self, argv, p)
        self.procs.append(proc)
        return proc

    def run(self, *args: str, timeout: float = 60.0, **kw: Any) -> Result:
        return self.start(*args, **kw).wait(timeout)

    def cleanup(self) -> list[int]:
        """Kill every process carrying our tag; return the pids that were still running."""
        leftovers: list[int] = []
        for _ in range(50):
            pids = tagged_processes(self.tag)
            if not pids:
                break
            leftovers += [p for p in pids if p not in leftovers]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for p in self.procs:
                if p.popen.poll() is None:
                    try:
                        p.popen.wait(0.2)
                    except subprocess.TimeoutExpired:
                        pass
            time.sleep(0.05)
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait(5)
        return leftovers

    # -- markers --------------------------------------------------------------------------------

    def marker(self, name: str, dep_id: int | str) -> dict[str, Any]:
        return json.loads((self.markers / f"{name}.{dep_id}").read_text())

    def markers_named(self, name: str) -> dict[str, dict[str, Any]]:
        """``{deployment id: marker}`` of every marker ``name`` written so far."""
        found = {}
        for p in self.markers.glob(f"{name}.*"):
            found[p.name[len(name) + 1 :]] = json.loads(p.read_text())
        return found

    def wait_marker(
        self, name: str, dep_id: int | str = "*", *, procs: Iterable[Proc] = (), timeout: float = 60
    ) -> dict[str, Any]:
        """Wait until a step wrote marker ``name`` (of deployment ``dep_id``; any with ``*``).

        Fails at once if one of ``procs`` exits meanwhile (with its output), and after ``timeout``.
        """
        procs = list(procs)
        pattern = f"{name}.{dep_id}"

        def found() -> Path | None:
            return next(iter(sorted(self.markers.glob(pattern))), None)

        deadline = time.monotonic() + timeout
        while True:
            path = found()
            if path is not None:
                return json.loads(path.read_text())
            for p in procs:
                if p.poll() is not None:
                    path = found()
                    if path is not None:
                        return json.loads(path.read_text())
                    raise AssertionError(f"no marker {pattern}: {p.wait()!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no marker {pattern} after {timeout}s")
            time.sleep(0.01)

    def release(self, name: str = "all") -> None:
        (self.markers / f"release-{name}").touch()

    # -- the history ------------------------------------------------------------------------------

    @contextmanager
    def store(self) -> Iterator[HistoryStore | None]:
        """The history through the store port, opened only to read (None: nothing recorded yet)."""
        from shipyard.sdk import StoreNotFound
        from shipyard.sdk import open_store

        try:
            store = open_store(str(self.history), create=False)
        except StoreNotFound:
            yield None
            return
        try:
            yield store
        finally:
            store.close()

    def deployments(self) -> list[dict[str, Any]]:
        """Every deployment, oldest first (port rows, but ``vars`` as the JSON text it was
        stored as: test_crash.py compares it as text)."""
        with self.store() as store:
            rows = store.deployments(limit=1_000_000) if store else []
        return [_with_vars_text(r) for r in sorted(rows, key=lambda r: r["id"])]

    def deployment(self, dep_id: int) -> dict[str, Any]:
        from shipyard import DeploymentNotFound

        with self.store() as store:
            try:
                assert store is not None
                return _with_vars_text(store.get(dep_id))
            except (AssertionError, DeploymentNotFound):
                raise AssertionError(f"no deployment {dep_id} in the history") from None

    def stages(self, dep_id: int) -> dict[str, str]:
        with self.store() as store:
            rows = store.stages(dep_id) if store else []
        return {r["name"]: r["status"] for r in rows}

    def locks(self) -> list[dict[str, Any]]:
        with self.store() as store:
            return [dict(lk) for lk in store.locks()] if store else []

    def audit(self) -> list[dict[str, Any]]:
        """Every audit record, oldest first."""
        with self.store() as store:
            rows = store.audit_trail(limit=1_000_000) if store else []
        return [dict(r) for r in reversed(rows)]

    # -- SQLite only: what the port does not ask, and the file itself -----------------------------

    def db(self) -> sqlite3.Connection:
        """A plain SQLite connection to the history (as any other reader would open it)."""
        conn = sqlite3.connect(self.history, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        return conn

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        conn = self.db()
        try:
            return [dict(r) for r in conn.execute(sql, tuple(params)).fetchall()]
        finally:
            conn.close()

    def lock_queue(self) -> list[dict[str, Any]]:
        """The waiters for locks, in queue order (the port has no question about the queue)."""
        return self.query("SELECT * FROM lock_queue ORDER BY id")

    def integrity(self) -> str:
        conn = sqlite3.connect(self.history, timeout=30)
        try:
            return ",".join(r[0] for r in conn.execute("PRAGMA integrity_check").fetchall())
        finally:
            conn.close()

    def sigstop(self, proc: Proc) -> None:
        """SIGSTOP ``proc`` at a moment it does not hold SQLite's write lock.

        A process stopped inside a history write keeps the write lock while stopped (a documented
        limit of SQLite, a window of milliseconds): other commands would wait for it. The tests
        of a stopped holder are about the Shipyard lock, so they stop it outside a write.
        """
        for _ in range(100):
            proc.signal(signal.SIGSTOP)
            self.wait_until("the process stopped", lambda: proc_state(proc.pid) == "T")
            conn = sqlite3.connect(self.history, timeout=0.5, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
                return
            except sqlite3.OperationalError:
                proc.signal(signal.SIGCONT)
            finally:
                conn.close()
        raise AssertionError("the process always held the history's write lock")

    def wait_until(self, what: str, cond: Callable[[], Any], timeout: float = 60) -> Any:
        """Poll ``cond`` until it returns something truthy (a state, not a duration)."""
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not reached after {timeout}s: {what}")
            time.sleep(0.02)


def _with_vars_text(row: Mapping[str, Any]) -> dict[str, Any]:
    """A port row with ``vars`` as JSON text, as the old raw reads gave it.

    Only for tests/test_crash.py (``'"color": "blue"' in dep["vars"]``); once that reads
    ``dep["vars"] == {...}``, return port rows unchanged.
    """
    return {**row, "vars": json.dumps(row["vars"])}


# -- /proc ---------------------------------------------------------------------------------------


def proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``R``, ``S``, ``T``, ``Z``, ...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()[0].decode()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped is dead)."""
    return proc_state(pid) not in (None, "Z", "X")


def process_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()[19].decode()


def tagged_processes(tag: str) -> list[int]:
    """Living pids whose environment carries ``SHIPYARD_TEST_TAG=tag``."""
    needle = f"SHIPYARD_TEST_TAG={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0") and alive(int(entry)):
            pids.append(int(entry))
    return pids


def wait_gone(pids: Iterable[int], deadline: float) -> list[int]:
    """Wait until none of ``pids`` runs or ``deadline`` (monotonic) passes; return survivors."""
    pids = list(pids)
    while True:
        survivors = [p for p in pids if alive(p)]
        if not survivors or time.monotonic() > deadline:
            return survivors
        time.sleep(0.02)


def hostname() -> str:
    return socket.gethostname()


def indent(text: str) -> str:
    return textwrap.indent(text, "    ")


def harness(tmp_path: Path) -> Iterator[Harness]:
    """The body of each test module's ``sy`` fixture: a harness, and no process left behind."""
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.cleanup()
