"""The ``shipyard.kubernetes`` object users call (imported when a pipeline uses it)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any
from typing import Final
from typing import final

from ._apply import KubernetesApplyStep
from ._job import KubernetesJobStep
from ._options import DEFAULT_REQUEST_TIMEOUT

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence


@final
class KubernetesSteps:
    """``shipyard.kubernetes``: call it to apply manifests; ``.job(...)`` runs a Job."""

    job: Final = KubernetesJobStep

    def __call__(
        self,
        manifest: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        namespace: str | None = None,
        context: str | None = None,
        wait: bool = True,
        timeout: float | None = 300,
        force_conflicts: bool = False,
        *,
        request_timeout: float | tuple[float, float] = DEFAULT_REQUEST_TIMEOUT,
        name: str | None = None,
        retries: int = 0,
        **unknown: Any,
    ) -> KubernetesApplyStep:
        """Build a :class:`KubernetesApplyStep` (see there for the options)."""
        return KubernetesApplyStep(
            manifest, namespace, context, wait, timeout, force_conflicts,
            request_timeout=request_timeout, name=name, retries=retries, **unknown,
        )  # fmt: skip

    def __repr__(self) -> str:
        return "<shipyard.kubernetes: kubernetes(manifest, ...), kubernetes.job(name, image, ...)>"


kubernetes: Final = KubernetesSteps()
