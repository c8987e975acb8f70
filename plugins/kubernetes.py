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
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import Final
from typing import TypeVar
from typing import final

from shipyard._exceptions import PipelineDefinitionError
from shipyard._exceptions import StepFailed
from shipyard._output import ThreadedFollower
from shipyard._pipeline import Step
from shipyard._pipeline import reject_unknown_options
from shipyard._plugins import hookimpl
from shipyard._reports import StepResult

if TYPE_CHECKING:
    import asyncio

    from shipyard._pipeline import Deployment
    from shipyard._plugins import StepTypeRegistry
    from shipyard._runner import StepContext

_T = TypeVar("_T")
_Obj = dict[str, Any]

#: The field manager of every server-side apply.
FIELD_MANAGER: Final = "shipyard"
#: ``(connect, read)`` seconds of one API call, unless a step sets ``request_timeout``.
DEFAULT_REQUEST_TIMEOUT: Final = (5.0, 30.0)
#: The longest pause between two looks at a rollout or a Job (they start at 0.1 s and grow).
MAX_POLL_INTERVAL: Final = 1.0
#: Seconds a finished Job's log may take to arrive in full.
LOG_GRACE: Final = 5.0
#: How many not-ready pods a failure names.
MAX_PODS_SHOWN: Final = 10
#: The label every Job Shipyard creates carries (also on its pod).
MANAGED_BY: Final = {"app.kubernetes.io/managed-by": "shipyard"}
#: ``ttlSecondsAfterFinished`` of a ``ttl=0`` Job, should Shipyard not delete it itself.
TTL_BACKSTOP: Final = 60
#: Annotations on Jobs say which deployment made them.
ANNOTATION_PREFIX: Final = "shipyard/"
#: Kinds applied before the others, so that what they define exists.
_FIRST_KINDS: Final = ("Namespace", "CustomResourceDefinition")
#: Workloads whose rollout is waited for.
WORKLOAD_KINDS: Final = ("Deployment", "StatefulSet", "DaemonSet")
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
_MANIFEST_SUFFIXES: Final = (".yaml", ".yml", ".json")

