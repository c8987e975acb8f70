"""The ``kubernetes.job(name, image, command)`` step: a one-off Job whose outcome decides.

The Job is polled at most a second apart, so a cancel or a timeout stops the waiting at once; its
pod's log streams into the history meanwhile. A cancelled or timed-out Job is deleted; only Jobs
Shipyard made (by label, and by this run's token) are ever replaced or deleted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

from shipyard.sdk import PipelineDefinitionError
from shipyard.sdk import Step
from shipyard.sdk import StepFailed
from shipyard.sdk import StepResult
from shipyard.sdk import reject_unknown_options

from ._client import Cluster
from ._logs import LOG_GRACE
from ._logs import PodLogFollower
from ._options import DEFAULT_REQUEST_TIMEOUT
from ._options import MAX_POLL_INTERVAL
from ._options import check_optional_name
from ._options import check_request_timeout
from ._options import deadline_margin
from ._options import is_dns_label
from ._rollout import condition
from ._rollout import pod_state

if TYPE_CHECKING:
    from collections.abc import Callable

    from shipyard.sdk import ArtifactRow
    from shipyard.sdk import Deployment
    from shipyard.sdk import StepContext

    from ._render import Obj

#: The label every Job Shipyard creates carries (also on its pod).
MANAGED_BY: Final = {"app.kubernetes.io/managed-by": "shipyard"}
#: ``ttlSecondsAfterFinished`` of a ``ttl=0`` Job, should Shipyard not delete it itself.
TTL_BACKSTOP: Final = 60
#: Annotations on Jobs say which deployment made them.
ANNOTATION_PREFIX: Final = "shipyard/"

_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*\Z")


# -- definition-time checks -----------------------------------------------------------------------


def _check_job_name(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 63 or not is_dns_label(value):
        raise PipelineDefinitionError(
            "kubernetes.job step: the Job name must be a DNS label (at most 63 lowercase "
            f"letters, digits and '-'), got {value!r}"
        )
    return value


def _check_image(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise PipelineDefinitionError(
            f"kubernetes.job step: image must be an image reference such as 'app:1.2', "
            f"got {value!r}"
        )
    return value


def _check_command(value: Any, kind: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        import shlex

        if not value.strip():
            raise PipelineDefinitionError(f"{kind} step: command is an empty string")
        return shlex.split(value)
    if (
        isinstance(value, Sequence)
        and value
        and all(
            isinstance(v, (str, int, float, os.PathLike)) and not isinstance(v, bool) for v in value
        )
    ):
        return [os.fspath(v) if isinstance(v, os.PathLike) else str(v) for v in value]
    raise PipelineDefinitionError(
        f"{kind} step: command must be a list of strings or a string (split like a shell "
        f"would), got {value!r}"
    )


def _check_env(value: Any, kind: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and _ENV_NAME.match(k) for k in value
    ):
        raise PipelineDefinitionError(
            f"{kind} step: env must map variable names to values, got {value!r}"
        )
    return {k: v if isinstance(v, str) else str(v) for k, v in value.items()}


def _check_ttl(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise PipelineDefinitionError(
            f"kubernetes.job step: ttl must be a whole number of seconds >= 0 or None, "
            f"got {value!r}"
        )
    return value


class _JobTimedOut(Exception):
    """The step's deadline passed; the message says where the Job was."""


# -- the step -------------------------------------------------------------------------------------


