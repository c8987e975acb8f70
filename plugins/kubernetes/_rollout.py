"""Reading an object's status: rollouts by the rules of ``kubectl rollout status``, and pods.

Pure functions of the objects the API server returns (dicts); no client, no server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from typing import Final

#: Outcomes of :func:`rollout_status`.
DONE: Final = "done"
WAITING: Final = "waiting"
FAILED: Final = "failed"

#: Workloads whose rollout is waited for.
WORKLOAD_KINDS: Final = ("Deployment", "StatefulSet", "DaemonSet")

_NOT_OBSERVED: Final = "waiting for the controller to observe the new spec"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def condition(obj: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    """The status condition of type ``kind`` (``Ready``, ``Progressing``, ...), or None."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == kind:
            return cond
    return None


def rollout_status(obj: Mapping[str, Any]) -> tuple[str, str]:
    """Whether a Deployment, StatefulSet or DaemonSet has rolled out, and what it waits for.

    :returns: ``(DONE | WAITING | FAILED, message)``, as ``kubectl rollout status`` decides.
    """
    kind = obj.get("kind")
    if kind == "Deployment":
        return _deployment_status(obj)
    # As kubectl: the other kinds roll out only with the RollingUpdate strategy.
    strategy = (obj.get("spec") or {}).get("updateStrategy") or {}
    strategy_type = strategy.get("type", "RollingUpdate")
    if strategy_type != "RollingUpdate":
        return DONE, f"not waited for: updateStrategy {strategy_type} has no rollout to watch"
    if kind == "StatefulSet":
        return _stateful_set_status(obj, strategy)
    if kind == "DaemonSet":
        return _daemon_set_status(obj)
    return DONE, "not a workload"


def _generations(obj: Mapping[str, Any]) -> tuple[int, int]:
    """``(metadata.generation, status.observedGeneration)``."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    return _int(meta.get("generation")), _int(status.get("observedGeneration"))


def _deployment_status(obj: Mapping[str, Any]) -> tuple[str, str]:
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    generation, observed = _generations(obj)
    if generation > observed:
        return WAITING, _NOT_OBSERVED
    progressing = condition(obj, "Progressing")
    if progressing is not None and progressing.get("reason") == "ProgressDeadlineExceeded":
        return FAILED, f"ProgressDeadlineExceeded: {progressing.get('message', '')}".strip()
    replicas = _int(spec.get("replicas", 1))
    updated = _int(status.get("updatedReplicas"))
    total = _int(status.get("replicas"))
    available = _int(status.get("availableReplicas"))
    if updated < replicas:
        return WAITING, f"{updated} of {replicas} new replicas have been updated"
    if total > updated:
        return WAITING, f"{total - updated} old replicas are pending termination"
    if available < updated:
        return WAITING, f"{available} of {updated} updated replicas are available"
    return DONE, "successfully rolled out"


def _stateful_set_status(obj: Mapping[str, Any], strategy: Mapping[str, Any]) -> tuple[str, str]:
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    generation, observed = _generations(obj)
    if observed == 0 or generation > observed:
        return WAITING, _NOT_OBSERVED
    replicas = _int(spec.get("replicas", 1))
    ready = _int(status.get("readyReplicas"))
    if ready < replicas:
        return WAITING, f"{ready} of {replicas} pods are ready"
    partition = _int((strategy.get("rollingUpdate") or {}).get("partition"))
    updated = _int(status.get("updatedReplicas"))
    if partition > 0:
        if updated < replicas - partition:
            return WAITING, (
                f"partitioned roll out: {updated} of {replicas - partition} new pods have "
                "been updated"
            )
        return DONE, f"partitioned roll out complete: {updated} new pods have been updated"
    if status.get("updateRevision") != status.get("currentRevision"):
        return WAITING, (
            f"{updated} of {replicas} pods are at revision {status.get('updateRevision')}"
        )
    return (
        DONE,
        f"successfully rolled out ({replicas} pods at revision {status.get('currentRevision')})",
    )


def _daemon_set_status(obj: Mapping[str, Any]) -> tuple[str, str]:
    status = obj.get("status") or {}
    generation, observed = _generations(obj)
    if generation > observed:
        return WAITING, _NOT_OBSERVED
    desired = _int(status.get("desiredNumberScheduled"))
    updated = _int(status.get("updatedNumberScheduled"))
    available = _int(status.get("numberAvailable"))
    if updated < desired:
        return WAITING, f"{updated} of {desired} new pods have been updated"
    if available < desired:
        return WAITING, f"{available} of {desired} updated pods are available"
    return DONE, "successfully rolled out"


def workload_conditions(obj: Mapping[str, Any] | None) -> str:
    """`` (Progressing=True ReplicaSetUpdated: ...)``: the controller's own words."""
    if not obj:
        return ""
    parts = []
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Progressing", "Available", "ReplicaFailure"):
            text = f"{cond.get('type')}={cond.get('status')}"
            if cond.get("reason"):
                text += f" {cond['reason']}"
            if cond.get("message"):
                text += f": {cond['message']}"
            parts.append(text)
    return f" ({'; '.join(parts)})" if parts else ""


def label_selector(selector: Any) -> str:
    """A ``LabelSelector`` object as the query string the API takes (``app=web,tier in (a,b)``)."""
    if not isinstance(selector, dict):
        return ""
    parts = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In":
            parts.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            parts.append(str(key))
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Whether the pod's ``Ready`` condition is ``True``."""
    cond = condition(pod, "Ready")
    return cond is not None and cond.get("status") == "True"


def pod_state(pod: Mapping[str, Any]) -> str:
    """Why a pod is where it is: a container's waiting or terminated reason, else its phase."""
    status = pod.get("status") or {}
    for cs in [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]:
        state = cs.get("state") or {}
        waiting = state.get("waiting")
        if waiting:
            return str(waiting.get("reason") or "Waiting")
        terminated = state.get("terminated")
        if terminated and terminated.get("exitCode"):
            return f"{terminated.get('reason') or 'Error'}, exit code {terminated['exitCode']}"
    if status.get("phase") == "Running" and not pod_ready(pod):
        return "Running, not ready"
    return str(status.get("phase") or "Pending")
