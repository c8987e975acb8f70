"""The ``approval`` step: a gate where the deployment stops until a human decides.

An approval step is alone in its stage. When the runner reaches it, the deployment is recorded
``awaiting_approval`` and the process exits 4; ``shipyard approve ID`` (from any process that
reaches the store) resumes it at the next stage, ``shipyard reject ID`` takes its failure path.
Nothing here runs while the deployment waits: the step is a description of the gate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

from shipyard.sdk import PipelineDefinitionError
from shipyard.sdk import Step
from shipyard.sdk import StepResult
from shipyard.sdk import hookimpl
from shipyard.sdk import reject_unknown_options

if TYPE_CHECKING:
    from shipyard.sdk import StepContext
    from shipyard.sdk import StepTypeRegistry

#: The shortest and the longest a gate may wait (1 s to 30 days).
MIN_TIMEOUT, MAX_TIMEOUT = 1.0, 30 * 86400.0


def _duration(value: Any, what: str) -> float:
    """Seconds from a number or a text like ``"90s"``, ``"30m"``, ``"4h"``, ``"2d"``."""
    if isinstance(value, bool):
        raise PipelineDefinitionError(
            f"approval step: {what} must be seconds or '4h', got {value!r}"
        )
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip():
        text = value.strip().lower()
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        try:
            if text[-1] in units:
                return float(text[:-1]) * units[text[-1]]
            return float(text)
        except ValueError:
            pass
    raise PipelineDefinitionError(
        f"approval step: {what} must be seconds or a text such as '90s', '30m', '4h', '2d', "
        f"got {value!r}"
    )


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


class ApprovalStep(Step):
    """A gate: the deployment stops here until enough approvers say yes (or no, or time runs out)."""

    kind = "approval"

    def __init__(
        self,
        *,
        timeout: float | str | None = None,
        on_timeout: str = "reject",
        approvers: Sequence[str] | None = None,
        required: int = 1,
        allow_self_approval: bool = False,
        instructions: str = "",
        options: Sequence[str] = (),
        remind_every: float | str | None = None,
        lock: str = "hold",
        on_reject: str | None = None,
        name: str | None = None,
        **unknown: Any,
    ) -> None:
        reject_unknown_options(self, unknown)
        if timeout is None:
            raise PipelineDefinitionError(
                "approval step: timeout is required (there is no hidden default): say how long "
                "the gate waits, e.g. timeout='4h', and what happens then (on_timeout='reject' "
                "or 'approve')"
            )
        self.gate_timeout = _duration(timeout, "timeout")
        if not MIN_TIMEOUT <= self.gate_timeout <= MAX_TIMEOUT:
            raise PipelineDefinitionError(
                f"approval step: timeout must be between 1 second and 30 days, got {timeout!r}"
            )
        if on_timeout not in ("reject", "approve"):
            raise PipelineDefinitionError(
                f"approval step: on_timeout must be 'reject' or 'approve', got {on_timeout!r}"
            )
        if approvers is not None and (
            isinstance(approvers, str)
            or not all(isinstance(a, str) and a for a in approvers)
            or not approvers
        ):
            raise PipelineDefinitionError(
                "approval step: approvers must be None (anyone) or a non-empty list of user "
                f"names, got {approvers!r}"
            )
        if isinstance(required, bool) or not isinstance(required, int) or required < 1:
            raise PipelineDefinitionError(
                f"approval step: required must be a whole number >= 1, got {required!r}"
            )
        if approvers is not None and required > len(set(approvers)):
            raise PipelineDefinitionError(
                f"approval step: required={required} approvals but only {len(set(approvers))} "
                "approver(s) are listed"
            )
        if isinstance(options, str) or not all(isinstance(o, str) and o for o in options):
            raise PipelineDefinitionError(
                f"approval step: options must be a list of non-empty texts, got {options!r}"
            )
        if lock not in ("hold", "release"):
            raise PipelineDefinitionError(
                f"approval step: lock must be 'hold' or 'release', got {lock!r}"
            )
        if on_reject not in (None, "rollback", "fail"):
            raise PipelineDefinitionError(
                f"approval step: on_reject must be None, 'rollback' or 'fail', got {on_reject!r}"
            )
        self.on_timeout = on_timeout
        self.approvers = sorted(set(approvers)) if approvers is not None else None
        self.required = required
        self.allow_self_approval = bool(allow_self_approval)
        self.instructions = str(instructions)
        self.options = list(options)
        self.remind_every = _duration(remind_every, "remind_every") if remind_every else None
        self.lock = lock
        self.on_reject = on_reject
        super().__init__(name=name)

    def default_name(self) -> str:
        return "approval"

    def describe(self) -> str:
        who = "anyone" if self.approvers is None else ", ".join(self.approvers)
        self_ = "self-approval allowed" if self.allow_self_approval else "no self-approval"
        lock = "lock held while waiting" if self.lock == "hold" else "lock released while waiting"
        choice = f"; choices {', '.join(self.options)}" if self.options else ""
        return (
            f"approval by {who} ({self.required} required, {self_}); times out after "
            f"{_human(self.gate_timeout)} -> {self.on_timeout}; {lock}{choice}"
        )

    def spec(self) -> dict[str, Any]:
        """What the store keeps of the gate: everything its decisions are judged by."""
        return {
            "timeout": self.gate_timeout, "on_timeout": self.on_timeout,
            "approvers": self.approvers, "required": self.required,
            "allow_self_approval": self.allow_self_approval, "instructions": self.instructions,
            "options": self.options, "remind_every": self.remind_every, "lock": self.lock,
            "on_reject": self.on_reject,
        }  # fmt: skip

    async def run(self, context: StepContext) -> StepResult:
        # The runner stops at a gate before running it; reaching this is a bug, not a pass.
        raise RuntimeError("an approval step is a gate: the runner suspends the deployment there")


approval = ApprovalStep


def gate_of(stage: Any) -> ApprovalStep | None:
    """The approval step of ``stage`` when it is a gate's stage, else None."""
    steps = stage.steps
    if len(steps) == 1 and isinstance(steps[0], ApprovalStep):
        return steps[0]
    return None


@hookimpl
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    registry.add(ApprovalStep)
