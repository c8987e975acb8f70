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


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    """``inspect.signature(fn)``, computed once per function: a pipeline that builds a step per
    item of a list calls the same function a thousand times."""
    try:
        cached = _signatures.get(fn)
    except TypeError:  # an unhashable callable
        return inspect.signature(fn)
    if cached is None:
        cached = inspect.signature(fn)
        if len(_signatures) < 1024:
            _signatures[fn] = cached
    return cached


_signatures: dict[Callable[..., Any], inspect.Signature] = {}


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
            _signature(fn).bind(*args, **kwargs)
        except TypeError as exc:
            raise PipelineDefinitionError(
                f"python step {getattr(fn, '__qualname__', fn)!r}: {exc}"
            ) from None
        except ValueError:  # builtins without a signature: checked when called
            pass
        self._coroutine = inspect.iscoroutinefunction(fn)
        super().__init__(name=name, timeout=timeout, retries=retries)

    def default_name(self) -> str:
        return getattr(self.fn, "__name__", None) or repr(self.fn)

    def describe(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.default_name()}({', '.join(parts)})"

    async def run(self, context: StepContext) -> StepResult:
        args = context.resolve(list(self.args))
        kwargs = context.resolve(dict(self.kwargs))
        with context.captured_output():  # print() and logging go to the step's log
            if self._coroutine:
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

        self._tasks: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, call: _Call) -> None:
        import threading

        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        if spawn:
            threading.Thread(target=self._work, name="shipyard-python", daemon=True).start()
        self._tasks.put(call)

    def _work(self) -> None:
        while True:
            call = self._tasks.get()
            call.run()
            # Idle before the caller learns of the result: its next call reuses this worker.
            with self._lock:
                self._idle += 1
            call.settle()


_workers = _DaemonWorkers()


#: How long the event loop blocks waiting for a blocking function before it gives the thread's
#: result back through the loop instead (seconds). A quick function (most steps of a pipeline
#: that only glue things together) is then handed back with no loop wake-up at all; a slow one
#: costs the loop this much once, which the other steps of a parallel stage barely notice.
QUICK_WAIT = 0.0005


class _Call:
    """One call handed to a worker: its outcome, and how the waiting coroutine learns of it."""

    __slots__ = ("args", "context", "done", "exc", "fn", "guard", "kwargs", "value", "wake")

    def __init__(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        import contextvars
        import threading

        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.context = contextvars.copy_context()
        self.value: Any = None
        self.exc: BaseException | None = None
        #: Held until the call returns: the loop's quick wait is an acquire with a timeout.
        self.done = threading.Lock()
        self.done.acquire()
        #: Orders "the call returned" against "the loop now waits through ``wake``".
        self.guard = threading.Lock()
        self.wake: Callable[[], None] | None = None

    def run(self) -> None:  # on the worker thread
        try:
            self.value = self.context.run(self.fn, *self.args, **self.kwargs)
        except BaseException as e:
            self.exc = e

    def settle(self) -> None:  # on the worker thread, after run()
        with self.guard:
            self.done.release()
            wake = self.wake
        if wake is not None:
            wake()


async def _in_daemon_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on a daemon worker thread (see :class:`_DaemonWorkers`).

    The loop first waits :data:`QUICK_WAIT` for the result; past that, the worker wakes it
    through ``call_soon_threadsafe`` when the call returns, and a cancelled step stops waiting.
    """
    import asyncio

    call = _Call(fn, args, kwargs)
    _workers.submit(call)
    if not call.done.acquire(timeout=QUICK_WAIT):
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not future.done():  # not cancelled meanwhile
                future.set_result(None)

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        with call.guard:
            returned = call.done.acquire(blocking=False)
            if not returned:
                call.wake = wake
        if not returned:
            await future
    if call.exc is not None:
        raise call.exc
    return call.value


python = PythonStep


@hookimpl
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    registry.add(PythonStep)
