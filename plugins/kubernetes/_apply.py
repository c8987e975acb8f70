"""The ``kubernetes(manifest, ...)`` step: server-side apply the manifests, wait for the rollouts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

from shipyard.sdk import PipelineDefinitionError
from shipyard.sdk import Step
from shipyard.sdk import StepFailed
from shipyard.sdk import StepResult
from shipyard.sdk import reject_unknown_options

from ._client import Cluster
from ._options import DEFAULT_REQUEST_TIMEOUT
from ._options import MAX_POLL_INTERVAL
from ._options import check_flag
from ._options import check_optional_name
from ._options import check_request_timeout
from ._options import deadline_margin
from ._options import short
from ._render import Document
from ._render import ManifestError
from ._render import images_of
from ._render import load_documents
from ._render import variables_for
from ._rollout import DONE
from ._rollout import FAILED
from ._rollout import WORKLOAD_KINDS
from ._rollout import label_selector
from ._rollout import pod_ready
from ._rollout import pod_state
from ._rollout import rollout_status
from ._rollout import workload_conditions

if TYPE_CHECKING:
    from pathlib import Path

    from shipyard.sdk import Deployment
    from shipyard.sdk import StepContext

    from ._render import Obj

#: How many not-ready pods a failure names.
MAX_PODS_SHOWN: Final = 10
#: Built-in kinds without a namespace (``plan`` cannot ask the server).
_CLUSTER_SCOPED: Final = frozenset(
    {
        "Namespace", "Node", "PersistentVolume", "ClusterRole", "ClusterRoleBinding",
        "CustomResourceDefinition", "StorageClass", "PriorityClass", "IngressClass",
        "RuntimeClass", "APIService", "CSIDriver", "CSINode", "VolumeAttachment",
        "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
        "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
    }
)  # fmt: skip


def _check_manifests(value: Any) -> list[str]:
    items = [value] if isinstance(value, (str, os.PathLike)) else value
    if (
        not isinstance(items, Sequence)
        or isinstance(items, (str, bytes))
        or not items
        or not all(isinstance(i, (str, os.PathLike)) and os.fspath(i) for i in items)
    ):
        raise PipelineDefinitionError(
            "kubernetes step: manifest must be a file or folder (relative to the pipelines file), "
            f"or a list of them, got {value!r}"
        )
    return [os.fspath(i) for i in items]


#: The artifact a Kubernetes step keeps: the documents it rendered, for an exact rollback.
MANIFESTS_ARTIFACT: Final = "kubernetes.manifests"


def _dump(docs: Sequence[Document]) -> str:
    import json

    return json.dumps(
        [{"source": d.source, "line": d.line, "body": d.body} for d in docs], sort_keys=True
    )


def _load(text: str) -> list[Document]:
    import json

    return [Document(d["source"], d["line"], d["body"]) for d in json.loads(text)]


@dataclass
class _Workload:
    """An applied Deployment, StatefulSet or DaemonSet whose rollout is waited for."""

    doc: Document
    resource: Any
    namespace: str | None
    shown: str
    message: str = ""
    obj: Obj | None = None


class KubernetesApplyStep(Step):
    """Render manifests, server-side apply every document, wait for the workloads to roll out.

    :param manifest: a YAML file, a folder of YAML files (``*.yaml``, ``*.yml``, ``*.json``, in
        name order), or a list of them; relative to the pipelines file.
    :param namespace: for documents that name none; the kubeconfig context's otherwise.
    :param context: the kubeconfig context; its current context by default.
    :param wait: wait until every Deployment, StatefulSet and DaemonSet has rolled out.
    :param timeout: seconds for the whole step (applying and waiting).
    :param force_conflicts: take over fields another field manager owns instead of failing.
    :param request_timeout: seconds one API call may take: a number, or ``(connect, read)``.
    """

    kind = "kubernetes"

    def __init__(
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
    ) -> None:
        reject_unknown_options(self, unknown)
        self.manifests = _check_manifests(manifest)
        self.namespace = check_optional_name(namespace, "namespace", self.kind)
        self.context = check_optional_name(context, "context", self.kind)
        self.wait = check_flag(wait, "wait", self.kind)
        self.force_conflicts = check_flag(force_conflicts, "force_conflicts", self.kind)
        self.request_timeout = check_request_timeout(request_timeout, self.kind)
        super().__init__(name=name, timeout=timeout, retries=retries)

    def default_name(self) -> str:
        return short(f"kubernetes apply {' '.join(self.manifests)}")

    def _namespace_rule(self) -> str:
        if self.namespace:
            return f"the document's, else {self.namespace}"
        return "the document's, else the kubeconfig context's"

    def describe(self) -> str:
        text = f"server-side apply {', '.join(self.manifests)} (namespace: {self._namespace_rule()}"
        if self.context:
            text += f"; context {self.context}"
        if self.force_conflicts:
            text += "; force_conflicts"
        text += ")"
        if self.wait:
            text += "; wait for Deployments/StatefulSets/DaemonSets to roll out"
        return text

    def plan_details(self, deployment: Deployment, rootdir: Path) -> list[str]:
        """One line per rendered object: kind/name, namespace, images, and where it is written."""
        try:
            docs = load_documents(self.manifests, rootdir, variables_for(deployment))
        except ManifestError as exc:  # `plan` shows it and exits 2: deploy would fail on it
            raise PipelineDefinitionError(f"cannot render the manifests: {exc.message}") from None
        lines = []
        for doc in docs:
            if doc.kind in _CLUSTER_SCOPED:
                where = ""
            else:
                ns = doc.namespace or self.namespace or "<the kubeconfig context's>"
                where = f" (namespace {ns})"
            images = images_of(doc.body)
            shown = f": image {', '.join(images)}" if images else ""
            lines.append(f"{doc.ref}{where}{shown}  [{doc.where}]")
        return lines

    async def run(self, context: StepContext) -> StepResult:
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = None
        if self.timeout is not None:
            deadline = loop.time() + self.timeout - deadline_margin(self.timeout)
        docs = self._restored(context)
        if docs is None:
            try:
                docs = await asyncio.to_thread(
                    load_documents, self.manifests, context.rootdir,
                    variables_for(context.deployment),
                )  # fmt: skip
            except ManifestError as exc:
                raise StepFailed(exc.message) from None
            if not context.record_artifact(MANIFESTS_ARTIFACT, _dump(docs)):
                context.log(
                    "the rendered manifests hold a secret: not kept in the history, so a "
                    "rollback to this deployment renders the files again",
                    "shipyard",
                )
        cluster = await Cluster.connect(context.resolve(self.context), self.request_timeout)
        try:
            workloads = []
            for doc in docs:
                w = await self._apply(cluster, context, doc)
                if w is not None:
                    workloads.append(w)
                if doc.kind == "CustomResourceDefinition":  # sorted first: its kinds come next
                    await self._established(cluster, context, doc, deadline)
            if self.wait and workloads:
                await self._wait(cluster, context, workloads, deadline)
        finally:
            cluster.close()
        return StepResult()

    def _restored(self, context: StepContext) -> list[Document] | None:
        """In a rollback, the documents the restored deployment applied (None: render)."""
        restores = context.deployment.restores
        if restores is None:
            return None
        kept = context.restored_artifact(MANIFESTS_ARTIFACT)
        if kept is None:
            context.log(
                f"deployment #{restores} kept no rendered manifests for this step: rendering "
                f"today's files with version {context.deployment.version}",
                "shipyard",
            )
            return None
        docs = _load(kept)
        context.log(
            f"applying the {len(docs)} object(s) deployment #{restores} applied, exactly "
            "(today's files are not rendered)",
            "shipyard",
        )
        return docs

    # -- applying ---------------------------------------------------------------------------------

    async def _apply(
        self, cluster: Cluster, context: StepContext, doc: Document
    ) -> _Workload | None:
        """Server-side apply one document; its workload when its rollout is to be waited for."""
        import json

        errors = cluster.errors
        resource = await self._resource(cluster, doc)
        body = json.loads(json.dumps(doc.body))  # a copy for the wire
        namespace: str | None = None
        if resource.namespaced:
            namespace = doc.namespace or context.resolve(self.namespace) or cluster.namespace
            body["metadata"]["namespace"] = namespace
        else:
            body["metadata"].pop("namespace", None)
        shown = f"{doc.ref} (namespace {namespace})" if namespace else doc.ref
        doing = f"apply {shown} from {doc.where}"
        try:
            before = await cluster.call(cluster.read_or_none, resource, doc.name, namespace)
        except errors.DynamicApiError:
            before = None  # e.g. allowed to patch but not to get: apply tells what matters
        except Exception as exc:
            raise cluster.explain(exc, doing) from None
        try:
            status, applied = await cluster.call(
                cluster.apply, resource, body, namespace, self.force_conflicts
            )
        except Exception as exc:
            raise cluster.explain(
                exc,
                doing,
                conflict="fields in the manifest are owned by another field manager: change them "
                "back there, remove them from the manifest, or pass force_conflicts=True to take "
                "them over",
            ) from None
        verb = _applied_verb(before, status, applied)
        context.log(
            f"{doc.ref} {verb}" + (f" (namespace {namespace})" if namespace else ""), "shipyard"
        )
        if doc.kind in WORKLOAD_KINDS and doc.api_version.startswith("apps/"):
            return _Workload(doc, resource, namespace, shown, obj=applied)
        return None

    async def _resource(self, cluster: Cluster, doc: Document) -> Any:
        """The dynamic client's resource for the document's kind, or a failure naming it."""
        errors = cluster.errors
        try:
            return await cluster.call(cluster.resource, doc.api_version, doc.kind)
        except (errors.ResourceNotFoundError, errors.ResourceNotUniqueError):
            raise StepFailed(
                f"the cluster at {cluster.where} does not serve kind {doc.kind!r} of apiVersion "
                f"{doc.api_version!r} ({doc.ref} from {doc.where}); check apiVersion and kind, "
                "or install the CustomResourceDefinition that defines it first"
            ) from None
        except Exception as exc:
            raise cluster.explain(exc, f"look up kind {doc.kind} ({doc.where})") from None

    async def _established(
        self, cluster: Cluster, context: StepContext, doc: Document, deadline: float | None
    ) -> None:
        """Wait until the CRD serves its kind (Established), then discover the API again, so
        that the custom resources after it in the manifests can be applied."""
        import asyncio

        loop = asyncio.get_running_loop()
        until = deadline if deadline is not None else loop.time() + 60
        resource = await self._resource(cluster, doc)
        reason = "no condition yet"
        while True:
            obj = await cluster.call(cluster.read_or_none, resource, doc.name, None)
            conditions = {
                c.get("type"): c for c in ((obj or {}).get("status") or {}).get("conditions") or []
            }
            established = conditions.get("Established") or {}
            if established.get("status") == "True":
                break
            names = conditions.get("NamesAccepted") or {}
            if names.get("status") == "False":
                raise StepFailed(
                    f"{doc.ref} from {doc.where} was not accepted: {names.get('reason')}: "
                    f"{names.get('message')}"
                )
            reason = established.get("message") or established.get("reason") or reason
            if loop.time() >= until:
                raise StepFailed(
                    f"{doc.ref} from {doc.where} was not Established in time: {reason}"
                )
            await asyncio.sleep(0.2)
        await cluster.call(cluster.rediscover)
        context.log(f"{doc.ref} established: its kinds are served", "shipyard")

    # -- waiting for the rollouts -----------------------------------------------------------------

    async def _wait(
        self,
        cluster: Cluster,
        context: StepContext,
        workloads: list[_Workload],
        deadline: float | None,
    ) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        pending = list({(w.doc.ref, w.namespace): w for w in workloads}.values())
        interval = 0.1
        first = True
        while True:
            for w in list(pending):
                # The first look uses the object the apply returned.
                if await self._rolled_out(cluster, context, w, not first or w.obj is None):
                    pending.remove(w)
            first = False
            if not pending:
                return
            now = loop.time()
            if deadline is not None and now >= deadline:
                raise await self._timed_out(cluster, pending)
            pause = interval if deadline is None else min(interval, max(deadline - now, 0.0))
            await asyncio.sleep(pause)
            interval = min(interval * 1.5, MAX_POLL_INTERVAL)

    async def _rolled_out(
        self, cluster: Cluster, context: StepContext, w: _Workload, refresh: bool
    ) -> bool:
        """Whether ``w`` has rolled out (reading it again when ``refresh``); logs its progress.

        :raises StepFailed: when the rollout failed, or the workload cannot be read.
        """
        if refresh:
            try:
                w.obj = await cluster.call(cluster.read, w.resource, w.doc.name, w.namespace)
            except cluster.errors.NotFoundError:
                raise StepFailed(
                    f"{w.shown} was deleted while waiting for it to roll out"
                ) from None
            except Exception as exc:
                raise cluster.explain(exc, f"watch the rollout of {w.shown}") from None
        assert w.obj is not None
        state, message = rollout_status(w.obj)
        if message != w.message:
            w.message = message
            context.log(f"{w.shown}: {message}", "shipyard")
        if state == FAILED:
            pods = await self._pods_not_ready(cluster, w)
            raise StepFailed(
                f"{w.shown} failed to roll out: {message}{pods}; see kubectl describe "
                f"{w.doc.ref}" + (f" -n {w.namespace}" if w.namespace else "")
            )
        return state == DONE

    async def _timed_out(self, cluster: Cluster, pending: list[_Workload]) -> StepFailed:
        """The failure when the deadline passed: what each workload still waits for, and why."""
        details = []
        for w in pending:
            details.append(f"{w.shown}: {w.message}{workload_conditions(w.obj)}"
                           f"{await self._pods_not_ready(cluster, w)}")  # fmt: skip
        return StepFailed(
            f"the rollout did not finish within {self.timeout:g}s: " + "; ".join(details)
        )

    async def _pods_not_ready(self, cluster: Cluster, w: _Workload) -> str:
        """``; pods not ready: a (ImagePullBackOff), ...`` for a failure message (or "")."""
        selector = label_selector(((w.obj or {}).get("spec") or {}).get("selector"))
        if not selector:
            return ""
        try:
            pods_resource = await cluster.call(cluster.resource, "v1", "Pod")
            pods = await cluster.call(cluster.list, pods_resource, w.namespace, selector)
        except Exception as exc:
            return f"; could not list its pods ({type(exc).__name__})"
        bad = [p for p in pods if not pod_ready(p)]
        if not bad:
            return ""
        shown = [f"{p['metadata']['name']} ({pod_state(p)})" for p in bad[:MAX_PODS_SHOWN]]
        more = f" and {len(bad) - MAX_PODS_SHOWN} more" if len(bad) > MAX_PODS_SHOWN else ""
        return f"; pods not ready: {', '.join(shown)}{more}"


def _applied_verb(before: Obj | None, status: int, applied: Obj) -> str:
    """``created``, ``configured`` or ``unchanged``, as ``kubectl apply`` says."""
    if before is None:
        return "created" if status == 201 else "configured"
    version_before = (before.get("metadata") or {}).get("resourceVersion")
    version_after = (applied.get("metadata") or {}).get("resourceVersion")
    return "unchanged" if version_before == version_after else "configured"


# Reprs, tracebacks and pickles name the package, as before it was split into modules.
KubernetesApplyStep.__module__ = "shipyard.plugins.kubernetes"
