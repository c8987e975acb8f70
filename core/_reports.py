"""Statuses and results: plain dataclasses that serialise to JSON."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from typing import Any


class Status(enum.StrEnum):
    """The status of a deployment, a stage or a step."""

    #: Recorded, not started yet (waiting for a lock or for its turn).
    PENDING = "pending"
    #: Running now.
    RUNNING = "running"
    #: Finished without error.
    SUCCEEDED = "succeeded"
    #: Finished with an error.
    FAILED = "failed"
    #: Stopped by Ctrl-C, SIGTERM or ``shipyard cancel``.
    CANCELLED = "cancelled"
    #: Its process died without finishing it; found later by another command.
    INTERRUPTED = "interrupted"
    #: Never run because an earlier failure stopped the deployment (steps and stages only).
    SKIPPED = "skipped"
    #: Stopped at an approval gate, no process running: ``shipyard approve`` resumes it.
    AWAITING_APPROVAL = "awaiting_approval"
    #: Given up for a newer deployment while it awaited approval (``deploy --supersede``).
    SUPERSEDED = "superseded"
    #: An approval gate's stage and step while the deployment awaits the decision.
    WAITING = "waiting"

    def __str__(self) -> str:
        return self.value

    @property
    def is_finished(self) -> bool:
        return self not in (
            Status.PENDING,
            Status.RUNNING,
            Status.AWAITING_APPROVAL,
            Status.WAITING,
        )


def utcnow() -> str:
    """The current time as ISO 8601 UTC with microseconds; sorts like the time it names."""
    return format_ts(time.time())


_last_second: list[tuple[int, str]] = [(-1, "")]


def format_ts(ts: float) -> str:
    # The runner stamps every event: the date and time of one second is formatted once (events
    # come many to a second), and time.strftime is several times faster than datetime's.
    secs = int(ts)
    micros = round((ts - secs) * 1_000_000)
    if micros == 1_000_000:
        secs, micros = secs + 1, 0
    last, text = _last_second[0]
    if last != secs:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        _last_second[0] = (secs, text)
    return f"{text}.{micros:06d}Z"


def parse_ts(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


@dataclass
class StepResult:
    """What running one step produced.

    Step types return it from ``run()``; the runner fills in attempts and times.
    """

    status: Status = Status.SUCCEEDED
    #: Process or container exit code, when the step ran one.
    exit_code: int | None = None
    #: A one-paragraph explanation of a failure, shown and recorded.
    error: str | None = None
    #: The last lines of output that explain a failure.
    output_tail: list[str] = field(default_factory=list)
    attempts: int = 1
    started_at: str | None = None
    finished_at: str | None = None
    #: True when the step failed inside a ``continue_on_failure`` stage.
    warning: bool = False
    #: An approval gate (``sy.approval(...)``) the deployment stops at after this step, whose
    #: status is then ``waiting``: approving it accepts the step's result and goes on with the
    #: next stage (an analysis step's ``on_inconclusive``).
    gate: Any = None

    @property
    def ok(self) -> bool:
        return self.status is Status.SUCCEEDED

    @classmethod
    def failed(
        cls, error: str, *, exit_code: int | None = None, output_tail: list[str] | None = None
    ) -> StepResult:
        return cls(Status.FAILED, exit_code=exit_code, error=error, output_tail=output_tail or [])


Status.__module__ = "shipyard"

StepResult.__module__ = "shipyard"
