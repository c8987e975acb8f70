"""The ``python`` step: call a function (sync or async); an exception fails the step."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Any

from shipyard._exceptions import PipelineDefinitionError
from shipyard._pipeline import Step
from shipyard._plugins import hookimpl
from shipyard._reports import StepResult

if TYPE_CHECKING:
    from shipyard._plugins import StepTypeRegistry
    from shipyard._runner import StepContext


class PythonStep(Step):
    """Call ``fn(*args, **kwargs)``: coroutine functions are awaited, others run in a thread.

    ``name``, ``timeout`` and ``retries`` are the step's own options; every other keyword goes to
    ``fn``. Arguments are checked against ``fn``'s signature when the pipeline is built.
    A function may return a :class:`shipyard.StepResult`; any other return value is ignored.
    """

    kind = "python"

    def __init__(
        self,
        fn: Callable[..., Any],
        *args: Any,
        name: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        **kwargs: Any,
    ) -> None:
        if not callable(fn):
            raise PipelineDefinitionError(f"python step: {fn!r} is not callable")
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        try:
            inspect.signature(fn).bind(*args, **kwargs)
        except TypeError as exc:
            raise PipelineDefinitionError(
                f"python step {getattr(fn, '__qualname__', fn)!r}: {exc}"
            ) from None
        except ValueError:  # builtins without a signature: checked when called
            pass
        super().__init__(name=name, timeout=timeout, retries=retries)

    def default_name(self) -> str:
        return getattr(self.fn, "__name__", None) or repr(self.fn)

    def describe(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.default_name()}({', '.join(parts)})"

    async def run(self, context: StepContext) -> StepResult:
        args = context.resolve(list(self.args))
        kwargs = context.resolve(dict(self.kwargs))
        if inspect.iscoroutinefunction(self.fn):
            value = await self.fn(*args, **kwargs)
        else:
            import asyncio

            value = await asyncio.to_thread(self.fn, *args, **kwargs)
            if inspect.isawaitable(value):
                value = await value
        if isinstance(value, StepResult):
            return value
        return StepResult()


python = PythonStep


@hookimpl
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    registry.add(PythonStep)
