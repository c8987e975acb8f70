"""The history's listener on the event stream: which events go to the store, and when.

The store decides how to write (:meth:`HistoryStore.record`); this module decides what to
batch: at most two commits per step, log lines riding along with the next one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Any
from typing import cast

from ._exceptions import HistoryError
from ._store import LogRecord
from ._store import StagePlan
from ._store import StepPlan

if TYPE_CHECKING:
    from ._events import DeploymentFinished
    from ._events import DeploymentStarted
    from ._events import DeploymentSuspended
    from ._events import Event
    from ._events import RollbackStarted
    from ._events import StepFinished
    from ._events import StepOutput
    from ._events import StepStarted
    from ._pipeline import Stage
    from ._store import GateRecord
    from ._store import HistoryStore


def plan_of(stages: list[Stage]) -> list[StagePlan]:
    """The stages as the store records them (step descriptions masked)."""
    from ._secrets import mask

    return [
        StagePlan(
            s.name,
            s.parallel,
            s.continue_on_failure,
            [StepPlan(st.name, st.kind, mask(st.describe())) for st in s.steps],
        )
        for s in stages
    ]


def fingerprint(stages: list[Stage]) -> list[Any]:
    """What a resumed deployment must find again: each stage's name and its steps' kinds."""
    return [[s.name, [st.kind for st in s.steps]] for s in stages]


class HistoryRecorder:
    """Turns the event stream into history writes: at most two commits per step.

    Stage transitions and log lines ride along with the next step commit; log lines of a long
    step are also committed at most ``flush_interval`` seconds after it printed them (a timer
    on the event loop when the step goes quiet), so ``logs --follow`` and the dashboard see
    them within that.
    Everything the engine records about a running deployment goes through here.
    """

    def __init__(
        self,
        store: HistoryStore,
        flush_interval: float = 0.1,
        max_lines: int = 2000,
        on_error: Callable[[HistoryError], None] | None = None,
    ) -> None:
        self.store = store
        #: The first write error; after it the recorder stops writing (the run is stopped).
        self.error: HistoryError | None = None
        self.on_error = on_error
        self.flush_interval = flush_interval
        #: A server store commits step ends and log lines at most this often (and at stage
        #: ends) rather than at every step: its commits cost a round trip (``batch_interval``
        #: of the store; None for the embedded store, whose commits are local and cheap).
        self.batch_interval: float | None = getattr(store, "batch_interval", None)
        # Lines are then flushed by time only (commits grow with a deployment's duration, not
        # its output); the cap only bounds memory.
        self.max_lines = max_lines if self.batch_interval is None else max(max_lines, 50_000)
        self._transitions: list[Event] = []
        self._logs: list[LogRecord] = []
        self._last_flush = time.monotonic()
        #: The loop's timer that commits held log lines of a step that went quiet.
        self._timer: asyncio.TimerHandle | None = None
        self._handlers: dict[str, Callable[[Event], None]] = {
            "shipyard_step_output": self._output,  # type: ignore[dict-item]
            "shipyard_step_finished": self._step_finished,  # type: ignore[dict-item]
            "shipyard_step_started": self._transitions.append,
            "shipyard_stage_started": self._commit_after,
            "shipyard_stage_finished": self._stage_finished,
            "shipyard_deployment_started": self._started,  # type: ignore[dict-item]
            "shipyard_rollback_started": self._rollback,  # type: ignore[dict-item]
            "shipyard_deployment_finished": self._finished,  # type: ignore[dict-item]
            "shipyard_deployment_suspended": self._suspended,  # type: ignore[dict-item]
        }
        self._stages: list[Stage] = []

    def flush(self, durable: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transitions or self._logs:
            transitions, logs = self._take()
            self.store.record(transitions, logs, durable=durable)
        self._last_flush = time.monotonic()

    def _take(self) -> tuple[list[Event], list[LogRecord]]:
        # Emptied in place: the handler table holds the bound ``append`` of this list.
        batch = (self._transitions[:], self._logs[:])
        self._transitions.clear()
        self._logs.clear()
        return batch

    def tick(self) -> None:
        """Flush what waited ``flush_interval``: a step that printed and then went quiet would
        otherwise keep its lines from ``logs --follow``, and a long step would not show as
        running, until it finished."""
        if self.error is not None or not (self._logs or self._transitions):
            return
        if time.monotonic() - self._last_flush <= self.flush_interval:
            return
        self._guarded(self.flush)

    def note(self, dep_id: int, text: str, stream: str = "shipyard") -> None:
        """Record a message of Shipyard's own (a notifier error, a skipped rollback) in the
        deployment's log; written with the next commit."""
        self._logs.append(LogRecord(dep_id, None, None, time.time(), stream, text))

    def handle(self, event: Event) -> None:
        handler = self._handlers.get(event.hook)  # the others (analysis, ...) change no row
        if handler is not None and self.error is None:
            self._guarded(handler, event)

    def _guarded(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except HistoryError as exc:
            # A full disk or a broken file: stop the deployment rather than run it unrecorded.
            self.error = exc
            if self.on_error is not None:
                self.on_error(exc)

    # -- one method per kind of event -------------------------------------------------------------

    def _output(self, e: StepOutput) -> None:
        dep_id = e.deployment.id
        self._logs.extend(
            LogRecord(dep_id, e.stage_index, e.index, ln.ts, ln.stream, ln.text) for ln in e.lines
        )
        if (
            len(self._logs) >= self.max_lines
            or time.monotonic() - self._last_flush > self.flush_interval
        ):
            self.flush()
        elif self._timer is None:
            self._flush_later()

    def _flush_later(self) -> None:
        """Commit the lines just held ``flush_interval`` after the last commit even if the step
        prints nothing more; they would otherwise wait for the next line or the heartbeat's
        tick (a second). Only on the event loop (else the tick still flushes them)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        delay = max(0.0, self.flush_interval - (time.monotonic() - self._last_flush))
        self._timer = loop.call_later(delay, self._deferred)

    def _deferred(self) -> None:
        self._timer = None
        if self.error is None and self._logs:
            self._guarded(self.flush)

    def _commit_after(self, e: Event) -> None:
        # A step's end is one commit; so is a stage's start, so that the previous stage's end
        # and this one's start are durable before any of its steps runs (a crash never leaves a
        # finished stage "running"). A step's start waits for its end: a quick step is one
        # commit, a long one shows as running at the next heartbeat's tick().
        self._transitions.append(e)
        self.flush()

    def _stage_finished(self, e: Event) -> None:
        self._transitions.append(e)
        if self.batch_interval is not None:  # batched steps are durable at their stage's end
            self.flush()

    def _step_finished(self, e: StepFinished) -> None:
        # The end records the start time too: a start still waiting in the batch is redundant
        # (one statement less for every quick step).
        t = self._transitions
        for i in range(len(t) - 1, -1, -1):
            s = cast("StepStarted", t[i])
            if (
                s.hook == "shipyard_step_started"
                and s.index == e.index
                and s.stage_index == e.stage_index
            ):
                del t[i]
                break
        if self.batch_interval is not None:
            t.append(e)
            if time.monotonic() - self._last_flush >= self.batch_interval:
                self.flush()
            return
        self._commit_after(e)

    def _started(self, e: DeploymentStarted) -> None:
        self.flush()
        self._stages = e.stages
        if not e.resumed:  # a resumed deployment's stages are recorded already
            self.store.record_plan(e.deployment.id, plan_of(e.stages), e.start_stage, note=e.note)

    def _suspended(self, e: DeploymentSuspended) -> None:
        d = e.deployment
        gate: GateRecord = {
            "stage_idx": e.index, "stage": e.stage.name, "requested_at": e.requested_at,
            "expires_at": e.expires_at, "spec": e.gate.spec(),
            "fingerprint": fingerprint(self._stages[: e.index]),
            "context": {"vars": dict(d.vars), "previous_version": d.previous_version,
                        "rollback_of": d.rollback_of, "restores": d.restores,
                        "approvals": {k: [list(v.approvers), v.choice, list(v.comments)]
                                      for k, v in d.approvals.items()}},
        }  # fmt: skip
        transitions, logs = self._take()
        self.store.suspend(d.id, gate, transitions, logs)

    def _rollback(self, e: RollbackStarted) -> None:
        self.note(e.deployment.id, f"rolling back to version {e.target}: {e.reason}")
        self.flush()

    def _finished(self, e: DeploymentFinished) -> None:
        transitions, logs = self._take()
        self.store.finish(e.deployment.id, e.status, e.error, transitions, logs)