class KubernetesJobStep(Step):
    """Run a command as a Kubernetes Job; its pod's log goes to the history, its outcome decides.

    :param job: the Job's name (a DNS label); a finished Job of that name made by Shipyard is
        replaced, any other one is never touched. (``name=`` names the step, as for every step.)
    :param image: the container image.
    :param command: the command (a list, or a string split like a shell would); the image's
        entrypoint when None.
    :param namespace: the Job's namespace; the kubeconfig context's by default.
    :param env: extra environment variables (values may be secrets); ``DEPLOYMENT_*`` are set.
    :param context: the kubeconfig context; its current context by default.
    :param ttl: seconds the finished Job (and its pod, for ``kubectl logs``) stays before
        Kubernetes deletes it (``ttlSecondsAfterFinished``); 0 deletes it at once, None keeps it
        until the next run replaces it.
    :param service_account: the pod's service account.
    :param timeout: seconds for the whole Job; then it is deleted and the step fails.
    :param request_timeout: seconds one API call may take: a number, or ``(connect, read)``.
    """

    kind = "kubernetes.job"

    def __init__(
        self,
        job: str,
        /,
        image: str,
        command: str | Sequence[str] | None = None,
        *,
        namespace: str | None = None,
        env: Mapping[str, Any] | None = None,
        context: str | None = None,
        ttl: int | None = 3600,
        service_account: str | None = None,
        request_timeout: float | tuple[float, float] = DEFAULT_REQUEST_TIMEOUT,
        name: str | None = None,
        timeout: float | None = 600,
        retries: int = 0,
        **unknown: Any,
    ) -> None:
        reject_unknown_options(self, unknown)
        self.job = _check_job_name(job)
        self.image = _check_image(image)
        self.command = _check_command(command, self.kind)
        self.namespace = check_optional_name(namespace, "namespace", self.kind)
        self.env = _check_env(env, self.kind)
        self.context = check_optional_name(context, "context", self.kind)
        self.ttl = _check_ttl(ttl)
        self.service_account = check_optional_name(service_account, "service_account", self.kind)
        self.request_timeout = check_request_timeout(request_timeout, self.kind)
        super().__init__(name=name, timeout=timeout, retries=retries)

    def default_name(self) -> str:
        return f"kubernetes job {self.job}"

    def describe(self) -> str:
        ns = self.namespace or "<the kubeconfig context's>"
        text = f"run job.batch/{self.job} (namespace {ns}) from {self.image}"
        if self.command is not None:
            import shlex

            text += f": {shlex.join(self.command)}"
        extra = []
        if self.env:
            extra.append("env " + ",".join(f"{k}={v}" for k, v in self.env.items()))
        if self.context:
            extra.append(f"context {self.context}")
        extra.append(
            "kept until replaced" if self.ttl is None else
            "deleted when done" if self.ttl == 0 else f"deleted {self.ttl}s after it ends"
        )  # fmt: skip
        return f"{text}  ({'; '.join(extra)})"

    # -- the Job object ---------------------------------------------------------------------------

    def _body(self, context: StepContext, namespace: str, token: str) -> Obj:
        """The Job to create: one pod, never restarted, labelled and annotated as Shipyard's."""
        spec: Obj = {
            "backoffLimit": 0,
            "template": {"metadata": {"labels": dict(MANAGED_BY)}, "spec": self._pod_spec(context)},
        }
        if self.ttl is not None:
            # With ttl=0 Shipyard deletes the Job itself once it has the outcome and the log (the
            # TTL controller could delete it before Shipyard sees it end); the cluster's own TTL
            # is then only a backstop, should Shipyard be gone by then.
            spec["ttlSecondsAfterFinished"] = self.ttl or TTL_BACKSTOP
        if self.timeout is not None:
            # The cluster stops the pod too, should Shipyard be gone before it can.
            spec["activeDeadlineSeconds"] = max(1, int(self.timeout + 0.999))
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": self.job,
                "namespace": namespace,
                "labels": dict(MANAGED_BY),
                "annotations": _annotations(context.deployment, token),
            },
            "spec": spec,
        }

    def _pod_spec(self, context: StepContext) -> Obj:
        """The pod's spec: the ``main`` container with the ``DEPLOYMENT_*`` and step env."""
        env = {**context.deployment_env, **context.process_env, **context.resolve(self.env)}
        container: Obj = {
            "name": "main",
            "image": self.image,
            "env": [{"name": k, "value": str(v)} for k, v in env.items()],
        }
        if self.command is not None:
            container["command"] = context.resolve(self.command)
        pod_spec: Obj = {"restartPolicy": "Never", "containers": [container]}
        if self.service_account:
            pod_spec["serviceAccountName"] = context.resolve(self.service_account)
        return pod_spec

    # -- running it -------------------------------------------------------------------------------

    async def run(self, context: StepContext) -> StepResult:
        import asyncio
        import json
        import secrets

        loop = asyncio.get_running_loop()
        deadline = None
        if self.timeout is not None:
            deadline = loop.time() + self.timeout - deadline_margin(self.timeout)
        cluster = await Cluster.connect(context.resolve(self.context), self.request_timeout)
        namespace = context.resolve(self.namespace) or cluster.namespace
        shown = f"job.batch/{self.job} (namespace {namespace})"
        token = secrets.token_hex(8)
        uid: str | None = None
        follower: PodLogFollower | None = None
        delete_why: str | None = None
        try:
            try:
                jobs = await cluster.call(cluster.resource, "batch/v1", "Job")
                pods = await cluster.call(cluster.resource, "v1", "Pod")
                await self._replace_previous(cluster, context, jobs, namespace, shown, deadline)
                # Before it exists: if shipyard is killed from now on, the next command finds
                # and deletes this run's Job (``shipyard_cleanup_interrupted``).
                context.record_artifact(JOB_ARTIFACT, json.dumps({
                    "context": context.resolve(self.context), "namespace": namespace,
                    "job": self.job, "run": token, "request_timeout": list(self.request_timeout),
                }))  # fmt: skip
                uid = await self._create(cluster, context, jobs, namespace, shown, token)
                follower = PodLogFollower(cluster, context, namespace, deadline)
                job, pod = await self._follow(
                    cluster, context, jobs, pods, namespace, shown, uid, follower, deadline
                )
            except _JobTimedOut as exc:
                delete_why = "timed out"
                raise self._timed_out(exc, shown, uid, follower) from None
            except asyncio.CancelledError:
                delete_why = "cancelled"
                raise
            except BaseException:
                delete_why = "the step failed"
                raise
            finally:
                if follower is not None:
                    follower.close()
                if delete_why is not None:
                    await _uncancellable(
                        self._delete(cluster, context, cluster.known_resource("batch/v1", "Job"),
                                     namespace, shown, uid, token, delete_why)
                    )  # fmt: skip
            try:
                return self._outcome(context, job, pod, shown, follower)
            finally:
                if self.ttl == 0:
                    await _uncancellable(
                        self._delete(cluster, context, jobs, namespace, shown, uid, token, "ttl=0")
                    )
        finally:
            cluster.close()

    async def _create(
        self,
        cluster: Cluster,
        context: StepContext,
        jobs: Any,
        namespace: str,
        shown: str,
        token: str,
    ) -> str:
        """Create the Job; its uid."""
        try:
            created = await cluster.call(
                cluster.create, jobs, self._body(context, namespace, token), namespace
            )
        except Exception as exc:
            raise cluster.explain(
                exc,
                f"create {shown}",
                conflict="another Job of that name appeared meanwhile",
            ) from None
        uid = str(created["metadata"]["uid"])
        context.log(f"{shown} created from {self.image}", "shipyard")
        return uid

    def _timed_out(
        self, exc: _JobTimedOut, shown: str, uid: str | None, follower: PodLogFollower | None
    ) -> StepFailed:
        """The failure when the deadline passed, with the last lines of the log."""
        # Imported here: the module that holds it imports asyncio, which `plan` must not.
        from shipyard.sdk import tail_text

        tail = list(follower.tail) if follower is not None else []
        what = "did not finish" if uid is not None else "could not even start"
        return StepFailed(
            f"{shown} {what} within {self.timeout:g}s ({exc})"
            + ("; deleted it" if uid is not None else "")
            + tail_text(tail),
            output=tail,
        )

    def _outcome(
        self,
        context: StepContext,
        job: Obj,
        pod: Obj | None,
        shown: str,
        follower: PodLogFollower,
    ) -> StepResult:
        """The step's result from the finished Job: its pod's exit code, or its failure."""
        # Imported here: the module that holds it imports asyncio, which `plan` must not.
        from shipyard.sdk import tail_text

        tail = list(follower.tail)
        code = _exit_code(pod)
        failed = condition(job, "Failed")
        if failed is not None and failed.get("status") == "True":
            why = f"{failed.get('reason') or 'Failed'}: {failed.get('message') or ''}".rstrip(": ")
            how = ""
            if pod is not None:
                how = f"; pod {pod['metadata']['name']} "
                how += f"exited with {code}" if code is not None else f"ended {pod_state(pod)}"
            raise StepFailed(
                f"{shown} failed ({why}){how}{follower.note()}{tail_text(tail)}",
                step_exit_code=code,
                output=tail,
            )
        context.log(f"{shown} succeeded" + follower.note(), "shipyard")
        return StepResult(exit_code=code if code is not None else 0)

    # -- an earlier Job of the same name ----------------------------------------------------------

    async def _replace_previous(
        self,
        cluster: Cluster,
        context: StepContext,
        jobs: Any,
        namespace: str,
        shown: str,
        deadline: float | None,
    ) -> None:
        """Delete a finished Job of the same name made by Shipyard; refuse any other one."""
        try:
            old = await cluster.call(cluster.read_or_none, jobs, self.job, namespace)
        except Exception as exc:
            raise cluster.explain(exc, f"look for an earlier {shown}") from None
        if old is None:
            return
        made_by = self._replaceable(old, namespace, shown)
        try:
            await cluster.call(cluster.delete, jobs, self.job, namespace)
        except cluster.errors.NotFoundError:
            pass
        except Exception as exc:
            raise cluster.explain(
                exc, f"delete the finished {shown} of deployment {made_by}"
            ) from None
        context.log(f"deleted the finished {shown} of deployment {made_by}", "shipyard")
        await self._wait_until_gone(cluster, jobs, namespace, shown, deadline)

    def _replaceable(self, old: Obj, namespace: str, shown: str) -> str:
        """The deployment that made ``old``, a finished Job of Shipyard's.

        :raises StepFailed: for a Job Shipyard did not make, or one still running.
        """
        meta = old.get("metadata") or {}
        labels = meta.get("labels") or {}
        notes = meta.get("annotations") or {}
        if any(labels.get(k) != v for k, v in MANAGED_BY.items()):
            raise StepFailed(
                f"a Job {shown} already exists and was not created by Shipyard; Shipyard never "
                "touches it: delete or rename it, or give this step another Job name"
            )
        made_by = notes.get(f"{ANNOTATION_PREFIX}deployment", "?")
        if _job_finished(old) is None:
            raise StepFailed(
                f"{shown} of deployment {made_by} is still running; wait for it to finish, or "
                f"delete it (kubectl delete job {self.job} -n {namespace}) and try again"
            )
        return str(made_by)

    async def _wait_until_gone(
        self, cluster: Cluster, jobs: Any, namespace: str, shown: str, deadline: float | None
    ) -> None:
        """Wait until the deleted earlier Job is gone, so that its name is free again."""
        import asyncio

        loop = asyncio.get_running_loop()
        interval = 0.05
        while (await cluster.call(cluster.read_or_none, jobs, self.job, namespace)) is not None:
            if deadline is not None and loop.time() >= deadline:
                raise _JobTimedOut(f"the earlier {shown} was still being deleted")
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, MAX_POLL_INTERVAL)

    # -- following it -----------------------------------------------------------------------------

    async def _follow(
        self,
        cluster: Cluster,
        context: StepContext,
        jobs: Any,
        pods: Any,
        namespace: str,
        shown: str,
        uid: str,
        follower: PodLogFollower,
        deadline: float | None,
    ) -> tuple[Obj, Obj | None]:
        """Wait for the Job to end, following its pod's log; return the Job and its pod."""
        import asyncio

        loop = asyncio.get_running_loop()
        interval = 0.1
        pod: Obj | None = None
        last_state = ""
        while True:
            job = await self._read_job(cluster, jobs, namespace, shown, uid)
            finished = _job_finished(job)
            if not follower.started or finished:
                newest = await self._newest_pod(cluster, pods, namespace, shown, uid)
                if newest is not None:
                    pod = newest
            if pod is not None and not follower.started:
                state = pod_state(pod)
                if state != last_state:
                    last_state = state
                    context.log(f"pod {pod['metadata']['name']}: {state}", "shipyard")
                if _container_started(pod):
                    follower.follow(pod["metadata"]["name"])
            if finished:
                if pod is not None and not follower.started and _container_started(pod):
                    follower.follow(pod["metadata"]["name"])  # the whole log, at once
                await follower.wait(LOG_GRACE)
                return job, pod
            now = loop.time()
            if deadline is not None and now >= deadline:
                where = f"pod {pod['metadata']['name']}: {pod_state(pod)}" if pod else "no pod yet"
                raise _JobTimedOut(where)
            pause = interval if deadline is None else min(interval, max(deadline - now, 0.0))
            await asyncio.sleep(pause)
            interval = min(interval * 1.5, MAX_POLL_INTERVAL)

    async def _read_job(
        self, cluster: Cluster, jobs: Any, namespace: str, shown: str, uid: str
    ) -> Obj:
        """The Job as it is now.

        :raises StepFailed: when it was deleted, or replaced by another Job of the same name.
        """
        try:
            job = await cluster.call(cluster.read, jobs, self.job, namespace)
        except cluster.errors.NotFoundError:
            raise StepFailed(
                f"{shown} was deleted while it ran (by someone else, or by a ttl shorter "
                "than Shipyard's look at its outcome)"
            ) from None
        except Exception as exc:
            raise cluster.explain(exc, f"watch {shown}") from None
        if (job.get("metadata") or {}).get("uid") != uid:
            raise StepFailed(f"{shown} was deleted and replaced by another Job while it ran")
        return job

    async def _newest_pod(
        self, cluster: Cluster, pods: Any, namespace: str, shown: str, uid: str
    ) -> Obj | None:
        """The Job's newest pod, or None while it has none."""
        try:
            found = await cluster.call(cluster.list, pods, namespace, f"job-name={self.job}")
        except Exception as exc:
            raise cluster.explain(exc, f"find the pod of {shown}") from None
        mine = [p for p in found if _owned_by(p, uid)]
        if not mine:
            return None
        return max(mine, key=lambda p: p["metadata"].get("creationTimestamp", ""))

    # -- cleaning up ------------------------------------------------------------------------------

    async def _delete(
        self,
        cluster: Cluster,
        context: StepContext,
        jobs: Any,
        namespace: str,
        shown: str,
        uid: str | None,
        token: str,
        why: str,
    ) -> None:
        """Delete our Job (and its pods) after a cancel or a timeout; never someone else's."""
        if jobs is None:
            return
        try:
            if uid is None:
                await cluster.settle()  # a create cut short by the cancel may still finish
                found = await cluster.call(cluster.read_or_none, jobs, self.job, namespace)
                notes = ((found or {}).get("metadata") or {}).get("annotations") or {}
                if notes.get(f"{ANNOTATION_PREFIX}run") != token:
                    return
            await cluster.call(cluster.delete, jobs, self.job, namespace)
            context.log(f"deleted {shown} ({why})", "shipyard")
        except Exception as exc:
            if isinstance(exc, cluster.errors.NotFoundError):
                return
            context.log(
                f"could not delete {shown}: {cluster.explain(exc, 'delete it').message}; delete "
                f"it by hand (kubectl delete job {self.job} -n {namespace})",
                "shipyard",
            )


