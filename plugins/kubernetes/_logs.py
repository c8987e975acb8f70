"""A pod's log, followed by a thread of its own whose socket is shut down when the step stops."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

from shipyard.sdk import ThreadedFollower

if TYPE_CHECKING:
    from shipyard.sdk import StepContext

    from ._client import Cluster

#: Seconds a finished Job's log may take to arrive in full.
LOG_GRACE: Final = 5.0


class PodLogFollower(ThreadedFollower):
    """Follows a pod's log for as long as the Job runs; :meth:`close` shuts the socket down."""

    kind = "k8s-logs"

    def __init__(
        self, cluster: Cluster, context: StepContext, namespace: str, deadline: float | None
    ) -> None:
        super().__init__(context, "pod")
        self.cluster = cluster
        self.namespace = namespace
        self.deadline = deadline
        self._pod = ""
        self._read = 24 * 3600.0

    def follow(self, pod: str) -> None:
        """Start following the log of ``pod``."""
        self._pod = self.label = pod
        # The stream ends with the container; its read timeout is what is left of the step.
        if self.deadline is not None:
            self._read = max(self.deadline - self._loop.time(), 0.0) + LOG_GRACE
        super().start()

    def note(self) -> str:
        """`` (its log is incomplete: ...)`` when following failed, else ``""``."""
        return f" (its log is incomplete: {self.problem})" if self.problem else ""

    def open(self) -> tuple[Any, Iterable[bytes]]:
        path = f"/api/v1/namespaces/{self.namespace}/pods/{self._pod}/log"
        resp = self.cluster.request(
            "GET", path, query_params=[("follow", "true"), ("container", "main")],
            _request_timeout=(self.cluster.request_timeout[0], self._read),
        )  # fmt: skip

        def chunks() -> Iterable[bytes]:
            try:
                yield from resp.stream(None, decode_content=True)
            finally:
                resp.release_conn()

        return resp, chunks()

    def interrupt(self, handle: Any) -> None:
        _shutdown(handle)

    def explain(self, exc: Exception) -> str | None:
        # A broken stream loses output, never the step: the Job's outcome still decides.
        return self.cluster.explain(exc, f"follow the log of pod {self._pod}").message


def _shutdown(resp: Any) -> None:
    """Make a thread blocked reading ``resp`` return now (urllib3 >= 2.3 can shut the socket)."""
    try:
        shutdown = getattr(resp, "shutdown", None)
        if shutdown is not None:
            shutdown()
        resp.close()
    except Exception:
        pass
