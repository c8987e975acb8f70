"""The ``wait`` step: pause the deployment (e.g. to let caches expire before a check)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

from shipyard._exceptions import PipelineDefinitionError
from shipyard._pipeline import Step
from shipyard._pipeline import reject_unknown_options
from shipyard._plugins import hookimpl
from shipyard._reports import StepResult

if TYPE_CHECKING:
    from shipyard._plugins import StepTypeRegistry
    from shipyard._runner import StepContext


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
