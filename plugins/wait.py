"""The ``wait`` step: pause the deployment (e.g. to let caches expire before a check)."""

from __future__ import annotations

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


class WaitStep(Step):
    """Sleep for ``seconds``; cancellable at any moment."""

    kind = "wait"

    def __init__(
        self,
        seconds: float,
        *,
        name: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        **unknown: Any,
    ) -> None:
        reject_unknown_options(self, unknown)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise PipelineDefinitionError(
                f"wait step: seconds must be a number >= 0, got {seconds!r}"
            )
        self.seconds = float(seconds)
        super().__init__(name=name, timeout=timeout, retries=retries)

    def default_name(self) -> str:
        return f"wait {self.seconds:g}s"

    def describe(self) -> str:
        return f"sleep {self.seconds:g}s"

    async def run(self, context: StepContext) -> StepResult:
        import asyncio

        await asyncio.sleep(self.seconds)
        return StepResult()


wait = WaitStep


@hookimpl
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    registry.add(WaitStep)