#: Recorded before a Job is created: where it is and which run made it.
JOB_ARTIFACT: Final = "kubernetes.job"


def clean_up(artifacts: Sequence[ArtifactRow], log: Callable[[str], None]) -> None:
    """Delete the Jobs (and their pods) that a killed deployment's steps created."""
    import json
    import threading

    mine = [json.loads(a["content"]) for a in artifacts if a["name"] == JOB_ARTIFACT]
    if not mine:
        return
    failures: list[BaseException] = []

    def work() -> None:  # a thread of its own: the caller may be inside an event loop
        import asyncio

        try:
            asyncio.run(_delete_jobs(mine, log))
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=work, name="shipyard-k8s-cleanup", daemon=True)
    thread.start()
    thread.join()
    if failures:
        raise failures[0]


async def _delete_jobs(jobs: list[dict[str, Any]], log: Callable[[str], None]) -> None:
    for j in jobs:
        cluster = await Cluster.connect(j["context"], tuple(j["request_timeout"]))
        try:
            resource = await cluster.call(cluster.resource, "batch/v1", "Job")
            found = await cluster.call(cluster.read_or_none, resource, j["job"], j["namespace"])
            notes = ((found or {}).get("metadata") or {}).get("annotations") or {}
            if found is None or notes.get(f"{ANNOTATION_PREFIX}run") != j["run"]:
                continue  # never created, or already replaced by another run: not ours to delete
            await cluster.call(cluster.delete, resource, j["job"], j["namespace"])
            log(f"deleted job.batch/{j['job']} (namespace {j['namespace']}) and its pods")
        finally:
            cluster.close()


