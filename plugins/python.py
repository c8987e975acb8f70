"""The ``python`` step: call a function (sync or async); an exception fails the step."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Any

from shipyard.sdk import PipelineDefinitionError
from shipyard.sdk import Step
from shipyard.sdk import StepResult
from shipyard.sdk import hookimpl

if TYPE_CHECKING:
    from shipyard.sdk import StepContext
    from shipyard.sdk import StepTypeRegistry


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


class _DaemonWorkers:
    """Daemon threads that run blocking step functions, reused from one step to the next.

    Not ``asyncio.to_thread``: a thread cannot be stopped, and the default executor is joined
    when the event loop and the interpreter shut down, so a cancelled deployment (Ctrl-C,
    SIGTERM, ``shipyard cancel``) would wait for a blocking function to return before exiting.
    Not a thread per call either: starting one costs more than a no-op step should. A worker
    stuck in a function that never returns is simply replaced by a new one.
    """

    def __init__(self) -> None:
        import queue
        import threading

        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, task: Callable[[], None]) -> None:
        import threading

        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        if spawn:
            threading.Thread(target=self._work, name="shipyard-python", daemon=True).start()
        self._tasks.put(task)

    def _work(self) -> None:
        while True:
            self._tasks.get()()
            with self._lock:
                self._idle += 1


_workers = _DaemonWorkers()


async def _in_daemon_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on a daemon worker thread (see :class:`_DaemonWorkers`)."""
    import asyncio
    import contextvars

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

    def task() -> None:
        try:
            value, exc = context.run(fn, *args, **kwargs), None
        except BaseException as e:
            value, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, value, exc)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    _workers.submit(task)
    return await future


python = PythonStep


@hookimpl
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    registry.add(PythonStep)
