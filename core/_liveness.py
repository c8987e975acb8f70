"""Whether the process behind a deployment or a lock still lives, and what a dead one left.

The store keeps records and asks nothing of the operating system; the engine hands it the
:func:`dead_after` predicate and, when the store reports deployments it marked
``interrupted``, stops the step processes they left running (:func:`stop_orphans`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._reports import utcnow

if TYPE_CHECKING:
    from ._plugins import ShipyardPluginManager
    from ._store import HistoryStore
    from ._store import Liveness
    from ._store import ProcessRef

#: The environment variable every step process inherits: how a later command finds them.
TAG_VARIABLE = "SHIPYARD_DEPLOYMENT_TAG"


def process_start(pid: int) -> str | None:
    """An identity of process ``pid`` that changes when the pid is reused (Linux: start ticks).

    ``"dead"`` for a zombie; None where ``/proc`` cannot tell.
    """
    from ._proc import stat

    st = stat(pid)
    if st is None:
        return None
    return st.starttime if st.alive else "dead"


_ME: ProcessRef | None = None


def this_process() -> ProcessRef:
    """This process, as recorded with the deployments it runs and the locks it takes."""
    global _ME
    pid = os.getpid()
    if _ME is None or _ME["pid"] != pid:  # a fork (--detach) is another process
        _ME = {
            "pid": pid,
            "host": socket.gethostname(),
            "proc_start": process_start(pid),
            "heartbeat_at": None,
        }
    return {**_ME, "heartbeat_at": utcnow()}


def holder_alive(pid: int | None, host: str | None, proc_start: str | None) -> bool | None:
    """Whether the process that recorded ``pid`` on ``host`` still lives; None: another host."""
    if host != socket.gethostname():
        return None
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_start(pid)
    if now == "dead":
        return False
    return proc_start is None or now is None or now == proc_start


def dead_after(lease: float) -> Liveness:
    """The liveness predicate of this host: on this host a record's process is dead as soon
    as its pid is gone or reused; on another host when its heartbeat is older than ``lease``."""
    from ._reports import parse_ts

    def is_dead(ref: ProcessRef) -> bool:
        alive = holder_alive(ref.get("pid"), ref.get("host"), ref.get("proc_start"))
        if alive is None:
            beat = ref.get("heartbeat_at")
            return beat is None or time.time() - parse_ts(beat) > lease
        return not alive

    return is_dead


def process_tag(store: HistoryStore, dep_id: int) -> str:
    """The value of :data:`TAG_VARIABLE` in the environment of deployment ``dep_id``'s step
    processes: unique to this store and deployment."""
    import hashlib

    where = hashlib.sha256(store.identity.encode()).hexdigest()[:16]
    return f"{where}-{dep_id}"


def stop_orphans(store: HistoryStore, dep_ids: Sequence[int], grace: float = 1.0) -> list[int]:
    """Stop the step processes that dead deployments left running on this host.

    A kill -9 of ``shipyard deploy`` cannot reach its steps, which run in process groups of
    their own. Every step process inherits :data:`TAG_VARIABLE`, so they are found in ``/proc``
    by their environment, grandchildren included, whatever group they moved to: SIGTERM, up to
    ``grace`` seconds, then SIGKILL. Returns the pids signalled.
    """
    if not dep_ids:
        return []
    import signal

    from ._proc import alive
    from ._proc import tagged

    pids = tagged(TAG_VARIABLE, {process_tag(store, d) for d in dep_ids})
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def clean_up(store: HistoryStore, dep_ids: Sequence[int], pm: ShipyardPluginManager) -> None:
    """Let the plugins remove what interrupted deployments left outside this host's processes
    (containers, Jobs), from what their steps recorded; each action goes in the deployment's
    log (``shipyard_cleanup_interrupted``)."""
    import sys

    from ._secrets import mask
    from ._store import LogRecord

    if not pm.has_impls("shipyard_cleanup_interrupted"):
        return
    for dep_id in dep_ids:
        artifacts = store.artifacts(dep_id)
        if not artifacts:
            continue

        def log(text: str, dep_id: int = dep_id) -> None:
            text = mask(f"repair of #{dep_id}: {text}")
            print(f"shipyard: {text}", file=sys.stderr)
            store.record([], [LogRecord(dep_id, None, None, time.time(), "shipyard", text)])

        failures = pm.call_each(
            "shipyard_cleanup_interrupted", deployment=store.get(dep_id), artifacts=artifacts,
            log=log,
        )  # fmt: skip
        for plugin, exc in failures:  # the command goes on; the history says what was left
            log(f"plugin {plugin!r} could not clean up: {type(exc).__name__}: {exc}")


def repair(store: HistoryStore, lease: float) -> list[int]:
    """Mark the deployments whose process died ``interrupted`` and stop what they left."""
    dead = store.repair(dead_after(lease))
    stop_orphans(store, dead)
    return dead
