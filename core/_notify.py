"""Delivers deployment events to notification sinks without ever stalling or failing a deployment.

Each sink gets its own queue and worker thread, so events to one sink arrive in order and a slow
sink delays nobody. When the deployment ends, the dispatcher waits for each sink at most its
``timeout``; a sink still busy then is abandoned (its thread is a daemon) and reported.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from ._events import Event
from ._secrets import mask
from ._secrets import mask_any

#: Events that reach sinks; output lines stay in the history and on the console.
SINK_EVENTS = frozenset(
    {
        "shipyard_deployment_started",
        "shipyard_deployment_finished",
        "shipyard_stage_started",
        "shipyard_stage_finished",
        "shipyard_step_started",
        "shipyard_step_finished",
        "shipyard_rollback_started",
    }
)

_STOP = object()


def sink_name(sink: Any) -> str:
    return mask(str(getattr(sink, "name", None) or type(sink).__name__))


class _Worker:
    def __init__(self, sink: Any, errors: list[str], lock: threading.Lock) -> None:
        self.sink = sink
        self.timeout = float(getattr(sink, "timeout", 10.0))
        self.queue: queue.Queue[Any] = queue.Queue()
        self.errors = errors
        self.lock = lock
        self.thread = threading.Thread(
            target=self._loop, name=f"shipyard-notify-{sink_name(sink)}", daemon=True
        )
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                break
            try:
                self.sink.send(item)
            except Exception as exc:
                text = mask(
                    f"notifier {sink_name(self.sink)} failed on {item.get('event')}: "
                    f"{type(exc).__name__}: {exc}"
                )
                with self.lock:
                    self.errors.append(text)
                print(f"shipyard: warning: {text}", file=sys.stderr)
        close = getattr(self.sink, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # closing is best effort
                pass


class NotifierDispatcher:
    """A core event listener that fans events out to sinks (see module docstring)."""

    def __init__(self, sinks: Sequence[Any]) -> None:
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.workers = [_Worker(s, self.errors, self._lock) for s in sinks]

    def handle(self, event: Event) -> None:
        if not self.workers or event.hook not in SINK_EVENTS:
            return
        payload = mask_any(event.to_dict())
        for w in self.workers:
            w.queue.put(payload)

    def close(self) -> list[str]:
        """Let sinks finish, each within its timeout; return the errors to record."""
        for w in self.workers:
            w.queue.put(_STOP)
        for w in self.workers:
            deadline = time.monotonic() + w.timeout
            w.thread.join(max(0.0, deadline - time.monotonic()))
            if w.thread.is_alive():
                text = (
                    f"notifier {sink_name(w.sink)} did not finish within its timeout of "
                    f"{w.timeout:g}s; {w.queue.qsize()} event(s) were not delivered"
                )
                with self._lock:
                    self.errors.append(text)
                print(f"shipyard: warning: {text}", file=sys.stderr)
        return list(self.errors)