def _annotations(deployment: Deployment, token: str) -> dict[str, str]:
    """Which deployment made the Job, and which run (``token``): only that run deletes it."""
    return {
        f"{ANNOTATION_PREFIX}pipeline": deployment.pipeline,
        f"{ANNOTATION_PREFIX}environment": deployment.environment,
        f"{ANNOTATION_PREFIX}version": deployment.version,
        f"{ANNOTATION_PREFIX}deployment": str(deployment.id),
        f"{ANNOTATION_PREFIX}run": token,
    }


async def _uncancellable(coro: Any) -> None:
    """Run ``coro`` to its end even if the caller is cancelled meanwhile."""
    import asyncio

    task = asyncio.ensure_future(coro)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(isinstance(r, dict) and r.get("uid") == uid for r in refs)


def _job_finished(job: Mapping[str, Any]) -> str | None:
    for kind in ("Complete", "Failed"):
        cond = condition(job, kind)
        if cond is not None and cond.get("status") == "True":
            return kind
    return None


def _container_started(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") in ("Running", "Succeeded", "Failed"):
        return True
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if "running" in state or "terminated" in state:
            return True
    return False


def _exit_code(pod: Mapping[str, Any] | None) -> int | None:
    if pod is None:
        return None
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated")
        if terminated and isinstance(terminated.get("exitCode"), int):
            return int(terminated["exitCode"])
    return None


# Reprs, tracebacks and pickles name the package, as before it was split into modules.
KubernetesJobStep.__module__ = "shipyard.plugins.kubernetes"
