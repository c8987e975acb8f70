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

from shipyard.sdk import hookimpl
from shipyard.sdk import lazy_exports

if TYPE_CHECKING:
    from collections.abc import Callable

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

#: Where each public name lives. Nothing is imported until it is used: loading the built-in
#: plugins (every ``deploy``, ``list`` and ``plan``) costs this module alone, not its modules.
_LAZY = {
    "ANNOTATION_PREFIX": "._job",
    "Cluster": "._client",
    "DEFAULT_REQUEST_TIMEOUT": "._options",
    "DONE": "._rollout",
    "Document": "._render",
    "FAILED": "._rollout",
    "FIELD_MANAGER": "._client",
    "KubernetesApplyStep": "._apply",
    "KubernetesJobStep": "._job",
    "KubernetesSteps": "._facade",
    "LOG_GRACE": "._logs",
    "MANAGED_BY": "._job",
    "MAX_PODS_SHOWN": "._apply",
    "MAX_POLL_INTERVAL": "._options",
    "ManifestError": "._render",
    "TTL_BACKSTOP": "._job",
    "WAITING": "._rollout",
    "WORKLOAD_KINDS": "._rollout",
    "condition": "._rollout",
    "images_of": "._render",
    "kubernetes": "._facade",
    "label_selector": "._rollout",
    "load_documents": "._render",
    "manifest_files": "._render",
    "object_ref": "._render",
    "parse": "._render",
    "pod_ready": "._rollout",
    "pod_state": "._rollout",
    "render": "._render",
    "rollout_status": "._rollout",
    "variables_for": "._render",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)


@hookimpl
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    # By name: the step classes are imported when a pipeline builds such a step.
    registry.add("shipyard.plugins.kubernetes._apply:KubernetesApplyStep", kind="kubernetes")
    registry.add("shipyard.plugins.kubernetes._job:KubernetesJobStep", kind="kubernetes.job")


@hookimpl
def shipyard_cleanup_interrupted(artifacts: list[ArtifactRow], log: Callable[[str], None]) -> None:
    """Delete the Jobs a killed deployment's ``kubernetes.job`` steps created."""
    from ._job import clean_up

    clean_up(artifacts, log)
