"""A container's output, streamed line by line, and how it ended, in words."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING
from typing import Any

from shipyard.sdk import ThreadedFollower

if TYPE_CHECKING:
    from shipyard.sdk import StepContext

    from ._engine import Engine


class LogPump(ThreadedFollower):
    """Follows a container's output; stdout and stderr arrive merged, as ``docker logs`` shows."""

    kind = "docker-logs"

    def __init__(self, engine: Engine, cid: str, context: StepContext, label: str) -> None:
        super().__init__(context, label)
        self.engine = engine
        self.cid = cid

    def open(self) -> tuple[Any, Iterable[bytes]]:
        stream = self.engine.api.logs(self.cid, stream=True, follow=True)
        return stream, stream

    def interrupt(self, handle: Any) -> None:
        handle.close()

    def release(self, handle: Any) -> None:
        # The stream's close marks its socket closed, but while the response's file is open the
        # descriptor stays open; left to the garbage collector it surfaces later as a
        # ResourceWarning. Closing the response here frees it now.
        handle._response.close()


def exit_text(rc: int, oom: bool = False) -> str:
    """How a container ended: ``exited with 137 (killed by SIGKILL)``, or killed for memory."""
    if oom:
        return f"was killed for lack of memory (exit code {rc})"
    if rc > 128:
        import signal

        try:
            return f"exited with {rc} (killed by {signal.Signals(rc - 128).name})"
        except ValueError:
            pass
    return f"exited with {rc}"


# Reprs, tracebacks and pickles name the package, as before it was split into modules.
LogPump.__module__ = "shipyard.plugins.docker"
