"""What in-process code prints while a step runs becomes that step's output.

A ``python`` step (or any step that runs code of the user's in this process) wraps the call in
:meth:`shipyard.StepContext.captured_output`. While it runs, ``sys.stdout`` and ``sys.stderr``
(which the CLI replaces with :class:`StepStreams` for the whole command) hand what is written
to that step: its lines are logged like a command's output — masked, shown with the step's
gutter, recorded in the history — instead of going to the terminal as they are.

Which step wrote something is known from the context: a coroutine function runs in its step's
task, and a blocking function in a worker thread that got a copy of that context. A thread the
function starts itself has a context of its own; its output is given to the step when that step
is the only one capturing at the moment (otherwise it goes to the terminal as before). Lines
are handed to the event loop's thread (the reporter and the history live there), in order; a
line not yet ended is logged when the step ends.
"""

from __future__ import annotations

import contextvars
import threading
from itertools import groupby
from operator import itemgetter
from typing import TYPE_CHECKING
from typing import Any

from ._output import pieces

if TYPE_CHECKING:
    from ._runner import StepContext

_current: contextvars.ContextVar[Capture | None] = contextvars.ContextVar(
    "shipyard_capture", default=None
)
#: The captures active now (any thread may read it; changed under ``_active_lock``).
_active: list[Capture] = []
_active_lock = threading.Lock()
#: Set on the loop's thread while captured lines are logged: the reporter's own writes pass.
_passing = threading.local()


class Capture:
    """The output of one step's in-process code, on its way to the step's log; a context
    manager (see :func:`capturing`), entered on the event loop's thread."""

    __slots__ = ("_lines", "_lock", "_partial", "_scheduled", "_token", "closed", "ctx", "loop",
                 "loop_thread")  # fmt: skip

    def __init__(self, ctx: StepContext) -> None:
        import asyncio

        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self._lock = threading.Lock()
        self._lines: list[tuple[str, str]] = []
        self._partial: dict[str, str] = {}
        self._scheduled = False
        self.closed = False

    def __enter__(self) -> Capture:
        self._token = _current.set(self)
        _active.append(self)  # atomic: readers in other threads see it whole
        return self

    def __exit__(self, *exc: object) -> None:
        _active.remove(self)
        _current.reset(self._token)
        with self._lock:
            self.closed = True  # what a lingering thread writes now goes to the terminal
            pending = bool(self._lines or self._partial)
        if pending:
            self.drain(final=True)

    def feed(self, stream: str, text: str) -> bool:
        """Take ``text`` written to ``stream`` (any thread); its complete lines are logged soon.
        False: the step is over, ``text`` was not taken."""
        with self._lock:
            if self.closed:
                return False
            text = self._partial.pop(stream, "") + text
            *complete, rest = text.split("\n")
            if rest:
                self._partial[stream] = rest
            self._lines += [(stream, ln.removesuffix("\r")) for ln in complete]
            if not complete or self._scheduled:
                return True
            self._scheduled = True
        try:
            if threading.get_ident() == self.loop_thread:
                self.loop.call_soon(self.drain)
            else:
                self.loop.call_soon_threadsafe(self.drain)
        except RuntimeError:  # the loop is closed: the step is over
            pass
        return True

    def drain(self, final: bool = False) -> None:
        """Log the lines written so far (on the loop's thread); ``final``: unfinished ones too."""
        with self._lock:
            lines, self._lines = self._lines, []
            self._scheduled = False
            if final:
                lines += [(s, t) for s, t in self._partial.items() if t]
                self._partial.clear()
        if not lines:
            return
        _passing.on = True
        try:  # one event per run of lines of the same stream
            for stream, run in groupby(lines, key=itemgetter(0)):
                self.ctx.log_lines([p for _, t in run for p in pieces(t)], stream)
        finally:
            _passing.on = False


def capturing(ctx: StepContext) -> Capture:
    """A context manager: what this step's code writes to ``sys.stdout``/``sys.stderr``
    meanwhile goes to its log."""
    return Capture(ctx)


def _owner() -> Capture | None:
    """The capture that what is being written belongs to, if any."""
    cap = _current.get()
    if cap is not None:
        return cap
    if len(_active) == 1:  # a thread started by the only step capturing now
        only = _active[0]
        thread = threading.current_thread()
        if thread.ident != only.loop_thread and not thread.name.startswith("shipyard-"):
            return only
    return None


class StepStreams:
    """``sys.stdout`` or ``sys.stderr`` during a CLI command: what a capturing step writes goes
    to its log (see the module's docstring); everything else goes on to ``target``."""

    def __init__(self, target: Any, stream: str) -> None:
        self.target = target
        self.stream = stream

    def write(self, text: str) -> int:
        if _active and not getattr(_passing, "on", False):
            cap = _owner()
            if cap is not None and isinstance(text, str) and cap.feed(self.stream, text):
                return len(text)
        return int(self.target.write(text))

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return bool(self.target.isatty())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)
