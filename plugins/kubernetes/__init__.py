"""The ``kubernetes`` and ``kubernetes.job`` steps: manifests and one-off Jobs on a cluster.

::

    sy.kubernetes("k8s/", namespace="shop", timeout=300)
    sy.kubernetes.job("migrate", f"registry/shop:{d.version}", ["./manage.py", "migrate"])

``kubernetes(manifest, ...)`` renders the manifest files (``${DEPLOYMENT_VERSION}``-style
variables), server-side applies every document through the official client's dynamic client
(field manager ``shipyard``), then waits until each Deployment, StatefulSet and DaemonSet has
rolled out, by the rules of ``kubectl rollout status``. ``kubernetes.job(...)`` runs a command as
a Job, streams its pod's log into the history, and lets the Job's outcome decide.

The cluster is the one the kubeconfig names (``KUBECONFIG``, else ``~/.kube/config``, else the
pod's service account). The ``kubernetes`` package is imported when such a step runs, never when
a pipelines file is loaded or planned; PyYAML is imported when manifests are rendered (``plan``
renders them too, without talking to any server).

The client blocks, so every call runs in a worker thread, with an explicit connect and read
timeout and no silent retries (urllib3 would retry a GET three times). Rollouts and Jobs are
polled at most a second apart, so a cancel or a timeout stops the waiting at once; a pod's log is
followed by a thread of its own whose socket is shut down when the step stops.

The package uses only :mod:`shipyard.sdk`; its modules:

- ``_options``: the options both steps share, checked when the pipelines file loads; timing;
- ``_render``: finding, rendering (``${VAR}``) and parsing manifests (:class:`ManifestError`);
- ``_rollout``: an object's status: the rules of ``kubectl rollout status``, pods' states;
- ``_config``: which cluster: the kubeconfig or the service account, context, namespace;
- ``_errors``: the client's errors in plain words;
- ``_client``: the cluster client of one step run: dynamic client, discovery, server-side apply;
- ``_logs``: following a pod's log;
- ``_apply``: the ``kubernetes(...)`` step;
- ``_job``: the ``kubernetes.job(...)`` step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any
from typing import Final
from typing import final

from shipyard.sdk import hookimpl

from ._apply import MAX_PODS_SHOWN
from ._apply import KubernetesApplyStep
from ._client import FIELD_MANAGER
from ._client import Cluster
from ._job import ANNOTATION_PREFIX
from ._job import MANAGED_BY
from ._job import TTL_BACKSTOP
from ._job import KubernetesJobStep
from ._logs import LOG_GRACE
from ._options import DEFAULT_REQUEST_TIMEOUT
from ._options import MAX_POLL_INTERVAL
from ._render import Document
from ._render import ManifestError
from ._render import images_of
from ._render import load_documents
from ._render import manifest_files
from ._render import object_ref
from ._render import parse
from ._render import render
from ._render import variables_for
from ._rollout import DONE
from ._rollout import FAILED
from ._rollout import WAITING
from ._rollout import WORKLOAD_KINDS
from ._rollout import condition
from ._rollout import label_selector
from ._rollout import pod_ready
from ._rollout import pod_state
from ._rollout import rollout_status

if TYPE_CHECKING:
    import os
    from collections.abc import Callable
    from collections.abc import Sequence

    from shipyard.sdk import ArtifactRow
    from shipyard.sdk import StepTypeRegistry

__all__ = [
    "ANNOTATION_PREFIX",
    "DEFAULT_REQUEST_TIMEOUT",
    "DONE",
    "FAILED",
    "FIELD_MANAGER",
    "LOG_GRACE",
    "MANAGED_BY",
    "MAX_PODS_SHOWN",
    "MAX_POLL_INTERVAL",
    "TTL_BACKSTOP",
    "WAITING",
    "WORKLOAD_KINDS",
    "Cluster",
    "Document",
    "KubernetesApplyStep",
    "KubernetesJobStep",
    "KubernetesSteps",
    "ManifestError",
    "condition",
    "images_of",
    "kubernetes",
    "label_selector",
    "load_documents",
    "manifest_files",
    "object_ref",
    "parse",
    "pod_ready",
    "pod_state",
    "render",
    "rollout_status",
    "shipyard_cleanup_interrupted",
    "shipyard_register_step_types",
    "variables_for",
]


# Reprs, tracebacks and pickles keep naming the import path they had before the split into
# private modules: shipyard.plugins.kubernetes.KubernetesJobStep, not ..._job.KubernetesJobStep.
for _cls in (Cluster, Document, KubernetesApplyStep, KubernetesJobStep, ManifestError):
    _cls.__module__ = __name__
del _cls


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


@hookimpl
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    registry.add(KubernetesApplyStep)
    registry.add(KubernetesJobStep)


@hookimpl
def shipyard_cleanup_interrupted(artifacts: list[ArtifactRow], log: Callable[[str], None]) -> None:
    """Delete the Jobs a killed deployment's ``kubernetes.job`` steps created."""
    from ._job import clean_up

    clean_up(artifacts, log)
