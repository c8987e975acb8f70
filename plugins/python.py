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
            value = await _in_daemon_thread(self.fn, *args, **kwargs)
            if inspect.isawaitable(value):
                value = await value
        if isinstance(value, StepResult):
            return value
        return StepResult()


async def _in_daemon_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a daemon thread of its own.

    Not ``asyncio.to_thread``: a thread cannot be stopped, and the default executor is joined
    when the event loop and the interpreter shut down, so a cancelled deployment (Ctrl-C,
    SIGTERM, ``shipyard cancel``) would wait for a blocking function to return before exiting.
    """
    import asyncio
    import contextvars
    import threading

    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(value: Any, exc: BaseException | None) -> None:
        if future.done():  # cancelled meanwhile
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)

    def target() -> None:
        try:
            value, exc = context.run(fn, *args, **kwargs), None
        except BaseException as e:
            value, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, value, exc)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=target, name=f"shipyard-python-{getattr(fn, '__name__', 'step')}",
                     daemon=True).start()  # fmt: skip
    return await future


python = PythonStep


@hookimpl
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    registry.add(PythonStep)