_VARIABLE = re.compile(r"\$(\$?)\{([^}\n]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_NAMESPACE_MISSING = re.compile(r'namespaces "([^"]+)" not found')


# -- definition-time checks -----------------------------------------------------------------------


def _request_timeout(value: Any, kind: str) -> tuple[float, float]:
    def number(x: Any) -> bool:
        return not isinstance(x, bool) and isinstance(x, (int, float)) and x > 0

    if number(value):
        return (min(float(value), DEFAULT_REQUEST_TIMEOUT[0]), float(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(number(x) for x in value):
        return (float(value[0]), float(value[1]))
    raise PipelineDefinitionError(
        f"{kind} step: request_timeout must be seconds or a (connect, read) pair of seconds, "
        f"got {value!r}"
    )


def _optional_name(value: Any, what: str, kind: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise PipelineDefinitionError(
            f"{kind} step: {what} must be a non-empty string, got {value!r}"
        )
    if what == "namespace" and "{{shipyard.secret:" not in value and not _DNS_LABEL.match(value):
        raise PipelineDefinitionError(
            f"{kind} step: namespace must be a DNS label (lowercase letters, digits and '-'), "
            f"got {value!r}"
        )
    return value


def _manifest_list(value: Any) -> list[str]:
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


def _flag(value: Any, what: str, kind: str) -> bool:
    if not isinstance(value, bool):
        raise PipelineDefinitionError(f"{kind} step: {what} must be True or False, got {value!r}")
    return value


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- rendering manifests (PyYAML only, no server) -------------------------------------------------


class ManifestError(Exception):
    """A manifest cannot be read, rendered or parsed; the message names the file and line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class Document:
    """One object of a manifest, rendered, with where it was written."""

    #: The file as shown to the user (relative to the pipelines file when inside it).
    source: str
    #: The 1-based line where the document starts.
    line: int
    body: _Obj

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def api_version(self) -> str:
        return str(self.body["apiVersion"])

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str | None:
        ns = self.body["metadata"].get("namespace")
        return str(ns) if ns else None

    @property
    def ref(self) -> str:
        """``deployment.apps/web``, as kubectl names objects."""
        return object_ref(self.api_version, self.kind, self.name)


def object_ref(api_version: str, kind: str, name: str) -> str:
    group = api_version.rpartition("/")[0]
    return f"{kind.lower()}.{group}/{name}" if group else f"{kind.lower()}/{name}"


def variables_for(deployment: Deployment) -> dict[str, str]:
    """What ``${NAME}`` may refer to: ``--var`` values, then the ``DEPLOYMENT_*`` ones."""
    values = {str(k): str(v) for k, v in deployment.vars.items()}
    values.update(
        {
            "DEPLOYMENT_ID": str(deployment.id) if deployment.id else "<id>",
            "DEPLOYMENT_VERSION": deployment.version,
            "DEPLOYMENT_ENVIRONMENT": deployment.environment,
            "DEPLOYMENT_PIPELINE": deployment.pipeline,
        }
    )
    return values


def render(text: str, variables: Mapping[str, str], source: str) -> str:
    """``text`` with ``${NAME}`` replaced; ``$${NAME}`` stays ``${NAME}``; a bare ``$X`` stays.

    :raises ManifestError: for an unknown variable or a value with a line break, naming the line.
    """

    def replace(match: re.Match[str]) -> str:
        escaped, name = match.group(1), match.group(2)
        if escaped:
            return "${" + name + "}"
        line = text.count("\n", 0, match.start()) + 1
        if not _NAME.match(name):
            raise ManifestError(
                f"{source}:{line}: ${{{name}}} is not a variable reference (names are letters, "
                "digits and _); write $${...} for a literal ${...}"
            )
        if name not in variables:
            known = ", ".join(sorted(variables))
            raise ManifestError(
                f"{source}:{line}: unknown variable ${{{name}}} (known: {known}); pass it with "
                f"--var {name}=VALUE, or write $${{{name}}} for a literal ${{{name}}}"
            )
        value = variables[name]
        if "\n" in value or "\r" in value:
            raise ManifestError(
                f"{source}:{line}: the value of ${{{name}}} has a line break, which cannot be "
                "put into YAML text; pass a single-line value"
            )
        return value

    return _VARIABLE.sub(replace, text)


def _yaml() -> Any:
    # Any: PyYAML is optional (the kubernetes extra) and imported lazily.
    try:
        import yaml
    except ImportError:
        raise ManifestError(
            "rendering Kubernetes manifests needs PyYAML, which is not installed; install it "
            "with: pip install 'shipyard[kubernetes]'"
        ) from None
    return yaml


_LOADERS: dict[str, Any] = {}


def _loader_class() -> Any:
    """A safe loader that keeps timestamps as text (JSON, and so the API server, has no dates)."""
    cls: Any = _LOADERS.get("safe")
    if cls is None:
        yaml = _yaml()
        base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        cls = type("_ManifestLoader", (base,), {})
        cls.add_constructor(
            "tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(node)
        )
        _LOADERS["safe"] = cls
    return cls


def parse(text: str, source: str) -> list[Document]:
    """The documents of a rendered YAML (or JSON) text; empty documents are skipped.

    ``kind: List`` documents are expanded into their items.

    :raises ManifestError: for invalid YAML or a document that is not a Kubernetes object.
    """
    yaml = _yaml()
    loader = _loader_class()(text)
    docs: list[Document] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            line = node.start_mark.line + 1
            body = loader.construct_document(node)
            if body is None:
                continue
            items = body.get("items") if isinstance(body, dict) else None
            if (
                isinstance(body, dict)
                and str(body.get("kind", "")).endswith("List")
                and isinstance(items, list)
            ):
                for item in items:
                    docs.append(_checked(Document(source, line, item)))
            else:
                docs.append(_checked(Document(source, line, body)))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        what = f"{context}, {problem}" if context else problem
        raise ManifestError(f"{where}: invalid YAML: {what}; fix the manifest") from None
    finally:
        loader.dispose()
    return docs


def _checked(doc: Document) -> Document:
    body = doc.body
    if not isinstance(body, dict):
        raise ManifestError(
            f"{doc.where}: a document must be a Kubernetes object (a mapping with apiVersion, "
            f"kind and metadata), got a {type(body).__name__}"
        )
    missing = [k for k in ("apiVersion", "kind") if not isinstance(body.get(k), str) or not body[k]]
    meta = body.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        missing.append("metadata.name")
    if missing:
        raise ManifestError(
            f"{doc.where}: the document has no {', '.join(missing)}; server-side apply needs "
            "apiVersion, kind and metadata.name in every document"
        )
    return doc


def manifest_files(manifests: Iterable[str], rootdir: Path) -> list[tuple[Path, str]]:
    """The files to read, as ``(path, shown name)``: folders give their YAML/JSON files, sorted.

    :raises ManifestError: for a path that does not exist or a folder without manifests.
    """
    found: list[tuple[Path, str]] = []
    for item in manifests:
        path = (rootdir / item).expanduser()
        shown = item
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir() if p.suffix in _MANIFEST_SUFFIXES and p.is_file()
            )
            if not files:
                raise ManifestError(
                    f"manifest folder {item!r} ({path}) has no .yaml, .yml or .json files; "
                    "check the path"
                )
            found += [(p, _shown(p, rootdir)) for p in files]
        elif path.is_file():
            found.append((path, shown))
        else:
            raise ManifestError(
                f"manifest {item!r} not found (looked for {path}, relative to the pipelines "
                "file's folder); check the path"
            )
    return found


def _shown(path: Path, rootdir: Path) -> str:
    try:
        return path.relative_to(rootdir).as_posix()
    except ValueError:
        return str(path)


def load_documents(
    manifests: Iterable[str], rootdir: Path, variables: Mapping[str, str]
) -> list[Document]:
    """Read, render and parse every manifest; Namespaces and CRDs first, the rest in order."""
    docs: list[Document] = []
    for path, shown in manifest_files(manifests, rootdir):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ManifestError(f"manifest {shown} is not UTF-8 text") from None
        except OSError as exc:
            raise ManifestError(f"cannot read manifest {shown}: {exc.strerror}") from None
        docs += parse(render(text, variables, shown), shown)
    if not docs:
        raise ManifestError(
            f"the manifests ({', '.join(manifests)}) contain no documents; nothing to apply"
        )
    first = [d for d in docs if d.kind in _FIRST_KINDS]
    return first + [d for d in docs if d.kind not in _FIRST_KINDS]


def images_of(body: Any) -> list[str]:
    """Container images anywhere in an object (pod templates, CronJob templates, pods)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    found.extend(
                        str(c["image"]) for c in value if isinstance(c, dict) and c.get("image")
                    )
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(body.get("spec") if isinstance(body, dict) else None)
    return list(dict.fromkeys(found))


# -- rollout status (the rules of `kubectl rollout status`) ---------------------------------------

#: Outcomes of :func:`rollout_status`.
DONE: Final = "done"
WAITING: Final = "waiting"
FAILED: Final = "failed"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def condition(obj: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == kind:
            return cond
    return None


def rollout_status(obj: Mapping[str, Any]) -> tuple[str, str]:
    """Whether a Deployment, StatefulSet or DaemonSet has rolled out, and what it waits for.

    :returns: ``(DONE | WAITING | FAILED, message)``, as ``kubectl rollout status`` decides.
    """
    kind = obj.get("kind")
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    generation = _int(meta.get("generation"))
    observed = _int(status.get("observedGeneration"))
    not_observed = "waiting for the controller to observe the new spec"
    if kind == "Deployment":
        if generation > observed:
            return WAITING, not_observed
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
    strategy = spec.get("updateStrategy") or {}
    strategy_type = strategy.get("type", "RollingUpdate")
    if strategy_type != "RollingUpdate":
        return DONE, f"not waited for: updateStrategy {strategy_type} has no rollout to watch"
    if kind == "StatefulSet":
        if observed == 0 or generation > observed:
            return WAITING, not_observed
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
    if kind == "DaemonSet":
        if generation > observed:
            return WAITING, not_observed
        desired = _int(status.get("desiredNumberScheduled"))
        updated = _int(status.get("updatedNumberScheduled"))
        available = _int(status.get("numberAvailable"))
        if updated < desired:
            return WAITING, f"{updated} of {desired} new pods have been updated"
        if available < desired:
            return WAITING, f"{available} of {desired} updated pods are available"
        return DONE, "successfully rolled out"
    return DONE, "not a workload"


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


# -- the cluster ----------------------------------------------------------------------------------


def _client() -> Any:
    # Any: the kubernetes client is an optional dependency without type information.
    try:
        import kubernetes  # the official client, never this module: imports are absolute
        import kubernetes.client
        import kubernetes.config
        import kubernetes.dynamic
    except ImportError:
        raise StepFailed(
            "the kubernetes steps need the official Kubernetes client for Python, which is not "
            "installed; install it with: pip install 'shipyard[kubernetes]'"
        ) from None
    return kubernetes


def _kubeconfig() -> tuple[str | None, str]:
    """The kubeconfig file(s) to use, or None for the pod's service account; and how to say it.

    :raises StepFailed: when there is neither.
    """
    env = os.environ.get("KUBECONFIG", "").strip()
    if env:
        paths = [p for p in env.split(os.pathsep) if p]
        existing = [p for p in paths if Path(p).expanduser().is_file()]
        if not existing:
            raise StepFailed(
                f"KUBECONFIG is {env!r}, but there is no such file; point KUBECONFIG at your "
                "cluster's kubeconfig (`kubectl config view` shows the one kubectl uses)"
            )
        return os.pathsep.join(str(Path(p).expanduser()) for p in existing), "KUBECONFIG"
    default = Path("~/.kube/config").expanduser()
    if default.is_file():
        return str(default), str(default)
    if os.environ.get("KUBERNETES_SERVICE_HOST") and Path(_SA_TOKEN).is_file():
        return None, "the pod's service account"
    raise StepFailed(
        f"no kubeconfig: KUBECONFIG is not set, {default} does not exist, and this is not a "
        "pod in a cluster; set KUBECONFIG to your cluster's kubeconfig file"
    )


_SA_TOKEN: Final = "/var/run/secrets/kubernetes.io/serviceaccount/token"
_SA_NAMESPACE: Final = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _discovery_cache(host: str) -> tuple[str, str | None]:
    """A private discovery cache file for ``host``, and a folder to remove afterwards (or None).

    Per user (``$XDG_CACHE_HOME/shipyard/kubernetes``, mode 0700), never the shared temporary
    folder the client would use by default, where anyone could plant a poisoned cache.
    """
    import hashlib

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "shipyard" / "kubernetes"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if folder.stat().st_mode & 0o077:
            folder.chmod(0o700)
        if not os.access(folder, os.W_OK):
            raise PermissionError(folder)
    except OSError:
        import tempfile

        tmp = tempfile.mkdtemp(prefix="shipyard-k8s-")  # 0700, removed after the step
        return os.path.join(tmp, "discovery.json"), tmp
    key = hashlib.sha256(host.encode()).hexdigest()[:20]
    return str(folder / f"discovery-{key}.json"), None


def _http_detail(exc: Any) -> tuple[int, str, str]:
    """``(status, reason, message)`` of an API error, from its ``Status`` body when there is one."""
    import json

    status = int(getattr(exc, "status", 0) or 0)
    reason = str(getattr(exc, "reason", "") or "")
    message = ""
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str) and body:
        try:
            doc = json.loads(body)
        except ValueError:
            message = " ".join(body.split())[:300]
        else:
            if isinstance(doc, dict):
                message = str(doc.get("message") or "")
                reason = str(doc.get("reason") or reason)
    # One line: a multi-conflict answer lists the fields on lines of their own.
    return status, reason, " ".join((message or reason).split())


def _why(exc: BaseException, read_timeout: float) -> str:
    """A short reason for a failed connection, from urllib3's nested exceptions."""
    import urllib3.exceptions as ue

    reason: BaseException = exc
    if isinstance(exc, ue.MaxRetryError) and exc.reason is not None:
        reason = exc.reason
    text = str(reason)
    low = text.lower()
    if isinstance(reason, ue.NewConnectionError):
        if "refused" in low:
            return "connection refused"
        if (
            "name or service not known" in low
            or "nodename nor servname" in low
            or ("name resolution" in low)
        ):
            return "unknown host name"
        return _short(text.split("]", 1)[-1].strip() or text, 160)
    if isinstance(reason, ue.ConnectTimeoutError):
        return "no connection within the connect timeout"
    if isinstance(reason, ue.ReadTimeoutError):
        return f"no answer within {read_timeout:g}s"
    if isinstance(reason, ue.SSLError):
        return "TLS error: " + _short(text, 200)
    if isinstance(reason, ue.ProtocolError):
        return "the server closed the connection without answering"
    return _short(" ".join(text.split()), 200) or type(reason).__name__


@final
class Cluster:
    """One API client for one step run; blocking calls run in worker threads.

    :ivar namespace: the kubeconfig context's namespace (``default`` when it names none).
    :ivar where: how to name the cluster in messages (server, context and kubeconfig).
    """

    def __init__(
        self,
        api: Any,
        dyn: Any,
        *,
        server: str,
        where: str,
        namespace: str,
        request_timeout: tuple[float, float],
        cleanup: str | None,
    ) -> None:
        # Any: kubernetes.client.ApiClient and kubernetes.dynamic.DynamicClient, imported lazily.
        self.api = api
        self.dyn = dyn
        self.server = server
        self.where = where
        self.namespace = namespace
        self.request_timeout = request_timeout
        self._cleanup = cleanup
        self._inflight: set[asyncio.Future[Any]] = set()
        self._resources: dict[tuple[str, str], Any] = {}

    @classmethod
    async def connect(cls, context: str | None, request_timeout: tuple[float, float]) -> Cluster:
        """Read the kubeconfig (or the in-cluster config) and discover the API.

        :raises StepFailed: with one sentence saying what was looked for and what to do.
        """
        import asyncio

        k8s = _client()
        config_file, source = _kubeconfig()
        if config_file is None and context is not None:
            raise StepFailed(
                f"context {context!r} was asked for, but there is no kubeconfig (only {source}); "
                "set KUBECONFIG to a kubeconfig that has this context"
            )

        def build() -> Cluster:
            cfg = k8s.client.Configuration()
            config_errors = k8s.config.ConfigException
            if config_file is None:
                try:
                    k8s.config.load_incluster_config(client_configuration=cfg)
                except config_errors as exc:
                    raise StepFailed(
                        f"cannot use {source}: {exc}; set KUBECONFIG to a kubeconfig file instead"
                    ) from None
                where = source
                try:
                    namespace = Path(_SA_NAMESPACE).read_text().strip() or "default"
                except OSError:
                    namespace = "default"
            else:
                shown = config_file if source == "KUBECONFIG" else source
                try:
                    contexts, current = k8s.config.list_kube_config_contexts(config_file)
                except (config_errors, OSError, ValueError) as exc:
                    raise StepFailed(
                        f"the kubeconfig {shown} cannot be used: {exc}; fix it, or point "
                        "KUBECONFIG at another one"
                    ) from None
                except Exception as exc:  # YAML errors of a broken file
                    raise StepFailed(
                        f"the kubeconfig {shown} cannot be read: {type(exc).__name__}: "
                        f"{_short(str(exc), 200)}; fix it, or point KUBECONFIG at another one"
                    ) from None
                names = [c.get("name") for c in contexts or []]
                chosen = next(
                    (c for c in contexts or [] if c.get("name") == context),
                    None if context else current,
                )
                if chosen is None:
                    raise StepFailed(
                        f"the kubeconfig {shown} has no context {context!r} (contexts: "
                        f"{', '.join(map(str, names)) or 'none'}); fix the step's context= or "
                        "the kubeconfig"
                    )
                try:
                    k8s.config.load_kube_config(
                        config_file=config_file, context=chosen["name"],
                        client_configuration=cfg, persist_config=False,
                    )  # fmt: skip
                except (config_errors, OSError, ValueError) as exc:
                    raise StepFailed(
                        f"the kubeconfig {shown} cannot be used with context "
                        f"{chosen['name']!r}: {exc}; fix it, or point KUBECONFIG at another one"
                    ) from None
                where = f"context {chosen['name']!r} of {shown}"
                namespace = (chosen.get("context") or {}).get("namespace") or "default"
            # A dead server must not hide behind urllib3's silent retries (3 per GET).
            cfg.retries = 0
            api = k8s.client.ApiClient(cfg)
            _enforce_timeouts(api, request_timeout)
            cache_file, cleanup = _discovery_cache(cfg.host)
            where = f"{cfg.host} ({where})"
            try:
                dyn = k8s.dynamic.DynamicClient(api, cache_file=cache_file)
            except BaseException as exc:
                api.close()
                _remove_tree(cleanup)
                if isinstance(exc, Exception):
                    raise _connect_error(exc, where, request_timeout) from None
                raise
            return cls(
                api, dyn, server=cfg.host, where=where, namespace=namespace,
                request_timeout=request_timeout, cleanup=cleanup,
            )  # fmt: skip

        fut = asyncio.ensure_future(asyncio.to_thread(build))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(_close_when_built)
            raise

    # -- calls ------------------------------------------------------------------------------------

    async def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn(*args, **kwargs)`` in a worker thread.

        If the caller is cancelled, the call still finishes in its thread (within the request
        timeout); :meth:`settle` waits for it, so a Job created at that moment is not missed.
        """
        import asyncio

        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        return await asyncio.shield(fut)

    async def settle(self) -> None:
        """Wait for calls still running in threads after a cancellation."""
        import asyncio

        pending = [f for f in self._inflight if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=sum(self.request_timeout) + 1)

    def resource(self, api_version: str, kind: str) -> Any:
        """The dynamic client's resource for a kind (discovery, cached; blocking)."""
        key = (api_version, kind)
        found = self._resources.get(key)
        if found is None:
            found = self._resources[key] = self.dyn.resources.get(
                api_version=api_version, kind=kind
            )
        return found

    def known_resource(self, api_version: str, kind: str) -> Any:
        """A resource :meth:`resource` found already, else None (no request)."""
        return self._resources.get((api_version, kind))

    def request(self, method: str, path: str, **params: Any) -> Any:
        """One raw request (blocking): the urllib3 response, unread."""
        params.setdefault("_request_timeout", self.request_timeout)
        return self.dyn.request(method, path, serialize=False, **params)

    def read(self, resource: Any, name: str, namespace: str | None) -> _Obj:
        """GET one object as a dict (blocking)."""
        resp = resource.get(
            name=name, namespace=namespace, serialize=False, _request_timeout=self.request_timeout
        )
        return dict(_body_of(resp))

    def read_or_none(self, resource: Any, name: str, namespace: str | None) -> _Obj | None:
        try:
            return self.read(resource, name, namespace)
        except self.errors.NotFoundError:
            return None

    def list(self, resource: Any, namespace: str | None, selector: str) -> list[_Obj]:
        """LIST objects as dicts (blocking)."""
        resp = resource.get(
            namespace=namespace, label_selector=selector or None, serialize=False,
            _request_timeout=self.request_timeout,
        )  # fmt: skip
        return list(_body_of(resp).get("items") or [])

    def apply(
        self, resource: Any, body: _Obj, namespace: str | None, force: bool
    ) -> tuple[int, _Obj]:
        """Server-side apply ``body`` as :data:`FIELD_MANAGER` (blocking): (HTTP status, object)."""
        resp = resource.server_side_apply(
            body=body, name=body["metadata"]["name"], namespace=namespace,
            field_manager=FIELD_MANAGER, force_conflicts=True if force else None,
            serialize=False, _request_timeout=self.request_timeout,
        )  # fmt: skip
        return int(resp.status), _body_of(resp)

    def create(self, resource: Any, body: _Obj, namespace: str | None) -> _Obj:
        """POST a new object (blocking)."""
        resp = resource.create(
            body=body, namespace=namespace, serialize=False, _request_timeout=self.request_timeout
        )
        return _body_of(resp)

    def delete(self, resource: Any, name: str, namespace: str | None) -> None:
        """DELETE an object and, in the background, what it owns (blocking)."""
        resp = resource.delete(
            name=name, namespace=namespace, propagation_policy="Background", serialize=False,
            _request_timeout=self.request_timeout,
        )  # fmt: skip
        _body_of(resp)

    @property
    def errors(self) -> Any:
        # Any: kubernetes.dynamic.exceptions, imported lazily.
        from kubernetes.dynamic import exceptions

        return exceptions

    def close(self) -> None:
        """Close the client, once calls still running in threads (after a cancel) are done."""
        pending = {f for f in self._inflight if not f.done()}
        if not pending:
            self._close_now()
            return

        def finished(fut: asyncio.Future[Any]) -> None:
            pending.discard(fut)
            if not pending:
                self._close_now()

        for fut in list(pending):
            fut.add_done_callback(finished)

    def _close_now(self) -> None:
        try:
            self.api.close()
        except Exception:
            pass
        _remove_tree(self._cleanup)

    # -- errors -----------------------------------------------------------------------------------

    def explain(self, exc: BaseException, doing: str, conflict: str = "") -> StepFailed:
        """A :class:`StepFailed` for an error met while ``doing`` something (a verb phrase).

        :param conflict: what to do about a 409 Conflict.
        """
        import urllib3.exceptions as ue
        from kubernetes.client.exceptions import ApiException

        if isinstance(exc, ApiException):
            status, reason, message = _http_detail(exc)
            if status == 0:
                return StepFailed(
                    f"cannot reach the Kubernetes API server at {self.where} to {doing}: "
                    f"{_short(' '.join(message.split()), 300)}; check the server address and "
                    "certificate-authority data in the kubeconfig"
                )
            if status == 401:
                return StepFailed(
                    f"the Kubernetes API server at {self.where} rejected the credentials "
                    f"(401 Unauthorized) when asked to {doing}; log in again or renew the "
                    "token in the kubeconfig"
                )
            if status == 403:
                return StepFailed(
                    f"not allowed to {doing} (403 Forbidden: {message}); ask a cluster admin "
                    "for the RBAC permission, or use a kubeconfig context that has it"
                )
            missing = _NAMESPACE_MISSING.search(message) if status == 404 else None
            if missing:
                ns = missing.group(1)
                return StepFailed(
                    f"cannot {doing}: namespace {ns!r} does not exist; create it "
                    f"(kubectl create namespace {ns}) or add a Namespace document to the manifests"
                )
            if status == 409:
                return StepFailed(f"cannot {doing}: {message}; {conflict or 'try again'}")
            if status == 422:
                return StepFailed(
                    f"the API server refused to {doing} because the object is invalid: "
                    f"{message}; fix the manifest"
                )
            if status in (400, 404, 405, 415):
                return StepFailed(
                    f"the API server refused to {doing} ({status} {reason}: {message}); "
                    "check the manifest"
                )
            return StepFailed(
                f"the Kubernetes API server at {self.where} could not {doing} ({status} "
                f"{reason}: {message}); try again later, or check the cluster's health"
            )
        if isinstance(exc, ue.HTTPError):
            return StepFailed(
                f"lost the Kubernetes API server at {self.where} while trying to {doing}: "
                f"{_why(exc, self.request_timeout[1])}; check that the cluster is running and "
                "reachable from here (kubectl cluster-info)"
            )
        return StepFailed(f"could not {doing}: {type(exc).__name__}: {_short(str(exc), 300)}")


def _close_when_built(fut: asyncio.Future[Cluster]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()


def _body_of(resp: Any) -> _Obj:
    """The JSON body of a raw response, read to the end so its connection goes back to the pool.

    (A response left unread would keep its socket until garbage collection.)
    """
    import json

    try:
        data = resp.data
    finally:
        resp.release_conn()
    body = json.loads(data) if data else {}
    return body if isinstance(body, dict) else {}


def _remove_tree(path: str | None) -> None:
    if path:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def _enforce_timeouts(api: Any, timeout: tuple[float, float]) -> None:
    """Give every request of ``api`` a (connect, read) timeout, also the client's own.

    The dynamic client's discovery requests pass none, and without one a server that accepts
    the connection and never answers would hang the step until its deadline.
    """
    rest = api.rest_client
    original = rest.request

    def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("_request_timeout"):
            kwargs["_request_timeout"] = timeout
        return original(method, url, *args, **kwargs)

    rest.request = request


def _connect_error(exc: Exception, where: str, timeout: tuple[float, float]) -> StepFailed:
    """An error met while discovering the API of the server ``where`` (URL and context)."""
    import urllib3.exceptions as ue
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        status, reason, message = _http_detail(exc)
        if status == 401:
            return StepFailed(
                f"the Kubernetes API server at {where} rejected the credentials (401 "
                "Unauthorized); log in again or renew the token in the kubeconfig"
            )
        if status == 403:
            return StepFailed(
                f"not allowed to discover the Kubernetes API at {where} (403 Forbidden: "
                f"{message}); ask a cluster admin for the RBAC permission, or use another context"
            )
        if status == 0:
            return StepFailed(
                f"cannot reach the Kubernetes API server at {where}: {_short(message, 300)}; "
                "check the server address and certificate-authority data in the kubeconfig"
            )
        return StepFailed(
            f"the Kubernetes API server at {where} answered {status} {reason} while being "
            f"discovered: {message}; check the cluster's health"
        )
    if isinstance(exc, ue.HTTPError):
        return StepFailed(
            f"cannot reach the Kubernetes API server at {where}: {_why(exc, timeout[1])}; check "
            "that the cluster is running and that the kubeconfig's server address is right "
            "(kubectl cluster-info)"
        )
    if isinstance(exc, ValueError) and "should start with https://" in str(exc):
        # The client's guess when the server closed the connection during discovery.
        return StepFailed(
            f"cannot reach the Kubernetes API server at {where}: the server closed the "
            "connection without answering; check that the cluster is running and that the "
            "kubeconfig's server address (http or https) is right"
        )
    return StepFailed(
        f"cannot discover the Kubernetes API at {where}: {type(exc).__name__}: "
        f"{_short(str(exc), 300)}"
    )


def _deadline_margin(timeout: float) -> float:
    """How much earlier than the runner's timeout a step gives up by itself, with its reasons."""
    return min(2.0, timeout * 0.2)


# -- kubernetes(...) ------------------------------------------------------------------------------


@dataclass
class _Workload:
    doc: Document
    resource: Any
    namespace: str | None
    shown: str
    message: str = ""
    obj: _Obj | None = None


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
        self.manifests = _manifest_list(manifest)
        self.namespace = _optional_name(namespace, "namespace", self.kind)
        self.context = _optional_name(context, "context", self.kind)
        self.wait = _flag(wait, "wait", self.kind)
        self.force_conflicts = _flag(force_conflicts, "force_conflicts", self.kind)
        self.request_timeout = _request_timeout(request_timeout, self.kind)
        super().__init__(name=name, timeout=timeout, retries=retries)

    def default_name(self) -> str:
        return _short(f"kubernetes apply {' '.join(self.manifests)}")

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
        except ManifestError as exc:
            return [f"cannot render the manifests: {exc.message}"]
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

    def options(self) -> dict[str, Any]:
        return {"manifest": self.manifests, "namespace": self.namespace, "context": self.context,
                "wait": self.wait, "force_conflicts": self.force_conflicts,
                "request_timeout": list(self.request_timeout)}  # fmt: skip

    async def run(self, context: StepContext) -> StepResult:
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = None
        if self.timeout is not None:
            deadline = loop.time() + self.timeout - _deadline_margin(self.timeout)
        try:
            docs = await asyncio.to_thread(
                load_documents, self.manifests, context.rootdir, variables_for(context.deployment)
            )
        except ManifestError as exc:
            raise StepFailed(exc.message) from None
        cluster = await Cluster.connect(context.resolve(self.context), self.request_timeout)
        try:
            workloads = []
            for doc in docs:
                w = await self._apply(cluster, context, doc)
                if w is not None:
                    workloads.append(w)
            if self.wait and workloads:
                await self._wait(cluster, context, workloads, deadline)
        finally:
            cluster.close()
        return StepResult()

    async def _apply(
        self, cluster: Cluster, context: StepContext, doc: Document
    ) -> _Workload | None:
        import json

        errors = cluster.errors
        try:
            resource = await cluster.call(cluster.resource, doc.api_version, doc.kind)
        except (errors.ResourceNotFoundError, errors.ResourceNotUniqueError):
            raise StepFailed(
                f"the cluster at {cluster.where} does not serve kind {doc.kind!r} of apiVersion "
                f"{doc.api_version!r} ({doc.ref} from {doc.where}); check apiVersion and kind, "
                "or install the CustomResourceDefinition that defines it first"
            ) from None
        except Exception as exc:
            raise cluster.explain(exc, f"look up kind {doc.kind} ({doc.where})") from None
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
        if before is None:
            verb = "created" if status == 201 else "configured"
        elif (before.get("metadata") or {}).get("resourceVersion") == (
            applied.get("metadata") or {}
        ).get("resourceVersion"):
            verb = "unchanged"
        else:
            verb = "configured"
        context.log(
            f"{doc.ref} {verb}" + (f" (namespace {namespace})" if namespace else ""), "shipyard"
        )
        if doc.kind in WORKLOAD_KINDS and doc.api_version.startswith("apps/"):
            return _Workload(doc, resource, namespace, shown, obj=applied)
        return None

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
                if not first or w.obj is None:
                    try:
                        w.obj = await cluster.call(
                            cluster.read, w.resource, w.doc.name, w.namespace
                        )
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
                if state == DONE:
                    pending.remove(w)
            first = False
            if not pending:
                return
            now = loop.time()
            if deadline is not None and now >= deadline:
                details = []
                for w in pending:
                    details.append(f"{w.shown}: {w.message}{_conditions(w.obj)}"
                                   f"{await self._pods_not_ready(cluster, w)}")  # fmt: skip
                raise StepFailed(
                    f"the rollout did not finish within {self.timeout:g}s: " + "; ".join(details)
                )
            pause = interval if deadline is None else min(interval, max(deadline - now, 0.0))
            await asyncio.sleep(pause)
            interval = min(interval * 1.5, MAX_POLL_INTERVAL)

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


def _conditions(obj: _Obj | None) -> str:
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


# -- kubernetes.job(...) --------------------------------------------------------------------------


def _job_command(value: Any, kind: str) -> list[str] | None:
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


def _job_env(value: Any, kind: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and re.match(r"[-._a-zA-Z][-._a-zA-Z0-9]*\Z", k) for k in value
    ):
        raise PipelineDefinitionError(
            f"{kind} step: env must map variable names to values, got {value!r}"
        )
    return {k: v if isinstance(v, str) else str(v) for k, v in value.items()}


class _JobTimedOut(Exception):
    pass


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
        if not isinstance(job, str) or len(job) > 63 or not _DNS_LABEL.match(job):
            raise PipelineDefinitionError(
                "kubernetes.job step: the Job name must be a DNS label (at most 63 lowercase "
                f"letters, digits and '-'), got {job!r}"
            )
        self.job = job
        if not isinstance(image, str) or not image.strip() or any(c.isspace() for c in image):
            raise PipelineDefinitionError(
                f"kubernetes.job step: image must be an image reference such as 'app:1.2', "
                f"got {image!r}"
            )
        self.image = image
        self.command = _job_command(command, self.kind)
        self.namespace = _optional_name(namespace, "namespace", self.kind)
        self.env = _job_env(env, self.kind)
        self.context = _optional_name(context, "context", self.kind)
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 0):
            raise PipelineDefinitionError(
                f"kubernetes.job step: ttl must be a whole number of seconds >= 0 or None, "
                f"got {ttl!r}"
            )
        self.ttl = ttl
        self.service_account = _optional_name(service_account, "service_account", self.kind)
        self.request_timeout = _request_timeout(request_timeout, self.kind)
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

    def options(self) -> dict[str, Any]:
        return {"job": self.job, "image": self.image, "command": self.command,
                "namespace": self.namespace, "env": self.env, "context": self.context,
                "ttl": self.ttl, "service_account": self.service_account,
                "request_timeout": list(self.request_timeout)}  # fmt: skip

    def _body(self, context: StepContext, namespace: str, token: str) -> _Obj:
        d = context.deployment
        env = {**context.deployment_env, **context.resolve(self.env)}
        container: _Obj = {
            "name": "main",
            "image": self.image,
            "env": [{"name": k, "value": str(v)} for k, v in env.items()],
        }
        if self.command is not None:
            container["command"] = context.resolve(self.command)
        pod_spec: _Obj = {"restartPolicy": "Never", "containers": [container]}
        if self.service_account:
            pod_spec["serviceAccountName"] = context.resolve(self.service_account)
        spec: _Obj = {
            "backoffLimit": 0,
            "template": {"metadata": {"labels": dict(MANAGED_BY)}, "spec": pod_spec},
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
                "annotations": {
                    f"{ANNOTATION_PREFIX}pipeline": d.pipeline,
                    f"{ANNOTATION_PREFIX}environment": d.environment,
                    f"{ANNOTATION_PREFIX}version": d.version,
                    f"{ANNOTATION_PREFIX}deployment": str(d.id),
                    f"{ANNOTATION_PREFIX}run": token,
                },
            },
            "spec": spec,
        }

    async def run(self, context: StepContext) -> StepResult:
        import asyncio
        import secrets

        loop = asyncio.get_running_loop()
        deadline = None
        if self.timeout is not None:
            deadline = loop.time() + self.timeout - _deadline_margin(self.timeout)
        cluster = await Cluster.connect(context.resolve(self.context), self.request_timeout)
        namespace = context.resolve(self.namespace) or cluster.namespace
        shown = f"job.batch/{self.job} (namespace {namespace})"
        token = secrets.token_hex(8)
        uid: str | None = None
        follower: _LogFollower | None = None
        delete_why: str | None = None
        try:
            try:
                jobs = await cluster.call(cluster.resource, "batch/v1", "Job")
                pods = await cluster.call(cluster.resource, "v1", "Pod")
                await self._replace_previous(cluster, context, jobs, namespace, shown, deadline)
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
                follower = _LogFollower(cluster, context, namespace, deadline)
                job, pod = await self._follow(
                    cluster, context, jobs, pods, namespace, shown, uid, follower, deadline
                )
            except _JobTimedOut as exc:
                delete_why = "timed out"
                tail = list(follower.tail) if follower is not None else []
                what = "did not finish" if uid is not None else "could not even start"
                raise StepFailed(
                    f"{shown} {what} within {self.timeout:g}s ({exc})"
                    + ("; deleted it" if uid is not None else "")
                    + _tail_text(tail),
                    output=tail,
                ) from None
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

    def _outcome(
        self,
        context: StepContext,
        job: _Obj,
        pod: _Obj | None,
        shown: str,
        follower: _LogFollower,
    ) -> StepResult:
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
                f"{shown} failed ({why}){how}{follower.note()}{_tail_text(tail)}",
                step_exit_code=code,
                output=tail,
            )
        context.log(f"{shown} succeeded" + follower.note(), "shipyard")
        return StepResult(exit_code=code if code is not None else 0)

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
        import asyncio

        try:
            old = await cluster.call(cluster.read_or_none, jobs, self.job, namespace)
        except Exception as exc:
            raise cluster.explain(exc, f"look for an earlier {shown}") from None
        if old is None:
            return
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
        try:
            await cluster.call(cluster.delete, jobs, self.job, namespace)
        except cluster.errors.NotFoundError:
            pass
        except Exception as exc:
            raise cluster.explain(
                exc, f"delete the finished {shown} of deployment {made_by}"
            ) from None
        context.log(f"deleted the finished {shown} of deployment {made_by}", "shipyard")
        loop = asyncio.get_running_loop()
        interval = 0.05
        while (await cluster.call(cluster.read_or_none, jobs, self.job, namespace)) is not None:
            if deadline is not None and loop.time() >= deadline:
                raise _JobTimedOut(f"the earlier {shown} was still being deleted")
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, MAX_POLL_INTERVAL)

    async def _follow(
        self,
        cluster: Cluster,
        context: StepContext,
        jobs: Any,
        pods: Any,
        namespace: str,
        shown: str,
        uid: str,
        follower: _LogFollower,
        deadline: float | None,
    ) -> tuple[_Obj, _Obj | None]:
        """Wait for the Job to end, following its pod's log; return the Job and its pod."""
        import asyncio

        loop = asyncio.get_running_loop()
        interval = 0.1
        pod: _Obj | None = None
        last_state = ""
        while True:
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
            finished = _job_finished(job)
            if not follower.started or finished:
                try:
                    found = await cluster.call(
                        cluster.list, pods, namespace, f"job-name={self.job}"
                    )
                except Exception as exc:
                    raise cluster.explain(exc, f"find the pod of {shown}") from None
                mine = [p for p in found if _owned_by(p, uid)]
                if mine:
                    pod = max(mine, key=lambda p: p["metadata"].get("creationTimestamp", ""))
            if pod is not None and not follower.started:
                state = pod_state(pod)
                if state != last_state:
                    last_state = state
                    context.log(f"pod {pod['metadata']['name']}: {state}", "shipyard")
                if _container_started(pod):
                    follower.start(pod["metadata"]["name"])
            if finished:
                if pod is not None and not follower.started and _container_started(pod):
                    follower.start(pod["metadata"]["name"])  # the whole log, at once
                await follower.wait(LOG_GRACE)
                return job, pod
            now = loop.time()
            if deadline is not None and now >= deadline:
                where = f"pod {pod['metadata']['name']}: {pod_state(pod)}" if pod else "no pod yet"
                raise _JobTimedOut(where)
            pause = interval if deadline is None else min(interval, max(deadline - now, 0.0))
            await asyncio.sleep(pause)
            interval = min(interval * 1.5, MAX_POLL_INTERVAL)

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


def _tail_text(lines: Iterable[str], n: int = 10) -> str:
    lines = list(lines)[-n:]
    return ("; last output:\n" + "\n".join(f"  {ln}" for ln in lines)) if lines else ""


class _LogFollower(ThreadedFollower):
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

    def start(self, pod: str) -> None:
        self._pod = self.label = pod
        # The stream ends with the container; its read timeout is what is left of the step.
        if self.deadline is not None:
            self._read = max(self.deadline - self._loop.time(), 0.0) + LOG_GRACE
        super().start()

    def note(self) -> str:
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


# -- the façade -----------------------------------------------------------------------------------


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
