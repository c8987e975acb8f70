"""Turning a step's output bytes into log lines, shared by every step type that streams output.

:class:`LineSplitter` decodes UTF-8 (invalid bytes become U+FFFD, never an error), yields
complete lines as they arrive and cuts a line longer than :data:`MAX_LINE` (never through a
secret, so masking still sees it whole). :class:`ThreadedFollower` follows a blocking stream
(a container's or a pod's log) in a thread of its own and logs the lines on the event loop.
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Callable
from collections.abc import Iterable
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

from ._secrets import cut_point
from ._secrets import mask_reach

if TYPE_CHECKING:
    import asyncio

    from ._runner import StepContext

#: Lines longer than this are cut into pieces, so one endless line cannot exhaust memory.
MAX_LINE: Final = 64 * 1024
#: How many trailing lines of output a failure shows.
TAIL_LINES: Final = 20


def pieces(line: str) -> list[str]:
    """``line`` cut into pieces of at most :data:`MAX_LINE` characters (never inside a secret)."""
    out = []
    while len(line) > MAX_LINE:
        cut = cut_point(line, MAX_LINE)
        out.append(line[:cut])
        line = line[cut:]
    out.append(line)
    return out


class LineSplitter:
    """Bytes in, complete lines out, in bounded memory."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""

    def feed(self, chunk: bytes) -> list[str]:
        """The lines completed by ``chunk`` (without their ``\\n`` or ``\\r\\n``)."""
        text = self._pending + self._decoder.decode(chunk)
        finished = text.split("\n")
        pending = finished.pop()
        # A finished line drops its "\r", then is cut like any long line (it may have arrived
        # whole in one chunk).
        lines = [p for ln in finished for p in pieces(ln[:-1] if ln.endswith("\r") else ln)]
        # An unfinished line is logged in pieces as it grows. Cut only once a secret that starts
        # before MAX_LINE is whole, and never inside one; keep one more character so that a "\r"
        # ending the line is not left alone to become a line of its own.
        while len(pending) > MAX_LINE + mask_reach() + 1:
            cut = cut_point(pending, MAX_LINE)
            lines.append(pending[:cut])
            pending = pending[cut:]
        self._pending = pending
        return lines

    def finish(self) -> list[str]:
        """What is left once the stream ended: the last line when it had no newline."""
        pending = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return pieces(pending) if pending else []


class ThreadedFollower:
    """Follows a blocking byte stream in a thread of its own; logs its lines on the loop.

    A dedicated thread (not the default executor) because a log is followed for as long as its
    container or pod runs, and several may run in parallel stages. Subclasses implement
    :meth:`open` (start the stream) and :meth:`interrupt` (make a blocked read return).
    Create it on the event loop's thread.
    """

    #: Prefix of the thread's name.
    kind = "logs"

    def __init__(self, context: StepContext, label: str, stream: str = "stdout") -> None:
        import asyncio
        import threading

        self.context = context
        self.label = label
        self.stream_name = stream
        #: The last lines seen, for failure messages.
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        #: Why the output is incomplete, when it is.
        self.problem: str | None = None
        self.started = False
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._handle: Any = None
        self._closed = False
        self._lock = threading.Lock()

    # -- for subclasses ---------------------------------------------------------------------------

    def open(self) -> tuple[Any, Iterable[bytes]]:
        """Start the stream; return a handle for :meth:`interrupt` and the chunks to read."""
        raise NotImplementedError

    def interrupt(self, handle: Any) -> None:
        """Make a thread blocked reading ``handle`` return now."""
        raise NotImplementedError

    def explain(self, exc: Exception) -> str | None:
        """Why following failed, in one sentence; None to say nothing (the outcome decides)."""
        return None

    def release(self, handle: Any) -> None:
        """Free what :meth:`open` took, once reading has ended, however it ended.

        Called in the reading thread, also when :meth:`close` came before :meth:`open` returned.
        The default does nothing; a stream whose socket outlives an interrupt closes it here.
        """

    # -- driving ----------------------------------------------------------------------------------

    def start(self) -> None:
        import threading

        self.started = True
        threading.Thread(
            target=self._run, name=f"shipyard-{self.kind}-{self.label}", daemon=True
        ).start()

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody listens any more
            pass

    def _emit(self, lines: list[str]) -> None:
        self.context.log_lines(lines, self.stream_name)
        self.tail.extend(lines[-TAIL_LINES:])

    def _finish(self, problem: str | None) -> None:
        if problem and not self._closed:
            self.problem = problem
        if not self._done.done():
            self._done.set_result(None)

    def _run(self) -> None:
        splitter = LineSplitter()
        problem = None
        handle = None
        try:
            handle, chunks = self.open()
            with self._lock:
                self._handle = handle
                closed = self._closed
            if closed:
                self.interrupt(handle)
                return
            for chunk in chunks:
                lines = splitter.feed(chunk)
                if lines:
                    self._post(self._emit, lines)
        except Exception as exc:  # a broken stream loses output, never the step's outcome
            problem = self.explain(exc)
        finally:
            if handle is not None:
                try:
                    self.release(handle)
                except Exception:  # releasing is best effort
                    pass
            rest = splitter.finish()
            if rest:
                self._post(self._emit, rest)
            self._post(self._finish, problem)

    async def wait(self, timeout: float | None = None) -> None:
        """Wait until the stream ends (its process stopped, or :meth:`close`)."""
        if not self.started:
            return
        import asyncio

        await asyncio.wait([self._done], timeout=timeout)

    def close(self) -> None:
        """Stop following (the container or pod keeps running)."""
        with self._lock:
            self._closed = True
            handle = self._handle
        if handle is not None:
            try:
                self.interrupt(handle)
            except Exception:  # closing is best effort
                pass
