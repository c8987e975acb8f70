"""Delivers deployment events to notification sinks without ever stalling or failing a deployment.

Each sink gets its own queue and worker thread, so events to one sink arrive in order and a slow
sink delays nobody. When the deployment ends, the dispatcher waits for the sinks at most their
``timeout`` (all at once, not one after another); a sink still busy then is abandoned (its
thread is a daemon, and drops the events it has not started) and reported.

A sink is an object with ``send(payload: dict) -> None``, a ``name`` and a ``timeout``, and
optionally ``open(resolve)`` and ``close()``. ``open`` is called in the sink's thread before the
first event with a function that replaces secret placeholders by their values, so a sink can
use secrets in URLs and headers; ``close`` after the last. One sink object may serve several
deployments at once (``@pipeline(notify=[...])``), each from its own thread.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
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
        "shipyard_deployment_suspended",
        "shipyard_approval_decided",
        "shipyard_approval_expired",
        "shipyard_approval_reminder",
        "shipyard_analysis_started",
        "shipyard_analysis_finished",
        "shipyard_canary_step_reached",
    }
)

_STOP = object()


def sink_name(sink: Any) -> str:
    return mask(str(getattr(sink, "name", None) or type(sink).__name__))


class _Worker:
    def __init__(
        self,
        sink: Any,
        errors: list[str],
        lock: threading.Lock,
        resolve: Callable[[Any], Any] | None = None,
    ) -> None:
        self.sink = sink
        self.timeout = float(getattr(sink, "timeout", 10.0))
        self.queue: queue.Queue[Any] = queue.Queue()
        self.errors = errors
        self.lock = lock
        self.resolve = resolve or (lambda value: value)
        #: Set when the dispatcher stopped waiting: the events not yet started are dropped.
        self.abandoned = threading.Event()
        self.thread = threading.Thread(
            target=self._loop, name=f"shipyard-notify-{sink_name(sink)}", daemon=True
        )
        self.thread.start()

    def _report(self, text: str) -> None:
        if self.abandoned.is_set():  # already reported as "did not finish"; nobody is listening
            return
        text = mask(text)
        with self.lock:
            self.errors.append(text)
        print(f"shipyard: warning: {text}", file=sys.stderr)

    def _loop(self) -> None:
        broken = False
        opener = getattr(self.sink, "open", None)
        if opener is not None:
            try:
                opener(self.resolve)
            except Exception as exc:
                broken = True
                self._report(
                    f"notifier {sink_name(self.sink)} could not start: {type(exc).__name__}: "
                    f"{exc}; it receives no events"
                )
        # A run of failures of the same cause is reported once, then counted.
        run: list[Any] = [None, 0]  # the cause, and how many more failed the same way

        def end_run(cause: str | None = None) -> None:
            if run[1]:
                self._report(
                    f"notifier {sink_name(self.sink)} failed on {run[1]} more event(s) the same "
                    f"way ({run[0]})"
                )
            run[:] = [cause, 0]

        while True:
            item = self.queue.get()
            if item is _STOP:
                break
            if broken or self.abandoned.is_set():
                continue
            try:
                self.sink.send(item)
            except Exception as exc:
                cause = f"{type(exc).__name__}: {str(exc).rsplit(': ', 1)[-1]}"
                if cause == run[0]:
                    run[1] += 1
                    continue
                end_run(cause)
                self._report(
                    f"notifier {sink_name(self.sink)} failed on {item.get('event')}: "
                    f"{type(exc).__name__}: {exc}"
                )
            else:
                end_run()
        end_run()
        close = getattr(self.sink, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # closing is best effort
                pass


class NotifierDispatcher:
    """A core event listener that fans events out to sinks (see module docstring)."""

    def __init__(self, sinks: Sequence[Any], resolve: Callable[[Any], Any] | None = None) -> None:
        """:param resolve: replaces secret placeholders by their values, for sinks' ``open``."""
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.workers = [_Worker(s, self.errors, self._lock, resolve) for s in sinks]
        #: When the deployment finished: sinks' timeouts count from then.
        self._finished_at: float | None = None

    def handle(self, event: Event) -> None:
        if not self.workers or event.hook not in SINK_EVENTS:
            return
        if event.hook == "shipyard_deployment_finished":
            self._finished_at = time.monotonic()
        payload = mask_any(event.to_dict())
        for w in self.workers:
            w.queue.put(payload)

    def close(self) -> list[str]:
        """Let sinks finish, each within its timeout of the deployment's end; return the errors
        to record."""
        for w in self.workers:
            w.queue.put(_STOP)
        start = self._finished_at or time.monotonic()
        for w in self.workers:
            # Stop waiting a little early (a tenth, at most 0.1 s) to record the failure, so the
            # whole delay a sink causes stays within its timeout.
            end = start + w.timeout - min(0.1, w.timeout / 10)
            w.thread.join(max(0.0, end - time.monotonic()))
            if w.thread.is_alive():
                w.abandoned.set()
                text = (
                    f"notifier {sink_name(w.sink)} did not finish within its timeout of "
                    f"{w.timeout:g}s; {w.queue.qsize()} event(s) were not delivered"
                )
                with self._lock:
                    self.errors.append(text)
                print(f"shipyard: warning: {text}", file=sys.stderr)
        return list(self.errors)
