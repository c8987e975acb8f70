"""Blocking client calls (a Docker SDK, a Kubernetes client) run from a step's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any
from typing import TypeVar

_T = TypeVar("_T")


class BlockingCalls:
    """Runs blocking calls in worker threads and remembers the ones still running.

    A cancelled step cannot stop a call that is already inside a client library: the call still
    finishes in its thread. :meth:`settle` waits for such calls, so a container or a Job created
    at that very moment is not missed by the step's clean-up.
    """

    def __init__(self) -> None:
        self._inflight: set[asyncio.Future[Any]] = set()

    async def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` in a worker thread; a cancellation does not abandon it."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        return await asyncio.shield(fut)

    @property
    def pending(self) -> set[asyncio.Future[Any]]:
        """The calls still running."""
        return {f for f in self._inflight if not f.done()}

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for calls still running after a cancellation."""
        pending = self.pending
        if pending:
            await asyncio.wait(pending, timeout=timeout)


def tail_text(lines: Iterable[str], n: int = 10) -> str:
    """``"; last output:"`` and the last ``n`` lines, indented, for a failure message; or ``""``."""
    last = list(lines)[-n:]
    return ("; last output:\n" + "\n".join(f"  {ln}" for ln in last)) if last else ""
