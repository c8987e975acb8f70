"""A loopback Kubernetes-API-compatible server for tests.

``FakeKube`` serves enough of the Kubernetes REST API over real HTTP (or HTTPS) on
127.0.0.1 for the official ``kubernetes`` Python client -- typed APIs, the dynamic
client, watches and pod logs -- to run against it without a cluster.  It keeps an
in-memory object store with server-side apply (simplified field ownership), validation,
watches, and a background "controller" that moves Deployment/StatefulSet/DaemonSet
rollouts and Jobs forward according to per-object scripts chosen by the test.

Standard library only (PyYAML is used for YAML request bodies when it is installed).
See docs/dev/kubefake.md for what it models and, as importantly, what it does not.

In-process use::

    with FakeKube() as fake:
        kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
        fake.script_rollout("default", "web", "deadline", delay=0.2)
        ...

As a separate process::

    python tests/kubefake.py --port 0 --kubeconfig /tmp/kc --ready-file /tmp/ready

then ``POST /_fake/script`` / ``POST /_fake/fault`` to steer it and SIGTERM to stop it.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import copy
import dataclasses
import hashlib
import heapq
import http.server
import io
import itertools
import json
import math
import re
import select
import signal
import socket
import ssl
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from typing import NamedTuple
from urllib.parse import parse_qsl
from urllib.parse import unquote
from urllib.parse import urlsplit

try:
    import yaml as _yaml
except ImportError:  # pragma: no cover - PyYAML comes with the kubernetes client
    _yaml = None

Obj = dict[str, Any]
# A field path: field names (str) and, for lists of objects merged by their "name",
# ("name", value) items.
PathT = tuple[Any, ...]
ObjKey = tuple[str, str, str, str]  # (group/version, plural, namespace or "", name)

LOOPBACK = "127.0.0.1"
FIELD_MANAGER_CONTROLLER = "kube-controller-manager"
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
ROLLOUT_MODES = ("success", "slow", "deadline", "stuck")
FAULT_MODES = ("401", "403", "404", "409", "429", "500", "503", "504", "hang", "drop")
_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
_MISSING: Any = object()
_EVENT_HISTORY = 10_000

KUBE_VERSION: Obj = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-kubefake",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}


# --------------------------------------------------------------------------- resource types


@dataclasses.dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ("status",)
    categories: tuple[str, ...] = ()

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def qualified(self) -> str:
        """``deployments.apps`` / ``pods``: how the apiserver names the resource in errors."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind


RESOURCE_TYPES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, short_names=("ns",)),
    ResourceType(
        "",
        "v1",
        "pods",
        "Pod",
        short_names=("po",),
        subresources=("log", "status"),
        categories=("all",),
    ),
    ResourceType("", "v1", "configmaps", "ConfigMap", short_names=("cm",), subresources=()),
    ResourceType("", "v1", "services", "Service", short_names=("svc",), categories=("all",)),
    ResourceType("", "v1", "secrets", "Secret", subresources=()),
    ResourceType(
        "", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",), subresources=()
    ),
    ResourceType(
        "apps", "v1", "deployments", "Deployment", short_names=("deploy",), categories=("all",)
    ),
    ResourceType(
        "apps", "v1", "statefulsets", "StatefulSet", short_names=("sts",), categories=("all",)
    ),
    ResourceType("apps", "v1", "daemonsets", "DaemonSet", short_names=("ds",), categories=("all",)),
    ResourceType(
        "apps", "v1", "replicasets", "ReplicaSet", short_names=("rs",), categories=("all",)
    ),
    ResourceType("batch", "v1", "jobs", "Job", categories=("all",)),
    ResourceType("networking.k8s.io", "v1", "ingresses", "Ingress", short_names=("ing",)),
)
_BY_PATH: dict[tuple[str, str], ResourceType] = {
    (rt.group_version, rt.plural): rt for rt in RESOURCE_TYPES
}
_BY_KIND: dict[str, ResourceType] = {rt.kind: rt for rt in RESOURCE_TYPES}
_GROUP_VERSIONS: dict[str, list[str]] = {}
for _rt in RESOURCE_TYPES:
    if _rt.group:
        _GROUP_VERSIONS.setdefault(_rt.group, [])
        if _rt.version not in _GROUP_VERSIONS[_rt.group]:
            _GROUP_VERSIONS[_rt.group].append(_rt.version)
_WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
_HAS_GENERATION = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "Ingress")
# Status of a new object before any controller acted: the apiserver always serialises the
# counters that are not ``omitempty`` in Go (and newer clients insist on them).
_INITIAL_STATUS: dict[str, Obj] = {
    "Namespace": {"phase": "Active"},
    "Pod": {"phase": "Pending", "qosClass": "BestEffort"},
    "Service": {"loadBalancer": {}},
    "Deployment": {},
    "StatefulSet": {"replicas": 0, "availableReplicas": 0},
    "DaemonSet": {
        "currentNumberScheduled": 0,
        "numberMisscheduled": 0,
        "desiredNumberScheduled": 0,
        "numberReady": 0,
    },
    "ReplicaSet": {"replicas": 0},
    "Job": {},
    "Ingress": {"loadBalancer": {}},
}
NAMESPACE_T = _BY_KIND["Namespace"]
POD_T = _BY_KIND["Pod"]
REPLICASET_T = _BY_KIND["ReplicaSet"]


def resource_type(kind_or_plural: str, api_version: str | None = None) -> ResourceType:
    """Look a known resource type up by kind (``Deployment``) or plural (``deployments``)."""
    for rt in RESOURCE_TYPES:
        if api_version is not None and rt.group_version != api_version:
            continue
        if kind_or_plural in (rt.kind, rt.plural):
            return rt
    raise KeyError(f"kubefake does not serve {kind_or_plural!r}")


# --------------------------------------------------------------------------- Status errors


def status_body(code: int, reason: str, message: str, details: Obj | None = None) -> Obj:
    """A ``Status`` object as the apiserver sends it for failures."""
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
    }
    if reason:  # a 500 from server-side apply's merge has none
        body["reason"] = reason
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


class ApiError(Exception):
    """Raised inside the server; answered with a ``Status`` body."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: Obj | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def body(self) -> Obj:
        return status_body(self.code, self.reason, self.message, self.details)


def _details(rt: ResourceType, name: str | None) -> Obj:
    details: Obj = {}
    if name:
        details["name"] = name
    if rt.group:
        details["group"] = rt.group
    details["kind"] = rt.plural
    return details


def _not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.qualified} "{name}" not found', _details(rt, name))


def _no_such_path() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _method_not_allowed() -> ApiError:
    return ApiError(
        405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
    )


def _already_exists(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        409, "AlreadyExists", f'{rt.qualified} "{name}" already exists', _details(rt, name)
    )


def _modified_conflict(rt: ResourceType, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        _details(rt, name),
    )


class Cause(NamedTuple):
    reason: str
    field: str
    message: str


def _gofmt(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _required(field: str, detail: str = "") -> Cause:
    return Cause("FieldValueRequired", field, "Required value" + (f": {detail}" if detail else ""))


def _invalid(field: str, value: Any, detail: str, shown: str | None = None) -> Cause:
    """``shown``: the value as Go prints it, when it is not a plain scalar (see ``_go_*``)."""
    shown = _gofmt(value) if shown is None else shown
    return Cause("FieldValueInvalid", field, f"Invalid value: {shown}: {detail}")


def _go_quote(value: Any) -> str:
    return json.dumps(str(value), ensure_ascii=False)


def _go_string_map(value: Any) -> str:
    """A ``map[string]string`` (labels) as Go's ``%#v`` prints it in field errors."""
    if not isinstance(value, dict):
        return "map[string]string(nil)"
    items = ", ".join(f"{_go_quote(k)}:{_go_quote(v)}" for k, v in sorted(value.items()))
    return f"map[string]string{{{items}}}"


def _go_label_selector(value: Any) -> str:
    """A ``LabelSelector`` as Go's ``%#v`` prints it; ``"null"`` when there is none."""
    if not isinstance(value, dict):
        return '"null"'
    labels = _go_string_map(value.get("matchLabels"))  # absent and null print alike
    exprs = value.get("matchExpressions")
    if isinstance(exprs, list):
        shown = []
        for expr in exprs:
            expr = _as_dict(expr)
            values = expr.get("values")
            listed = (
                "[]string{" + ", ".join(_go_quote(v) for v in values) + "}"
                if isinstance(values, list)
                else "[]string(nil)"
            )
            shown.append(
                f"v1.LabelSelectorRequirement{{Key:{_go_quote(expr.get('key', ''))}, "
                f"Operator:{_go_quote(expr.get('operator', ''))}, Values:{listed}}}"
            )
        requirements = "[]v1.LabelSelectorRequirement{" + ", ".join(shown) + "}"
    else:
        requirements = "[]v1.LabelSelectorRequirement(nil)"
    return f"v1.LabelSelector{{MatchLabels:{labels}, MatchExpressions:{requirements}}}"


def _unsupported(field: str, value: Any, supported: Iterable[str]) -> Cause:
    listed = ", ".join(json.dumps(s) for s in supported)
    return Cause(
        "FieldValueNotSupported",
        field,
        f"Unsupported value: {_gofmt(value)}: supported values: {listed}",
    )


def _invalid_error(kind: str, group: str, name: str, causes: list[Cause]) -> ApiError:
    qualified = f"{kind}.{group}" if group else kind
    errors = [f"{c.field}: {c.message}" for c in causes]
    summary = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
    details: Obj = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = kind
    details["causes"] = [
        {"reason": c.reason, "message": c.message, "field": c.field} for c in causes
    ]
    return ApiError(422, "Invalid", f'{qualified} "{name}" is invalid: {summary}', details)


# --------------------------------------------------------------------------- small helpers


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _iso_nanos(epoch: float) -> str:
    micros = round((epoch % 1) * 1_000_000) % 1_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(epoch)) + f"{micros:06d}000Z"


_SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def _safe_hash(data: str, length: int) -> str:
    """Stable name suffix from the alphabet Kubernetes uses for generated names."""
    digest = hashlib.sha256(data.encode()).digest()
    return "".join(_SAFE_ALPHABET[b % len(_SAFE_ALPHABET)] for b in digest[:length])


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _as_dict(value: Any) -> Obj:
    return value if isinstance(value, dict) else {}


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _parse_bool(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1")


def _omit_zero(status: Obj, *keys: str) -> Obj:
    """Drop zero counters like the apiserver's ``omitempty`` does."""
    for key in keys:
        if not status.get(key):
            status.pop(key, None)
    return status


def _owned_by(obj: Obj, uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in _as_list(obj["metadata"].get("ownerReferences")))


def _owner_ref(obj: Obj) -> Obj:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


# --------------------------------------------------------------------------- field paths


def _is_named_list(value: Any) -> bool:
    """Lists of objects keyed by a unique ``name`` are merged per item (containers, env...)."""
    if not isinstance(value, list) or not value:
        return False
    names = [item.get("name") if isinstance(item, dict) else None for item in value]
    return all(isinstance(n, str) for n in names) and len(set(names)) == len(names)


def _flatten(value: Any, prefix: PathT = ()) -> dict[PathT, Any]:
    if isinstance(value, dict):
        if not value:
            return {prefix: {}} if prefix else {}
        out: dict[PathT, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, (*prefix, key)))
        return out
    if _is_named_list(value):
        out = {}
        for item in value:
            out.update(_flatten(item, (*prefix, ("name", item["name"]))))
        return out
    return {prefix: copy.deepcopy(value)}


class _Items(dict[Any, Any]):
    """Marks a list under construction in ``_unflatten`` (name -> item)."""


def _unflatten(flat: dict[PathT, Any]) -> Obj:
    root: Obj = {}
    for path, value in flat.items():
        node: Any = root
        for index, element in enumerate(path):
            key = element[1] if isinstance(element, tuple) else element
            if index == len(path) - 1:
                if isinstance(value, dict) and not value:
                    if not isinstance(node.get(key), dict):
                        node[key] = {}
                else:
                    node[key] = copy.deepcopy(value)
                break
            want_items = isinstance(path[index + 1], tuple)
            child = node.get(key)
            if want_items and not isinstance(child, _Items):
                child = node[key] = _Items()
            elif not want_items and (not isinstance(child, dict) or isinstance(child, _Items)):
                child = node[key] = {}
            node = child
    result: Obj = _finish_items(root)
    return result


def _finish_items(value: Any) -> Any:
    if isinstance(value, _Items):
        return [_finish_items(item) for item in value.values()]
    if isinstance(value, dict):
        return {key: _finish_items(item) for key, item in value.items()}
    return value


def _duplicate_key(value: Any, prefix: PathT = ()) -> tuple[PathT, str] | None:
    """The first list of named objects with a name twice, and the name: server-side apply
    cannot merge such a list (the apiserver answers 500 before validating anything)."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = _duplicate_key(item, (*prefix, key))
            if found:
                return found
    elif (
        isinstance(value, list)
        and value
        and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in value)
    ):
        seen: set[str] = set()
        for item in value:
            if item["name"] in seen:
                return prefix, item["name"]
            seen.add(item["name"])
        for item in value:
            found = _duplicate_key(item, (*prefix, ("name", item["name"])))
            if found:
                return found
    return None


def path_string(path: PathT) -> str:
    """``.spec.template.spec.containers[name="web"].image``, as the apiserver prints paths."""
    out = []
    for element in path:
        if isinstance(element, tuple):
            out.append(f'[{element[0]}="{element[1]}"]')
        else:
            out.append(f".{element}")
    return "".join(out)


def _drop_overlaps(flat: dict[PathT, Any], path: PathT) -> None:
    """Remove entries that are ancestors or descendants of ``path`` (a type change)."""
    for existing in list(flat):
        if existing == path:
            continue
        shorter = min(len(existing), len(path))
        if existing[:shorter] == path[:shorter]:
            del flat[existing]


def _managed_view(obj: Obj) -> Obj:
    """The part of an object that field managers own: labels, annotations, spec, data..."""
    view: Obj = {}
    meta = _as_dict(obj.get("metadata"))
    owned_meta = {k: meta[k] for k in ("labels", "annotations") if meta.get(k)}
    if owned_meta:
        view["metadata"] = owned_meta
    for key, value in obj.items():
        if key not in ("apiVersion", "kind", "metadata", "status"):
            view[key] = value
    return view


def _compose(rt: ResourceType, base: Obj, view: Obj) -> Obj:
    """An object with ``base``'s system metadata and status and ``view``'s content."""
    obj: Obj = {"apiVersion": rt.group_version, "kind": rt.kind}
    meta = {k: v for k, v in base["metadata"].items() if k not in ("labels", "annotations")}
    view_meta = _as_dict(view.get("metadata"))
    for key in ("labels", "annotations"):
        if key in view_meta:
            meta[key] = view_meta[key]
    obj["metadata"] = meta
    for key, value in view.items():
        if key != "metadata":
            obj[key] = value
    if "status" in base:
        obj["status"] = base["status"]
    return obj


@dataclasses.dataclass
class _Manager:
    name: str
    operation: str  # "Apply" or "Update"
    api_version: str
    time: str
    paths: set[PathT]
    subresource: str = ""

    def label(self) -> str:
        text = json.dumps(self.name)
        if self.subresource:
            text += f" with subresource {json.dumps(self.subresource)}"
        if self.operation == "Update":
            text += f" using {self.api_version}"
        return text

    def signature(self) -> tuple[str, str, str, frozenset[PathT]]:
        return (self.name, self.operation, self.subresource, frozenset(self.paths))

    def render(self) -> Obj:
        fields: Obj = {}
        for path in sorted(self.paths, key=repr):
            node = fields
            for element in path:
                if isinstance(element, tuple):
                    key = "k:" + json.dumps({element[0]: element[1]}, separators=(",", ":"))
                else:
                    key = f"f:{element}"
                node = node.setdefault(key, {})
        entry: Obj = {
            "manager": self.name,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        }
        if self.subresource:
            entry["subresource"] = self.subresource
        return entry


def _conflict_error(conflicts: list[tuple[_Manager, PathT]]) -> ApiError:
    causes = [
        {
            "reason": "FieldManagerConflict",
            "message": f"conflict with {manager.label()}",
            "field": path_string(path),
        }
        for manager, path in conflicts
    ]
    if len(conflicts) == 1:
        manager, path = conflicts[0]
        message = f"Apply failed with 1 conflict: conflict with {manager.label()}: " + path_string(
            path
        )
    else:
        lines: list[str] = []
        by_manager: dict[str, list[str]] = {}
        for manager, path in conflicts:
            by_manager.setdefault(manager.label(), []).append(path_string(path))
        for label, paths in by_manager.items():
            lines.append(f"conflicts with {label}:")
            lines.extend(f"- {p}" for p in paths)
        message = f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)
    return ApiError(409, "Conflict", message, {"causes": causes})


def _merge_patch(target: Any, patch: Any, strategic: bool) -> Any:
    """RFC 7386 merge patch; ``strategic`` also merges lists of named objects by name."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if strategic and key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        elif strategic and _is_named_list(value) and _is_named_list(result.get(key)):
            merged = {item["name"]: item for item in result[key]}
            for item in value:
                if item.get("$patch") == "delete":
                    merged.pop(item["name"], None)
                else:
                    merged[item["name"]] = _merge_patch(merged.get(item["name"]), item, True)
            result[key] = list(merged.values())
        else:
            result[key] = _merge_patch(result.get(key), value, strategic)
    return result


# --------------------------------------------------------------------------- selectors

Matcher = Callable[[Obj], bool]

_SET_REQ = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_KEY = re.compile(r"^[A-Za-z0-9_./-]+$")


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _label_check(op: str, key: str, values: set[str]) -> Matcher:
    """One requirement on a labels mapping: ``in``/``notin``/``exists``/``!exists``."""

    def check(labels: Obj) -> bool:
        if op == "in":
            return labels.get(key) in values
        if op == "notin":
            return labels.get(key) not in values
        return (key in labels) == (op == "exists")

    return check


def parse_label_selector(text: str) -> Matcher:
    """Equality (``a=b``, ``a==b``, ``a!=b``), set (``a in (x,y)``, ``notin``) and existence."""
    checks: list[Matcher] = []
    for requirement in _split_selector(text):
        if match := _SET_REQ.match(requirement):
            values = {v.strip() for v in match.group(3).split(",") if v.strip()}
            checks.append(_label_check(match.group(2), match.group(1), values))
            continue
        for op in ("!=", "==", "="):
            if op in requirement:
                key, _, value = (s.strip() for s in requirement.partition(op))
                if not _KEY.match(key):
                    raise _bad_request(f"unable to parse requirement: {requirement}")
                checks.append(_label_check("notin" if op == "!=" else "in", key, {value}))
                break
        else:
            negate = requirement.startswith("!")
            key = requirement[1:].strip() if negate else requirement
            if not _KEY.match(key):
                raise _bad_request(f"unable to parse requirement: {requirement}")
            checks.append(_label_check("absent" if negate else "exists", key, set()))

    def matches(obj: Obj) -> bool:
        labels = _as_dict(obj.get("metadata", {}).get("labels"))
        return all(check(labels) for check in checks)

    return matches


def _lookup(obj: Obj, dotted: str) -> Any:
    node: Any = obj
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def parse_field_selector(text: str) -> Matcher:
    """``metadata.name=x,status.phase!=Running``: any dotted path, compared as strings."""
    checks: list[Matcher] = []
    for requirement in _split_selector(text):
        for op in ("!=", "==", "="):
            if op in requirement:
                path, _, value = (s.strip() for s in requirement.partition(op))
                negate = op == "!="

                def check(obj: Obj, p: str = path, v: str = value, n: bool = negate) -> bool:
                    found = _lookup(obj, p)
                    text = "" if found is None else str(found)
                    return (text != v) if n else (text == v)

                checks.append(check)
                break
        else:
            raise _bad_request(f"invalid selector: '{requirement}'; can't understand it")
    return lambda obj: all(check(obj) for check in checks)


# --------------------------------------------------------------------------- validation

_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_DNS1035_MSG = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
    "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)
_LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)


def _validate_name(rt: ResourceType, name: str) -> list[Cause]:
    if rt.kind == "Namespace":
        pattern, message, limit = _DNS1123_LABEL, _LABEL_MSG, 63
    elif rt.kind == "Service":
        pattern, message, limit = _DNS1035_LABEL, _DNS1035_MSG, 63
    else:
        pattern, message, limit = _DNS1123_SUBDOMAIN, _SUBDOMAIN_MSG, 253
    if not pattern.fullmatch(name):
        return [_invalid("metadata.name", name, message)]
    if len(name) > limit:
        return [_invalid("metadata.name", name, f"must be no more than {limit} characters")]
    return []


def _validate_labels(meta: Obj, path: str) -> list[Cause]:
    causes = []
    for key, value in _as_dict(meta.get("labels")).items():
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            causes.append(_invalid(f"{path}.labels", value, _LABEL_VALUE_MSG))
        elif not key:
            causes.append(_invalid(f"{path}.labels", key, "name part must be non-empty"))
    return causes


def _validate_pod_spec(spec: Any, path: str, restart_policies: tuple[str, ...]) -> list[Cause]:
    spec = _as_dict(spec)
    causes: list[Cause] = []
    containers = _as_list(spec.get("containers"))
    if not containers:
        causes.append(_required(f"{path}.containers"))
    seen: set[str] = set()
    for index, container in enumerate(containers):
        container = _as_dict(container)
        where = f"{path}.containers[{index}]"
        name = container.get("name")
        if not name:
            causes.append(_required(f"{where}.name"))
        elif not isinstance(name, str) or not _DNS1123_LABEL.fullmatch(name):
            causes.append(_invalid(f"{where}.name", name, _LABEL_MSG))
        elif name in seen:
            causes.append(
                Cause("FieldValueDuplicate", f"{where}.name", f'Duplicate value: "{name}"')
            )
        else:
            seen.add(name)
        if not container.get("image"):
            causes.append(_required(f"{where}.image"))
    policy = spec.get("restartPolicy", "Always")
    if policy not in restart_policies:
        causes.append(_unsupported(f"{path}.restartPolicy", policy, restart_policies))
    return causes


def _validate_workload(kind: str, spec: Obj, restart: tuple[str, ...]) -> list[Cause]:
    causes: list[Cause] = []
    replicas = spec.get("replicas")
    if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int)):
        causes.append(_invalid("spec.replicas", replicas, "must be an integer"))
    elif isinstance(replicas, int) and replicas < 0:
        causes.append(_invalid("spec.replicas", replicas, "must be greater than or equal to 0"))
    selector = spec.get("selector")
    template = spec.get("template")
    match_labels: Obj = {}
    if selector is None:
        causes.append(_required("spec.selector"))
    elif not isinstance(selector, dict) or not (
        selector.get("matchLabels") or selector.get("matchExpressions")
    ):
        causes.append(
            _invalid(
                "spec.selector",
                selector,
                f"empty selector is invalid for {kind}",
                _go_label_selector(selector),
            )
        )
    else:
        match_labels = _as_dict(selector.get("matchLabels"))
    template_meta = _as_dict(_as_dict(template).get("metadata"))
    template_labels = _as_dict(template_meta.get("labels"))
    # No selector matches nothing (the apiserver says both), an empty one everything.
    if selector is None or any(template_labels.get(k) != v for k, v in match_labels.items()):
        causes.append(
            _invalid(
                "spec.template.metadata.labels",
                template_meta.get("labels"),
                "`selector` does not match template `labels`",
                _go_string_map(template_meta.get("labels")),
            )
        )
    # The template's ObjectMeta is inline in the apiserver's field paths: spec.template.labels.
    causes += _validate_labels(template_meta, "spec.template")
    causes += _validate_pod_spec(_as_dict(template).get("spec"), "spec.template.spec", restart)
    return causes


def validate(rt: ResourceType, obj: Obj) -> list[Cause]:
    """Create/update validation: a useful subset of what the apiserver checks."""
    meta = obj["metadata"]
    causes = _validate_name(rt, meta["name"]) + _validate_labels(meta, "metadata")
    spec = _as_dict(obj.get("spec"))
    if rt.kind in ("Deployment", "ReplicaSet", "DaemonSet", "StatefulSet"):
        causes += _validate_workload(rt.kind.lower(), spec, ("Always",))
    elif rt.kind == "Job":
        causes += _validate_pod_spec(
            _as_dict(spec.get("template")).get("spec"),
            "spec.template.spec",
            ("OnFailure", "Never"),
        )
    elif rt.kind == "Pod":
        causes += _validate_pod_spec(spec, "spec", ("Always", "OnFailure", "Never"))
    elif (
        rt.kind == "Service"
        and spec.get("type", "ClusterIP") != "ExternalName"
        and not spec.get("ports")
        and spec.get("clusterIP") != "None"
    ):
        causes.append(_required("spec.ports"))
    return causes


def validate_update(rt: ResourceType, old: Obj, new: Obj) -> list[Cause]:
    """Immutable fields."""
    old_spec, new_spec = _as_dict(old.get("spec")), _as_dict(new.get("spec"))
    causes: list[Cause] = []
    immutable: tuple[str, ...] = ()
    if rt.kind in ("Deployment", "ReplicaSet", "DaemonSet", "StatefulSet"):
        immutable = ("selector",)
    elif rt.kind == "Job":
        immutable = ("selector", "template", "completions")
    for key in immutable:
        if old_spec.get(key) != new_spec.get(key):
            shown = _go_label_selector(new_spec.get(key)) if key == "selector" else None
            causes.append(_invalid(f"spec.{key}", new_spec.get(key), "field is immutable", shown))
    if rt.kind == "StatefulSet":
        mutable = (
            "replicas",
            "ordinals",
            "template",
            "updateStrategy",
            "persistentVolumeClaimRetentionPolicy",
            "minReadySeconds",
        )
        strip_old = {k: v for k, v in old_spec.items() if k not in mutable}
        strip_new = {k: v for k, v in new_spec.items() if k not in mutable}
        if strip_old != strip_new and not causes:
            causes.append(
                Cause(
                    "FieldValueForbidden",
                    "spec",
                    "Forbidden: updates to statefulset spec for fields other than 'replicas', "
                    "'ordinals', 'template', 'updateStrategy', "
                    "'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden",
                )
            )
    return causes


# --------------------------------------------------------------------------- defaulting


def _default_pod_spec(spec: Obj) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    for container in _as_list(spec.get("containers")):
        if not isinstance(container, dict):
            continue
        image = str(container.get("image") or "")
        tag = image.rsplit("/", 1)[-1]
        latest = ":" not in tag or tag.endswith(":latest")
        container.setdefault("resources", {})
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        container.setdefault(
            "imagePullPolicy", "Always" if latest and "@" not in tag else "IfNotPresent"
        )
        for port in _as_list(container.get("ports")):
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")


def _default_template(spec: Obj) -> None:
    template = spec.get("template")
    if isinstance(template, dict):
        template.setdefault("metadata", {})
        if isinstance(template.get("spec"), dict):
            _default_pod_spec(template["spec"])


def apply_defaults(rt: ResourceType, obj: Obj, cluster_ip: Callable[[], str]) -> None:
    """The defaults the apiserver fills in that clients commonly read back."""
    spec = obj.get("spec")
    if rt.kind == "Namespace":
        obj.setdefault("spec", {"finalizers": ["kubernetes"]})
        return
    if rt.kind == "Secret":
        obj.setdefault("type", "Opaque")
        string_data = obj.pop("stringData", None)
        if isinstance(string_data, dict):
            data = obj.setdefault("data", {})
            for key, value in string_data.items():
                data[key] = base64.b64encode(str(value).encode()).decode()
        return
    if not isinstance(spec, dict):
        return
    if rt.kind == "Deployment":
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        strategy = spec.setdefault("strategy", {})
        if isinstance(strategy, dict):
            strategy.setdefault("type", "RollingUpdate")
            if strategy["type"] == "RollingUpdate":
                rolling = strategy.setdefault("rollingUpdate", {})
                rolling.setdefault("maxUnavailable", "25%")
                rolling.setdefault("maxSurge", "25%")
        _default_template(spec)
    elif rt.kind == "StatefulSet":
        spec.setdefault("replicas", 1)
        spec.setdefault("podManagementPolicy", "OrderedReady")
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault(
            "updateStrategy", {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}
        )
        _default_template(spec)
    elif rt.kind == "DaemonSet":
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault(
            "updateStrategy",
            {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}},
        )
        _default_template(spec)
    elif rt.kind == "ReplicaSet":
        spec.setdefault("replicas", 1)
        _default_template(spec)
    elif rt.kind == "Job":
        spec.setdefault("parallelism", 1)
        spec.setdefault("completions", 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
        template = spec.get("template")
        if isinstance(template, dict) and isinstance(template.get("spec"), dict):
            template["spec"].setdefault("restartPolicy", "Always")
        _default_template(spec)
    elif rt.kind == "Pod":
        _default_pod_spec(spec)
    elif rt.kind == "Service":
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        if spec["type"] != "ExternalName":
            if "clusterIP" not in spec:
                spec["clusterIP"] = cluster_ip()
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
            spec.setdefault("internalTrafficPolicy", "Cluster")
        for port in _as_list(spec.get("ports")):
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                if "port" in port:
                    port.setdefault("targetPort", port["port"])


def _job_selector_defaults(job: Obj) -> None:
    """The selector and pod labels the Job controller generates (needs the uid)."""
    meta, spec = job["metadata"], job.get("spec")
    if not isinstance(spec, dict) or spec.get("manualSelector"):
        return
    uid, name = meta["uid"], meta["name"]
    spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
    template = spec.get("template")
    if isinstance(template, dict):
        template_meta = template.setdefault("metadata", {})
        labels = template_meta.setdefault("labels", {})
        if isinstance(labels, dict):
            labels.setdefault("batch.kubernetes.io/controller-uid", uid)
            labels.setdefault("batch.kubernetes.io/job-name", name)
            labels.setdefault("controller-uid", uid)
            labels.setdefault("job-name", name)


# --------------------------------------------------------------------------- scripts


@dataclasses.dataclass
class RolloutScript:
    """How the fake controller rolls a workload out (see ``FakeKube.script_rollout``)."""

    mode: str = "success"
    delay: float = 0.1
    pod_reason: str | None = None


@dataclasses.dataclass
class JobScript:
    """What a Job's pod prints and how it ends (see ``FakeKube.script_job``)."""

    logs: list[str] = dataclasses.field(default_factory=list)
    succeed: bool = True
    delay: float = 0.2
    exit_code: int | None = None
    start_delay: float | None = None


class RecordedRequest(NamedTuple):
    method: str
    path: str
    query: dict[str, str]
    content_type: str | None


@dataclasses.dataclass
class _Event:
    rv: int
    type: str
    gv: str
    plural: str
    namespace: str
    obj: Obj
    old: Obj | None


@dataclasses.dataclass
class _Route:
    rt: ResourceType
    namespace: str  # "" when the URL names none
    name: str | None
    sub: str | None

    def key(self) -> ObjKey:
        assert self.name is not None
        return (self.rt.group_version, self.rt.plural, self.namespace, self.name)


# --------------------------------------------------------------------------- the server


class FakeKube:
    """A loopback Kubernetes API server for tests; see the module docstring."""

    def __init__(
        self,
        *,
        token: str | None = "test-token",
        certfile: str | Path | None = None,
        keyfile: str | Path | None = None,
        ca_pem: bytes | str | None = None,
        namespaces: Iterable[str] = ("default", "kube-system", "kube-public"),
        nodes: int = 1,
        port: int = 0,
        rollout_delay: float = 0.1,
        job_delay: float = 0.2,
        user: str = "system:anonymous",
    ) -> None:
        self.token = token
        self.user = user
        self.rollout_delay = rollout_delay
        self.job_delay = job_delay
        self.node_names = [f"fake-node-{i + 1}" for i in range(max(nodes, 1))]
        self.requests: list[RecordedRequest] = []
        self.server_errors: list[str] = []
        self.fault_path_prefix: str | None = None
        self.fault_times: int | None = None
        self._fault: str | None = None
        self._port = port
        self._certfile = certfile
        self._keyfile = keyfile
        self._ca_pem = ca_pem.encode() if isinstance(ca_pem, str) else ca_pem
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._objects: dict[ObjKey, Obj] = {}
        self._managers: dict[ObjKey, list[_Manager]] = {}
        self._rv = 0
        self._events: list[_Event] = []
        self._event_rvs: list[int] = []
        self._events_floor = 0
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._ip_counter = itertools.count(10)
        self._rollout_scripts: dict[tuple[str, str], RolloutScript] = {}
        self._job_scripts: dict[tuple[str, str], JobScript] = {}
        self._logs: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
        self._pod_states: dict[tuple[str, str], str] = {}
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        for namespace in namespaces:
            self.add_namespace(namespace)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeKube:
        if self._server is not None:
            raise RuntimeError("FakeKube already started")
        context = None
        if self._certfile is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(
                str(self._certfile), None if self._keyfile is None else str(self._keyfile)
            )
        self._stopping.clear()
        self._server = _Server(self, (LOOPBACK, self._port), context)
        serve = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="kubefake-server",
            daemon=True,
        )
        controller = threading.Thread(
            target=self._controller_loop, name="kubefake-controller", daemon=True
        )
        self._threads = [serve, controller]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        server = self._server
        if server is None:
            return
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        server.shutdown()
        server.close_connections()
        for thread in self._threads:
            thread.join(timeout=5)
        server.join_connections(timeout=5)
        server.server_close()
        self._server = None
        self._threads = []

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeKube is not started")
        return int(self._server.server_address[1])

    @property
    def scheme(self) -> str:
        return "https" if self._certfile is not None else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}"

    def write_kubeconfig(
        self,
        path: str | Path,
        namespace: str = "default",
        token: str | None = None,
        context: str = "fake",
    ) -> Path:
        """Write a kubeconfig for this server (JSON, which is YAML) and return its path.

        ``token`` defaults to the server's own token; pass ``""`` for a user without one.
        """
        token = self.token if token is None else token
        cluster: Obj = {"server": self.url}
        if self._ca_pem is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self._ca_pem).decode()
        user: Obj = {"token": token} if token else {}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [{"name": context, "cluster": cluster}],
            "users": [{"name": context, "user": user}],
            "contexts": [
                {
                    "name": context,
                    "context": {"cluster": context, "user": context, "namespace": namespace},
                }
            ],
            "current-context": context,
        }
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(config, indent=2) + "\n")
        return target

    # -- test controls -----------------------------------------------------------------

    @property
    def fault(self) -> str | None:
        return self._fault

    @fault.setter
    def fault(self, mode: str | None) -> None:
        """Assigning applies the fault to every path, for ever; see ``set_fault``."""
        if mode is not None and str(mode) not in FAULT_MODES:
            raise ValueError(f"unknown fault {mode!r}; choose from {FAULT_MODES}")
        with self._lock:
            self._fault = None if mode is None else str(mode)
            self.fault_path_prefix = None
            self.fault_times = None

    def set_fault(
        self, mode: str | None, *, path_prefix: str | None = None, times: int | None = None
    ) -> None:
        """Fail requests: ``"401"``/``"403"``/... answer that Status, ``"hang"`` never
        answers (until ``stop()`` or the client goes away), ``"drop"`` closes the connection.

        ``path_prefix`` limits the fault to matching paths, ``times`` to that many requests.
        """
        with self._lock:
            self.fault = mode
            self.fault_path_prefix = path_prefix
            self.fault_times = times

    def script_rollout(
        self,
        namespace: str,
        name: str,
        mode: str = "success",
        delay: float | None = None,
        *,
        pod_reason: str | None = None,
    ) -> None:
        """Choose how rollouts of the workload ``namespace/name`` go from now on.

        ``success``: complete ``delay`` seconds after the spec change; ``slow``: pods become
        ready one by one over ``delay``; ``deadline``: Progressing=False with reason
        ProgressDeadlineExceeded after ``delay``; ``stuck``: observed, pods never ready.
        ``pod_reason`` is the waiting reason of pods that are not ready (default
        ContainerCreating), e.g. ``"ImagePullBackOff"``.
        """
        if mode not in ROLLOUT_MODES:
            raise ValueError(f"unknown rollout mode {mode!r}; choose from {ROLLOUT_MODES}")
        with self._lock:
            self._rollout_scripts[(namespace, name)] = RolloutScript(
                mode, self.rollout_delay if delay is None else float(delay), pod_reason
            )

    def script_job(
        self,
        namespace: str,
        name: str,
        logs: Iterable[str] = (),
        succeed: bool = True,
        delay: float | None = None,
        *,
        exit_code: int | None = None,
        start_delay: float | None = None,
    ) -> None:
        """Choose what runs of Job ``namespace/name`` print and how they end.

        The pod is Pending (its log answers 400 "waiting to start") for ``start_delay``
        seconds (default ``min(0.05, delay / 4)``), then Running while ``logs`` appear one by
        one, and ``delay`` seconds after creation it Succeeded or Failed (``exit_code``,
        default 1 on failure) and the Job is Complete or Failed (BackoffLimitExceeded).
        """
        with self._lock:
            self._job_scripts[(namespace, name)] = JobScript(
                [str(line) for line in logs],
                succeed,
                self.job_delay if delay is None else float(delay),
                exit_code,
                start_delay,
            )

    def add_namespace(self, name: str) -> None:
        with self._lock:
            key: ObjKey = ("v1", "namespaces", "", name)
            if key not in self._objects:
                obj: Obj = {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"},
                }
                self._internal_create(NAMESPACE_T, obj)

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        """A copy of a stored object (``kind`` or plural), or None."""
        rt = resource_type(kind)
        with self._lock:
            obj = self._objects.get((rt.group_version, rt.plural, namespace, name))
            return copy.deepcopy(obj)

    def list_objects(
        self, kind: str, namespace: str | None = None, label_selector: str = ""
    ) -> list[Obj]:
        """Copies of stored objects of ``kind`` (all namespaces unless one is given)."""
        rt = resource_type(kind)
        with self._lock:
            return copy.deepcopy(
                self._list(rt, namespace or "", parse_label_selector(label_selector), None)
            )

    def apply(self, body: Obj, field_manager: str = "kubectl", *, force: bool = False) -> Obj:
        """Server-side apply ``body`` as ``field_manager`` (to seed state for a test)."""
        rt = resource_type(body["kind"], body.get("apiVersion"))
        meta = _as_dict(body.get("metadata"))
        namespace = meta.get("namespace", "default") if rt.namespaced else ""
        with self._lock:
            obj, _ = self._server_side_apply(
                rt, namespace, meta["name"], copy.deepcopy(body), field_manager, force, False
            )
            return copy.deepcopy(obj)

    def requests_to(self, path_prefix: str, method: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [
                r
                for r in self.requests
                if r.path.startswith(path_prefix) and (method is None or r.method == method)
            ]

    # -- store internals (call with the lock held) ------------------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _cluster_ip(self) -> str:
        n = next(self._ip_counter)
        return f"10.96.{n // 250}.{n % 250 + 1}"

    def _emit(self, event_type: str, rt: ResourceType, obj: Obj, old: Obj | None) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        event = _Event(
            rv,
            event_type,
            rt.group_version,
            rt.plural,
            obj["metadata"].get("namespace", ""),
            copy.deepcopy(obj),
            copy.deepcopy(old) if old is not None else None,
        )
        self._events.append(event)
        self._event_rvs.append(rv)
        if len(self._events) > _EVENT_HISTORY:
            drop = len(self._events) - _EVENT_HISTORY
            self._events_floor = self._events[drop - 1].rv
            del self._events[:drop]
            del self._event_rvs[:drop]
        self._cond.notify_all()

    def _key(self, rt: ResourceType, obj: Obj) -> ObjKey:
        meta = obj["metadata"]
        return (rt.group_version, rt.plural, meta.get("namespace", ""), meta["name"])

    @staticmethod
    def _order_meta(meta: Obj) -> Obj:
        order = (
            "name",
            "generateName",
            "namespace",
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "deletionTimestamp",
            "labels",
            "annotations",
            "ownerReferences",
            "finalizers",
            "managedFields",
        )
        ordered = {k: meta[k] for k in order if k in meta}
        ordered.update({k: v for k, v in meta.items() if k not in ordered})
        return ordered

    def _internal_create(self, rt: ResourceType, obj: Obj) -> Obj:
        meta = obj["metadata"]
        if rt.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        if rt.kind in _HAS_GENERATION:
            meta["generation"] = 1
        meta["resourceVersion"] = str(self._next_rv())
        obj["metadata"] = self._order_meta(meta)
        self._objects[self._key(rt, obj)] = obj
        self._emit("ADDED", rt, obj, None)
        return obj

    def _internal_update(self, rt: ResourceType, obj: Obj) -> Obj:
        key = self._key(rt, obj)
        old = self._objects.get(key)
        if old is None:
            return obj
        new_meta = dict(obj["metadata"])
        new_meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if {**obj, "metadata": new_meta} == old:
            return old
        new_meta["resourceVersion"] = str(self._next_rv())
        obj["metadata"] = self._order_meta(new_meta)
        self._objects[key] = obj
        self._emit("MODIFIED", rt, obj, old)
        return obj

    def _delete_object(self, rt: ResourceType, key: ObjKey, policy: str) -> Obj:
        obj = self._objects.pop(key)
        self._managers.pop(key, None)
        obj["metadata"]["resourceVersion"] = str(self._next_rv())
        self._emit("DELETED", rt, obj, None)
        uid = obj["metadata"]["uid"]
        if rt.kind == "Pod":
            self._logs.pop((key[2], key[3]), None)
            self._pod_states.pop((key[2], key[3]), None)
        dependents = [(k, o) for k, o in list(self._objects.items()) if _owned_by(o, uid)]
        for dep_key, dep in dependents:
            dep_rt = _BY_PATH[(dep_key[0], dep_key[1])]
            if dep_key not in self._objects:
                continue
            if policy == "Orphan":
                updated = copy.deepcopy(dep)
                refs = [
                    r for r in updated["metadata"].get("ownerReferences", []) if r.get("uid") != uid
                ]
                if refs:
                    updated["metadata"]["ownerReferences"] = refs
                else:
                    updated["metadata"].pop("ownerReferences", None)
                self._internal_update(dep_rt, updated)
            else:
                self._delete_object(dep_rt, dep_key, "Background")
        if rt.kind == "Namespace":
            for other_key in [k for k in self._objects if k[2] == key[3]]:
                if other_key in self._objects:
                    self._delete_object(
                        _BY_PATH[(other_key[0], other_key[1])], other_key, "Background"
                    )
        return obj

    def _list(
        self, rt: ResourceType, namespace: str, labels: Matcher | None, fields: Matcher | None
    ) -> list[Obj]:
        items = [
            obj
            for (gv, plural, ns, _), obj in self._objects.items()
            if gv == rt.group_version
            and plural == rt.plural
            and (not namespace or ns == namespace)
            and (labels is None or labels(obj))
            and (fields is None or fields(obj))
        ]
        items.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return items

    def _require_namespace(self, rt: ResourceType, namespace: str) -> None:
        if rt.namespaced and ("v1", "namespaces", "", namespace) not in self._objects:
            raise _not_found(NAMESPACE_T, namespace)

    def _check_identity(self, rt: ResourceType, namespace: str, name: str | None, body: Any) -> Obj:
        if not isinstance(body, dict):
            raise _bad_request(f"the object provided is unrecognized (must be of type {rt.kind})")
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if kind is not None and kind != rt.kind:
            raise _bad_request(
                f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
            )
        if api_version is not None and api_version != rt.group_version:
            raise _bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({rt.group_version})"
            )
        meta = body.get("metadata")
        if meta is None:
            meta = body["metadata"] = {}
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        if name is not None and meta.get("name") not in (None, name):
            raise _bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                f"({name})"
            )
        if rt.namespaced and meta.get("namespace") not in (None, "", namespace):
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on the "
                "request"
            )
        return meta

    # -- writes through the API ---------------------------------------------------------

    def _finish_write(
        self,
        rt: ResourceType,
        key: ObjKey,
        old: Obj | None,
        new: Obj,
        managers: list[_Manager],
        dry_run: bool,
        *,
        write_only: bool = False,
    ) -> Obj:
        """Validate, record ownership and store ``new``; returns what the client gets back.

        ``write_only``: the write applied a Secret's ``stringData``, which is folded into
        ``data`` and never stored, so it is a change every time (as on the apiserver)."""
        name = key[3]
        causes = validate(rt, new)
        if old is not None:  # the apiserver reports both: the object's errors, then the update's
            causes += validate_update(rt, old, new)
        if causes:
            raise _invalid_error(rt.kind, rt.group, name, causes)
        flat = _flatten(_managed_view(new))
        for manager in managers:
            # A Secret's stringData stays in its managers' fields although it is not stored.
            kept = {p for p in manager.paths if rt.kind == "Secret" and p[:1] == ("stringData",)}
            manager.paths &= flat.keys() | kept
        managers = [m for m in managers if m.paths]
        meta = new["metadata"]
        if old is not None:
            old_signature = [m.signature() for m in self._managers.get(key, [])]
            same_object = {**new, "metadata": {**meta, "managedFields": None}} == {
                **old,
                "metadata": {**old["metadata"], "managedFields": None},
            }
            if (
                same_object
                and old_signature == [m.signature() for m in managers]
                and not write_only
            ):
                return copy.deepcopy(old)
            if rt.kind in _HAS_GENERATION and old.get("spec") != new.get("spec"):
                meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        meta["managedFields"] = [m.render() for m in managers]
        if not meta["managedFields"]:
            del meta["managedFields"]
        if dry_run:
            new["metadata"] = self._order_meta(meta)
            return copy.deepcopy(new)
        if old is None:
            stored = self._internal_create(rt, new)
        else:
            meta["resourceVersion"] = str(self._next_rv())
            new["metadata"] = self._order_meta(meta)
            self._objects[key] = new
            self._emit("MODIFIED", rt, new, old)
            stored = new
        self._managers[key] = managers
        self._after_write(rt, old, stored)
        return copy.deepcopy(stored)

    def _new_object(self, rt: ResourceType, namespace: str, name: str, body: Obj) -> Obj:
        meta = _as_dict(body.get("metadata"))
        base_meta: Obj = {"name": name}
        if rt.namespaced:
            base_meta["namespace"] = namespace
        for key in ("generateName", "ownerReferences", "finalizers"):
            if key in meta:
                base_meta[key] = meta[key]
        base_meta["uid"] = str(uuid.uuid4())
        base_meta["creationTimestamp"] = _now()
        base = {"metadata": base_meta}
        if rt.kind in _INITIAL_STATUS:
            base["status"] = copy.deepcopy(_INITIAL_STATUS[rt.kind])
        return _compose(rt, base, _managed_view(body))

    def _server_side_apply(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        body: Any,
        manager: str,
        force: bool,
        dry_run: bool,
    ) -> tuple[Obj, bool]:
        meta = self._check_identity(rt, namespace, name, body)
        if not body.get("apiVersion") or not body.get("kind"):
            raise _bad_request("apiVersion and kind must be set in an apply configuration")
        if meta.get("managedFields"):
            raise _bad_request("metadata.managedFields must be nil")
        applied = _managed_view(body)
        duplicate = _duplicate_key(applied)
        if duplicate:
            raise ApiError(
                500,
                "",
                f"failed to create typed patch object: {path_string(duplicate[0])}: duplicate "
                f'entries for key [name="{duplicate[1]}"]',
            )
        applied_flat = _flatten(applied)
        key: ObjKey = (rt.group_version, rt.plural, namespace, name)
        current = self._objects.get(key)
        stamp = _now()
        if current is None:
            self._require_namespace(rt, namespace)
            obj = self._new_object(rt, namespace, name, body)
            self._prepare(rt, obj)
            owner = _Manager(manager, "Apply", rt.group_version, stamp, set(applied_flat))
            return self._finish_write(rt, key, None, obj, [owner], dry_run), True
        if meta.get("resourceVersion") not in (None, "", current["metadata"]["resourceVersion"]):
            raise _modified_conflict(rt, name)
        managers = [dataclasses.replace(m, paths=set(m.paths)) for m in self._managers.get(key, [])]
        if not managers:
            # An object nobody manages (its managers owned nothing, or it was made inside the
            # server): the apiserver first gives what it has to an Update manager of its own.
            managers = self._record_update([], "before-first-apply", rt, None, current)
        mine = next(
            (
                m
                for m in managers
                if m.name == manager and m.operation == "Apply" and not m.subresource
            ),
            None,
        )
        others = [m for m in managers if m is not mine]
        current_flat = _flatten(_managed_view(current))
        new_flat = dict(current_flat)
        if mine is not None:
            shared: set[PathT] = set().union(*(m.paths for m in others)) if others else set()
            for path in mine.paths - applied_flat.keys() - shared:
                new_flat.pop(path, None)
        for path, value in applied_flat.items():
            _drop_overlaps(new_flat, path)
            new_flat[path] = value
        new = _compose(rt, current, _unflatten(new_flat))
        self._prepare(rt, new)
        result_flat = _flatten(_managed_view(new))
        conflicts = [
            (other, path)
            for path in applied_flat
            for other in others
            if path in other.paths
            and result_flat.get(path, _MISSING) != current_flat.get(path, _MISSING)
        ]
        if conflicts and not force:
            raise _conflict_error(conflicts)
        for other, path in conflicts:
            other.paths.discard(path)
        if mine is None:
            mine = _Manager(manager, "Apply", rt.group_version, stamp, set())
            managers.append(mine)
        mine.paths = set(applied_flat)
        mine.time = stamp
        write_only = rt.kind == "Secret" and any(p[:1] == ("stringData",) for p in applied_flat)
        return self._finish_write(
            rt, key, current, new, managers, dry_run, write_only=write_only
        ), False

    def _prepare(self, rt: ResourceType, obj: Obj) -> None:
        apply_defaults(rt, obj, self._cluster_ip)
        if rt.kind == "Job":
            _job_selector_defaults(obj)

    def _record_update(
        self,
        managers: list[_Manager],
        manager: str,
        rt: ResourceType,
        old: Obj | None,
        new: Obj,
        subresource: str = "",
    ) -> list[_Manager]:
        managers = [dataclasses.replace(m, paths=set(m.paths)) for m in managers]
        old_flat = _flatten(_managed_view(old)) if old is not None else {}
        new_flat = _flatten(_managed_view(new))
        changed = {p for p, v in new_flat.items() if old_flat.get(p, _MISSING) != v}
        if not changed:
            return managers
        entry = next(
            (
                m
                for m in managers
                if m.name == manager and m.operation == "Update" and m.subresource == subresource
            ),
            None,
        )
        for other in managers:
            if other is not entry:
                other.paths -= changed
        if entry is None:
            entry = _Manager(manager, "Update", rt.group_version, _now(), set(), subresource)
            managers.append(entry)
        entry.paths |= changed
        entry.time = _now()
        return managers

    def _create(
        self, rt: ResourceType, namespace: str, body: Any, manager: str, dry_run: bool
    ) -> Obj:
        meta = self._check_identity(rt, namespace, None, body)
        name = meta.get("name")
        if not name:
            prefix = meta.get("generateName")
            if not prefix:
                raise _invalid_error(
                    rt.kind,
                    rt.group,
                    "",
                    [_required("metadata.name", "name or generateName is required")],
                )
            name = f"{prefix}{_safe_hash(str(uuid.uuid4()), 5)}"
        key: ObjKey = (rt.group_version, rt.plural, namespace, name)
        if key in self._objects:
            raise _already_exists(rt, name)
        self._require_namespace(rt, namespace)
        obj = self._new_object(rt, namespace, name, body)
        self._prepare(rt, obj)
        managers = self._record_update([], manager, rt, None, obj)
        return self._finish_write(rt, key, None, obj, managers, dry_run)

    def _replace_content(
        self, rt: ResourceType, current: Obj, incoming: Obj, sub: str | None
    ) -> Obj:
        if sub == "status":
            new = copy.deepcopy(current)
            new["status"] = copy.deepcopy(incoming.get("status", {}))
            return new
        new = _compose(rt, current, _managed_view(incoming))
        meta = new["metadata"]
        incoming_meta = _as_dict(incoming.get("metadata"))
        for key in ("ownerReferences", "finalizers"):
            if key in incoming_meta:
                meta[key] = incoming_meta[key]
            else:
                meta.pop(key, None)
        return new

    def _update(
        self,
        route: _Route,
        body: Any,
        manager: str,
        dry_run: bool,
        patch: Callable[[Obj], Any] | None = None,
    ) -> Obj:
        rt, key = route.rt, route.key()
        current = self._objects.get(key)
        if current is None:
            raise _not_found(rt, key[3])
        if patch is not None:
            body = patch(copy.deepcopy(current))
        meta = self._check_identity(rt, route.namespace, route.name, body)
        if meta.get("resourceVersion") not in (None, "", current["metadata"]["resourceVersion"]):
            raise _modified_conflict(rt, key[3])
        new = self._replace_content(rt, current, body, route.sub)
        self._prepare(rt, new)
        managers = self._record_update(
            self._managers.get(key, []), manager, rt, current, new, route.sub or ""
        )
        return self._finish_write(rt, key, current, new, managers, dry_run)

    def _delete(self, route: _Route, policy: str | None, dry_run: bool) -> Obj:
        rt, key = route.rt, route.key()
        current = self._objects.get(key)
        if current is None:
            raise _not_found(rt, key[3])
        if policy is None:
            policy = "Orphan" if rt.kind == "Job" else "Background"
        if policy not in ("Orphan", "Background", "Foreground"):
            raise _invalid_error(
                "DeleteOptions",
                "meta.k8s.io",
                "",
                [_unsupported("propagationPolicy", policy, ("Foreground", "Background", "Orphan"))],
            )
        if dry_run:
            return copy.deepcopy(current)
        return copy.deepcopy(self._delete_object(rt, key, policy))

    def _after_write(self, rt: ResourceType, old: Obj | None, obj: Obj) -> None:
        meta = obj["metadata"]
        changed_generation = old is None or old["metadata"].get("generation") != meta.get(
            "generation"
        )
        if rt.kind in _WORKLOADS and changed_generation:
            self._start_rollout(rt, obj)
        elif rt.kind == "Job" and old is None:
            self._start_job(obj)
        elif rt.kind == "Pod" and old is None:
            ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
            self._pod_states[(ns, name)] = "pending"
            self._schedule(self.rollout_delay, lambda: self._bare_pod_ready(ns, name, uid))

    # -- the controller -----------------------------------------------------------------

    def _schedule(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + max(delay, 0.0), next(self._seq), action))
        self._cond.notify_all()

    def _controller_loop(self) -> None:
        while not self._stopping.is_set():
            with self._cond:
                now = time.monotonic()
                due: list[Callable[[], None]] = []
                while self._timers and self._timers[0][0] <= now:
                    due.append(heapq.heappop(self._timers)[2])
                if not due:
                    wait = self._timers[0][0] - now if self._timers else 0.5
                    self._cond.wait(timeout=min(max(wait, 0.001), 0.5))
                    continue
                for action in due:
                    try:
                        action()
                    except Exception:
                        self.server_errors.append(traceback.format_exc())

    def _pod_status(self, pod: Obj, state: str, reason: str | None, exit_code: int = 0) -> Obj:
        now = _now()
        if state == "unschedulable":  # what the scheduler writes: no node, no containers
            nodes = len(self.node_names)
            return {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "lastProbeTime": None,
                        "lastTransitionTime": now,
                        "reason": "Unschedulable",
                        "message": f"0/{nodes} nodes are available: {nodes} node(s) didn't "
                        "match Pod's node affinity.",
                    }
                ],
                "qosClass": "BestEffort",
            }
        previous = _as_dict(pod.get("status"))
        spec = pod["spec"]
        containers = [c for c in _as_list(spec.get("containers")) if isinstance(c, dict)]
        started = previous.get("startTime", now)
        ready = state in ("ready", "running")
        status: Obj = {"phase": "Pending"}
        if state in ("ready", "running"):
            status["phase"] = "Running"
        elif state == "succeeded":
            status["phase"] = "Succeeded"
        elif state == "failed":
            status["phase"] = "Failed"
        elif state == "waiting" and reason in ("CrashLoopBackOff", "RunContainerError", "Error"):
            status["phase"] = "Running"
        names = " ".join(str(c.get("name")) for c in containers)
        not_ready_reason = {"succeeded": "PodCompleted", "failed": "PodFailed"}.get(
            state, "ContainersNotReady"
        )

        def condition(kind: str, ok: bool) -> Obj:
            cond: Obj = {
                "type": kind,
                "status": "True" if ok else "False",
                "lastProbeTime": None,
                "lastTransitionTime": now,
            }
            if not ok:
                cond["reason"] = not_ready_reason
                if not_ready_reason == "ContainersNotReady":
                    cond["message"] = f"containers with unready status: [{names}]"
            return cond

        status["conditions"] = [
            condition("PodReadyToStartContainers", state != "pending"),
            condition("Initialized", True),
            condition("Ready", ready),
            condition("ContainersReady", ready),
            condition("PodScheduled", True),
        ]
        status["hostIP"] = "192.0.2.1"
        status["podIP"] = previous.get("podIP") or f"10.244.0.{next(self._ip_counter) % 250 + 2}"
        status["startTime"] = started
        statuses = []
        for container in containers:
            cstate: Obj
            if state in ("ready", "running"):
                cstate = {"running": {"startedAt": now}}
            elif state in ("succeeded", "failed"):
                code = exit_code if state == "failed" else 0
                cstate = {
                    "terminated": {
                        "exitCode": code,
                        "reason": "Completed" if state == "succeeded" else "Error",
                        "startedAt": started,
                        "finishedAt": now,
                        "containerID": f"containerd://{_safe_hash(pod['metadata']['uid'], 12)}",
                    }
                }
            else:
                cstate = {"waiting": {"reason": reason or "ContainerCreating"}}
            entry: Obj = {
                "name": container.get("name"),
                "image": container.get("image"),
                "imageID": "" if "waiting" in cstate else f"{container.get('image')}@sha256:0",
                "ready": ready,
                "restartCount": 3 if reason == "CrashLoopBackOff" else 0,
                "started": state in ("ready", "running"),
                "state": cstate,
            }
            if "waiting" not in cstate:
                entry["containerID"] = f"containerd://{_safe_hash(pod['metadata']['uid'], 12)}"
            statuses.append(entry)
        status["containerStatuses"] = statuses
        status["qosClass"] = "BestEffort"
        return status

    def _ensure_pod(
        self,
        namespace: str,
        name: str,
        labels: Obj,
        owner: Obj,
        template: Obj,
        node: str | None,
        state: str,
        reason: str | None,
    ) -> Obj:
        """Create or update a pod; ``node`` None: it fits no node (see ``nodes_for``)."""
        key: ObjKey = ("v1", "pods", namespace, name)
        pod = self._objects.get(key)
        if node is None:
            state = "unschedulable"
        elif state == "waiting" and self._pod_states.get((namespace, name)) == "ready":
            state = "ready"  # a pod of the current revision that is ready stays ready
        if pod is None:
            spec = copy.deepcopy(_as_dict(template.get("spec")))
            if node is not None:
                spec["nodeName"] = node
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "generateName": name.rsplit("-", 1)[0] + "-",
                    "namespace": namespace,
                    "uid": str(uuid.uuid4()),
                    "labels": dict(labels),
                    "ownerReferences": [_owner_ref(owner)],
                },
                "spec": spec,
            }
            annotations = _as_dict(_as_dict(template.get("metadata")).get("annotations"))
            if annotations:
                pod["metadata"]["annotations"] = dict(annotations)
            pod["status"] = self._pod_status(pod, state, reason)
            self._pod_states[(namespace, name)] = state
            return self._internal_create(POD_T, pod)
        return self._set_pod_state(pod, state, reason)

    def _set_pod_state(self, pod: Obj, state: str, reason: str | None, exit_code: int = 0) -> Obj:
        meta = pod["metadata"]
        if self._pod_states.get((meta["namespace"], meta["name"])) == state:
            return pod
        self._pod_states[(meta["namespace"], meta["name"])] = state
        updated = copy.deepcopy(pod)
        updated["status"] = self._pod_status(pod, state, reason, exit_code)
        return self._internal_update(POD_T, updated)

    def _pods_of(self, namespace: str, uid: str) -> list[Obj]:
        return [
            obj
            for (_, plural, ns, _), obj in self._objects.items()
            if plural == "pods" and ns == namespace and _owned_by(obj, uid)
        ]

    def _pod_ready(self, pod: Obj) -> bool:
        meta = pod["metadata"]
        return self._pod_states.get((meta["namespace"], meta["name"])) in ("ready", "running")

    def _delete_pods(self, pods: Iterable[Obj]) -> None:
        for pod in pods:
            key: ObjKey = ("v1", "pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
            if key in self._objects:
                self._delete_object(POD_T, key, "Background")

    def node_labels(self, node: str) -> Obj:
        """The labels of a fake node (nodes are not served, but pods select them)."""
        return {"kubernetes.io/hostname": node, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64"}  # fmt: skip

    def nodes_for(self, template: Obj) -> list[str]:
        """The fake nodes that pods of ``template`` fit: those its ``nodeSelector`` matches."""
        selector = _as_dict(_as_dict(_as_dict(template).get("spec")).get("nodeSelector"))
        return [
            node
            for node in self.node_names
            if all(self.node_labels(node).get(k) == v for k, v in selector.items())
        ]

    def _desired(self, rt: ResourceType, obj: Obj) -> int:
        if rt.kind == "DaemonSet":
            return len(self.nodes_for(_as_dict(_as_dict(obj.get("spec")).get("template"))))
        replicas = _as_dict(obj.get("spec")).get("replicas", 1)
        return replicas if isinstance(replicas, int) else 1

    def _bare_pod_ready(self, namespace: str, name: str, uid: str) -> None:
        pod = self._objects.get(("v1", "pods", namespace, name))
        if pod is not None and pod["metadata"]["uid"] == uid:
            self._set_pod_state(pod, "ready", None)

    def _start_rollout(self, rt: ResourceType, obj: Obj) -> None:
        meta = obj["metadata"]
        namespace, name, uid, generation = (
            meta["namespace"],
            meta["name"],
            meta["uid"],
            meta.get("generation", 1),
        )
        script = self._rollout_scripts.get((namespace, name)) or RolloutScript(
            delay=self.rollout_delay
        )
        replicas = self._desired(rt, obj)

        def at(delay: float, phase: str, ready: int = 0) -> None:
            self._schedule(
                delay,
                lambda: self._sync_workload(
                    rt, namespace, name, uid, generation, phase, ready, script.pod_reason
                ),
            )

        at(0.0, "observe")
        spec = _as_dict(obj.get("spec"))
        if rt.kind != "DaemonSet" and not self.nodes_for(_as_dict(spec.get("template"))):
            # Its pods fit no node: they stay Pending whatever the script says, and a
            # Deployment times out after its own progressDeadlineSeconds, as on a cluster.
            at(min(0.05, self.rollout_delay), "progress")
            deadline = spec.get("progressDeadlineSeconds")
            if rt.kind == "Deployment" and isinstance(deadline, int):
                at(float(deadline), "deadline")
            return
        if script.mode == "success":
            at(script.delay, "complete")
        elif script.mode == "slow":
            steps = max(replicas, 2)
            for step in range(1, steps):
                at(script.delay * step / steps, "progress", replicas * step // steps)
            at(script.delay, "complete")
        elif script.mode == "deadline":
            # The controller's next sync sees the pods it made: Progressing ReplicaSetUpdated.
            at(min(0.05, script.delay / 2), "progress")
            at(script.delay, "deadline")
        elif script.mode == "stuck":
            at(min(0.05, self.rollout_delay), "progress")

    def _sync_workload(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        uid: str,
        generation: int,
        phase: str,
        ready: int,
        reason: str | None,
    ) -> None:
        obj = self._objects.get((rt.group_version, rt.plural, namespace, name))
        if obj is None or obj["metadata"]["uid"] != uid:
            return
        if obj["metadata"].get("generation", 1) != generation:
            return
        if phase == "complete":
            ready = self._desired(rt, obj)
        sync = {
            "Deployment": self._sync_deployment,
            "StatefulSet": self._sync_statefulset,
            "DaemonSet": self._sync_daemonset,
        }[rt.kind]
        sync(copy.deepcopy(obj), phase, ready, reason)

    @staticmethod
    def _condition(conditions: list[Obj], kind: str, status: str, reason: str, message: str) -> Obj:
        now = _now()
        previous = next((c for c in conditions if c.get("type") == kind), None)
        since = (
            previous["lastTransitionTime"] if previous and previous.get("status") == status else now
        )
        return {
            "type": kind,
            "status": status,
            "lastUpdateTime": now,
            "lastTransitionTime": since,
            "reason": reason,
            "message": message,
        }

    def _sync_deployment(self, deploy: Obj, phase: str, ready: int, reason: str | None) -> None:
        meta, spec = deploy["metadata"], deploy["spec"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        replicas = self._desired(_BY_KIND["Deployment"], deploy)
        template = spec["template"]
        template_hash = _safe_hash(_canonical(template), 10)
        rs_name = f"{name}-{template_hash}"
        owned = [
            o
            for (gv, plural, ns, _), o in self._objects.items()
            if plural == "replicasets" and ns == namespace and _owned_by(o, uid)
        ]
        rs = self._objects.get(("apps/v1", "replicasets", namespace, rs_name))
        labels = {
            **_as_dict(template.get("metadata", {}).get("labels")),
            "pod-template-hash": template_hash,
        }
        if rs is None:
            revision = 1 + max(
                (
                    int(_as_dict(o["metadata"].get("annotations")).get(REVISION_ANNOTATION, 0))
                    for o in owned
                ),
                default=0,
            )
            rs_template = copy.deepcopy(template)
            rs_template.setdefault("metadata", {})["labels"] = dict(labels)
            selector = copy.deepcopy(spec["selector"])
            selector.setdefault("matchLabels", {})["pod-template-hash"] = template_hash
            rs = self._internal_create(
                REPLICASET_T,
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "metadata": {
                        "name": rs_name,
                        "namespace": namespace,
                        "labels": dict(labels),
                        "annotations": {
                            REVISION_ANNOTATION: str(revision),
                            "deployment.kubernetes.io/desired-replicas": str(replicas),
                        },
                        "ownerReferences": [_owner_ref(deploy)],
                    },
                    "spec": {"replicas": replicas, "selector": selector, "template": rs_template},
                    "status": {"replicas": 0},
                },
            )
        else:
            revision = int(rs["metadata"]["annotations"].get(REVISION_ANNOTATION, 1))
        meta.setdefault("annotations", {})[REVISION_ANNOTATION] = str(revision)
        rs_template = rs["spec"]["template"]
        nodes = self.nodes_for(rs_template)
        wanted = [f"{rs_name}-{_safe_hash(f'{rs_name}/{i}', 5)}" for i in range(replicas)]
        new_pods = [
            self._ensure_pod(
                namespace,
                pod_name,
                labels,
                rs,
                rs_template,
                nodes[i % len(nodes)] if nodes else None,
                "ready" if i < ready else "waiting",
                reason,
            )
            for i, pod_name in enumerate(wanted)
        ]
        ready = sum(1 for pod in new_pods if self._pod_ready(pod))
        rs_uid = rs["metadata"]["uid"]
        self._delete_pods(
            p for p in self._pods_of(namespace, rs_uid) if p["metadata"]["name"] not in wanted
        )
        old_sets = [o for o in owned if o["metadata"]["name"] != rs_name]
        done = phase == "complete" and bool(nodes)
        old_pods = [p for o in old_sets for p in self._pods_of(namespace, o["metadata"]["uid"])]
        if done:
            self._delete_pods(old_pods)
            old_pods = []
            for old_rs in old_sets:
                scaled = copy.deepcopy(old_rs)
                scaled["spec"]["replicas"] = 0
                scaled["status"] = {"replicas": 0, "observedGeneration": 1}
                self._internal_update(REPLICASET_T, scaled)
        rs_now = copy.deepcopy(self._objects[("apps/v1", "replicasets", namespace, rs_name)])
        rs_now["spec"]["replicas"] = replicas
        rs_now["status"] = _omit_zero(
            {
                "replicas": len(new_pods),
                "fullyLabeledReplicas": len(new_pods),
                "readyReplicas": ready,
                "availableReplicas": ready,
                "observedGeneration": rs_now["metadata"].get("generation", 1),
            },
            "fullyLabeledReplicas",
            "readyReplicas",
            "availableReplicas",
        )
        self._internal_update(REPLICASET_T, rs_now)

        old_ready = sum(1 for p in old_pods if self._pod_ready(p))
        available = ready + old_ready
        total = len(new_pods) + len(old_pods)
        rolling = _as_dict(_as_dict(spec.get("strategy")).get("rollingUpdate"))
        max_unavailable = rolling.get("maxUnavailable", "25%")
        if isinstance(max_unavailable, str) and max_unavailable.endswith("%"):
            max_unavailable = math.floor(replicas * int(max_unavailable[:-1] or 0) / 100)
        elif not isinstance(max_unavailable, int):
            max_unavailable = 0
        conditions = _as_list(_as_dict(deploy.get("status")).get("conditions"))
        if available >= replicas - max_unavailable:
            available_cond = self._condition(
                conditions,
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
            )
        else:
            available_cond = self._condition(
                conditions,
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            )
        if done:
            progressing = self._condition(
                conditions,
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                f'ReplicaSet "{rs_name}" has successfully progressed.',
            )
        elif phase == "deadline":
            progressing = self._condition(
                conditions,
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                f'ReplicaSet "{rs_name}" has timed out progressing.',
            )
        elif phase == "observe" and not any(c.get("type") == "Progressing" for c in conditions):
            progressing = self._condition(
                conditions,
                "Progressing",
                "True",
                "NewReplicaSetCreated",
                f'Created new replica set "{rs_name}"',
            )
        else:
            progressing = self._condition(
                conditions,
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                f'ReplicaSet "{rs_name}" is progressing.',
            )
        deploy["status"] = _omit_zero(
            {
                "observedGeneration": meta.get("generation", 1),
                "replicas": total,
                "updatedReplicas": len(new_pods),
                "readyReplicas": available,
                "availableReplicas": available,
                "unavailableReplicas": max(total - available, 0),
                "conditions": [available_cond, progressing],
            },
            "replicas",
            "updatedReplicas",
            "readyReplicas",
            "availableReplicas",
            "unavailableReplicas",
        )
        self._internal_update(_BY_KIND["Deployment"], deploy)

    def _sync_statefulset(self, sts: Obj, phase: str, ready: int, reason: str | None) -> None:
        meta, spec = sts["metadata"], sts["spec"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        replicas = self._desired(_BY_KIND["StatefulSet"], sts)
        template = spec["template"]
        revision = f"{name}-{_safe_hash(_canonical(template), 10)}"
        nodes = self.nodes_for(template)
        wanted = []
        for i in range(replicas):
            pod_name = f"{name}-{i}"
            wanted.append(pod_name)
            existing = self._objects.get(("v1", "pods", namespace, pod_name))
            if (
                existing is not None
                and existing["metadata"].get("labels", {}).get("controller-revision-hash")
                != revision
            ):
                self._delete_pods([existing])
            labels = {
                **_as_dict(template.get("metadata", {}).get("labels")),
                "controller-revision-hash": revision,
                "apps.kubernetes.io/pod-index": str(i),
                "statefulset.kubernetes.io/pod-name": pod_name,
            }
            self._ensure_pod(
                namespace,
                pod_name,
                labels,
                sts,
                template,
                nodes[i % len(nodes)] if nodes else None,
                "ready" if i < ready else "waiting",
                reason,
            )
        self._delete_pods(
            p for p in self._pods_of(namespace, uid) if p["metadata"]["name"] not in wanted
        )
        ready = sum(
            1
            for pod_name in wanted
            if self._pod_states.get((namespace, pod_name)) in ("ready", "running")
        )
        previous = _as_dict(sts.get("status"))
        done = phase == "complete" and bool(nodes)
        current_revision = revision if done else previous.get("currentRevision") or revision
        sts["status"] = _omit_zero(
            {
                "observedGeneration": meta.get("generation", 1),
                "replicas": replicas,
                "readyReplicas": ready,
                "currentReplicas": replicas if current_revision == revision else 0,
                "updatedReplicas": replicas,
                "currentRevision": current_revision,
                "updateRevision": revision,
                "collisionCount": 0,
                "availableReplicas": ready,
            },
            "readyReplicas",
            "currentReplicas",
            "updatedReplicas",
        )
        self._internal_update(_BY_KIND["StatefulSet"], sts)

    def _sync_daemonset(self, ds: Obj, phase: str, ready: int, reason: str | None) -> None:
        meta, spec = ds["metadata"], ds["spec"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        template = spec["template"]
        revision_hash = _safe_hash(_canonical(template), 10)
        nodes = self.nodes_for(template)
        desired = len(nodes)
        wanted = []
        for i, node in enumerate(nodes):
            pod_name = f"{name}-{_safe_hash(f'{name}/{revision_hash}/{node}', 5)}"
            wanted.append(pod_name)
            labels = {
                **_as_dict(template.get("metadata", {}).get("labels")),
                "controller-revision-hash": revision_hash,
            }
            self._ensure_pod(
                namespace,
                pod_name,
                labels,
                ds,
                template,
                node,
                "ready" if i < ready else "waiting",
                reason,
            )
        self._delete_pods(
            p for p in self._pods_of(namespace, uid) if p["metadata"]["name"] not in wanted
        )
        ready = sum(
            1
            for pod_name in wanted
            if self._pod_states.get((namespace, pod_name)) in ("ready", "running")
        )
        ds["status"] = _omit_zero(
            {
                "currentNumberScheduled": desired,
                "numberMisscheduled": 0,
                "desiredNumberScheduled": desired,
                "numberReady": ready,
                "observedGeneration": meta.get("generation", 1),
                "updatedNumberScheduled": desired,
                "numberAvailable": ready,
                "numberUnavailable": desired - ready,
            },
            "numberAvailable",
            "numberUnavailable",
        )
        self._internal_update(_BY_KIND["DaemonSet"], ds)

    def _start_job(self, job: Obj) -> None:
        meta, spec = job["metadata"], job["spec"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        if spec.get("suspend"):
            return
        script = self._job_scripts.get((namespace, name)) or JobScript(delay=self.job_delay)
        template = spec["template"]
        pod_name = f"{name}-{_safe_hash(uid, 5)}"
        labels = dict(_as_dict(template.get("metadata", {}).get("labels")))
        pod = self._ensure_pod(
            namespace,
            pod_name,
            labels,
            job,
            template,
            self.node_names[0],
            "pending",
            "ContainerCreating",
        )
        pod_uid = pod["metadata"]["uid"]
        started = _now()
        status = {
            "active": 1,
            "startTime": started,
            "ready": 0,
            "terminating": 0,
            "uncountedTerminatedPods": {},
        }
        updated = copy.deepcopy(job)
        updated["status"] = status
        self._internal_update(_BY_KIND["Job"], updated)

        run_after = (
            min(0.05, script.delay / 4) if script.start_delay is None else script.start_delay
        )
        finish_after = max(script.delay, run_after)
        start_mono, start_wall = time.monotonic(), time.time()
        count = len(script.logs)
        schedule = []
        for i, line in enumerate(script.logs):
            offset = run_after + (finish_after - run_after) * (i + 1) / (count + 1)
            schedule.append((start_mono + offset, start_wall + offset, line))
        self._logs[(namespace, pod_name)] = schedule

        def current_pod() -> Obj | None:
            found = self._objects.get(("v1", "pods", namespace, pod_name))
            return found if found is not None and found["metadata"]["uid"] == pod_uid else None

        def current_job() -> Obj | None:
            found = self._objects.get(("batch/v1", "jobs", namespace, name))
            return found if found is not None and found["metadata"]["uid"] == uid else None

        def run() -> None:
            pod_now, job_now = current_pod(), current_job()
            if pod_now is not None:
                self._set_pod_state(pod_now, "running", None)
            if job_now is not None:
                job_copy = copy.deepcopy(job_now)
                job_copy["status"]["ready"] = 1
                self._internal_update(_BY_KIND["Job"], job_copy)

        def finish() -> None:
            pod_now, job_now = current_pod(), current_job()
            code = (
                script.exit_code if script.exit_code is not None else (0 if script.succeed else 1)
            )
            if pod_now is not None:
                self._set_pod_state(
                    pod_now, "succeeded" if script.succeed else "failed", None, code
                )
            if job_now is None:
                return
            now = _now()
            job_copy = copy.deepcopy(job_now)
            final: Obj = {
                "startTime": started,
                "ready": 0,
                "terminating": 0,
                "uncountedTerminatedPods": {},
            }

            def cond(kind: str, reason: str, message: str) -> Obj:
                return {
                    "type": kind,
                    "status": "True",
                    "lastProbeTime": now,
                    "lastTransitionTime": now,
                    "reason": reason,
                    "message": message,
                }

            if script.succeed:
                final["completionTime"] = now
                final["succeeded"] = 1
                final["conditions"] = [
                    cond(
                        "SuccessCriteriaMet",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    ),
                    cond(
                        "Complete",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    ),
                ]
            else:
                final["failed"] = 1
                final["conditions"] = [
                    cond(
                        "FailureTarget",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    ),
                    cond(
                        "Failed",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    ),
                ]
            job_copy["status"] = final
            self._internal_update(_BY_KIND["Job"], job_copy)
            ttl = job_copy["spec"].get("ttlSecondsAfterFinished")
            if isinstance(ttl, int) and not isinstance(ttl, bool):
                self._schedule(ttl, expire)

        def expire() -> None:
            if current_job() is not None:
                self._delete_object(
                    _BY_KIND["Job"], ("batch/v1", "jobs", namespace, name), "Background"
                )

        self._schedule(run_after, run)
        self._schedule(finish_after, finish)

    # -- request plumbing helpers --------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_fault(self, path: str) -> str | None:
        with self._lock:
            mode = self._fault
            if mode is None:
                return None
            if self.fault_path_prefix and not path.startswith(self.fault_path_prefix):
                return None
            if self.fault_times is not None:
                if self.fault_times <= 0:
                    self._fault = None
                    return None
                self.fault_times -= 1
            return mode

    def _revealed_logs(self, namespace: str, pod: str) -> list[tuple[float, float, str]]:
        now = time.monotonic()
        return [entry for entry in self._logs.get((namespace, pod), []) if entry[0] <= now]

    def _control(self, method: str, path: str, body: Any) -> Obj:
        if method == "GET" and path == "/_fake/requests":
            with self._lock:
                return {"requests": [r._asdict() for r in self.requests]}
        if method == "GET" and path == "/_fake/healthz":
            return {"ok": True}
        if method != "POST" or not isinstance(body, dict):
            raise _bad_request("control endpoints take POST with a JSON object")
        if path == "/_fake/script":
            kind = body.get("kind")
            namespace, name = body.get("namespace", "default"), body.get("name")
            if not isinstance(name, str):
                raise _bad_request("name is required")
            try:
                if kind == "rollout":
                    self.script_rollout(
                        namespace,
                        name,
                        body.get("mode", "success"),
                        body.get("delay"),
                        pod_reason=body.get("pod_reason"),
                    )
                elif kind == "job":
                    self.script_job(
                        namespace,
                        name,
                        body.get("logs", []),
                        bool(body.get("succeed", True)),
                        body.get("delay"),
                        exit_code=body.get("exit_code"),
                        start_delay=body.get("start_delay"),
                    )
                else:
                    raise _bad_request('kind must be "rollout" or "job"')
            except ValueError as exc:
                raise _bad_request(str(exc)) from exc
            return {"ok": True}
        if path == "/_fake/fault":
            try:
                self.set_fault(
                    body.get("mode"), path_prefix=body.get("path_prefix"), times=body.get("times")
                )
            except ValueError as exc:
                raise _bad_request(str(exc)) from exc
            return {"ok": True}
        raise _no_such_path()

    def _fault_error(self, mode: str, method: str, path: str, query: dict[str, str]) -> ApiError:
        if mode == "401":
            return ApiError(401, "Unauthorized", "Unauthorized")
        if mode == "403":
            return self._forbidden(method, path, query)
        simple = {
            "404": (404, "NotFound", "the server could not find the requested resource"),
            "409": (409, "Conflict", "Operation cannot be fulfilled: the object has been modified"),
            "429": (429, "TooManyRequests", "Too many requests, please try again later."),
            "500": (500, "InternalError", "Internal error occurred: injected by kubefake"),
            "503": (
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            "504": (
                504,
                "Timeout",
                "the server was unable to return a response in the time "
                "allotted, but may still be processing the request",
            ),
        }
        code, reason, message = simple[mode]
        headers = {"Retry-After": "1"} if code in (429, 503) else None
        return ApiError(code, reason, message, {}, headers)

    def _forbidden(self, method: str, path: str, query: dict[str, str]) -> ApiError:
        try:
            route = _parse_route(path)
        except ApiError:
            route = None
        if not isinstance(route, _Route):
            return ApiError(
                403,
                "Forbidden",
                f'forbidden: User "{self.user}" cannot {method.lower()} path "{path}"',
                {},
            )
        rt = route.rt
        if method == "GET" and route.name:
            verb = "get"
        elif method == "GET":
            verb = "watch" if _parse_bool(query.get("watch")) else "list"
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, "delete")
            if method == "DELETE" and not route.name:
                verb = "deletecollection"
        resource = rt.plural + (f"/{route.sub}" if route.sub else "")
        subject = f'{rt.qualified} "{route.name}"' if route.name else rt.qualified
        scope = (
            f' in the namespace "{route.namespace}"' if route.namespace else " at the cluster scope"
        )
        message = (
            f'{subject} is forbidden: User "{self.user}" cannot {verb} resource '
            f'"{resource}" in API group "{rt.group}"{scope}'
        )
        return ApiError(403, "Forbidden", message, _details(rt, route.name))


# --------------------------------------------------------------------------- routing


def _parse_route(path: str) -> _Route | Obj:
    """Resource routes become ``_Route``; discovery documents are returned as dicts."""
    parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
    if parts == ["version"]:
        return dict(KUBE_VERSION)
    if not parts or parts[0] not in ("api", "apis"):
        raise _no_such_path()
    if parts[0] == "api":
        if len(parts) == 1:
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{LOOPBACK}:443"}
                ],
            }
        if parts[1] != "v1":
            raise _no_such_path()
        group_version, rest = "v1", parts[2:]
    else:
        if len(parts) == 1:
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [_group_doc(g) for g in _GROUP_VERSIONS],
            }
        if parts[1] not in _GROUP_VERSIONS:
            raise _no_such_path()
        if len(parts) == 2:
            return {"kind": "APIGroup", "apiVersion": "v1", **_group_doc(parts[1])}
        if parts[2] not in _GROUP_VERSIONS[parts[1]]:
            raise _no_such_path()
        group_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    if not rest:
        return _resource_list_doc(group_version)
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 3 and (group_version, rest[2]) in _BY_PATH:
        namespace, rest = rest[1], rest[2:]
        if not _BY_PATH[(group_version, rest[0])].namespaced:
            raise _no_such_path()
    if len(rest) > 3:
        raise _no_such_path()
    rt = _BY_PATH.get((group_version, rest[0]))
    if rt is None:
        raise _no_such_path()
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if sub is not None and sub not in rt.subresources:
        raise _no_such_path()
    return _Route(rt, namespace, name, sub)


def _group_doc(group: str) -> Obj:
    versions = [{"groupVersion": f"{group}/{v}", "version": v} for v in _GROUP_VERSIONS[group]]
    return {"name": group, "versions": versions, "preferredVersion": versions[0]}


def _resource_list_doc(group_version: str) -> Obj:
    resources: list[Obj] = []
    for rt in RESOURCE_TYPES:
        if rt.group_version != group_version:
            continue
        entry: Obj = {
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": list(_VERBS),
        }
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        if rt.categories:
            entry["categories"] = list(rt.categories)
        entry["storageVersionHash"] = base64.b64encode(
            hashlib.sha256(rt.qualified.encode()).digest()[:8]
        ).decode()
        resources.append(entry)
        for sub in rt.subresources:
            verbs = ["get"] if sub == "log" else ["get", "patch", "update"]
            resources.append(
                {
                    "name": f"{rt.plural}/{sub}",
                    "singularName": "",
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": verbs,
                }
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


# --------------------------------------------------------------------------- HTTP layer


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(
        self, fake: FakeKube, address: tuple[str, int], context: ssl.SSLContext | None
    ) -> None:
        self.fake = fake
        self.context = context
        self._conn_lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._handler_threads: list[threading.Thread] = []
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        # Small header and body writes would otherwise wait on delayed ACKs (~40 ms each).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name="kubefake-conn",
            daemon=True,
        )
        with self._conn_lock:
            self._conns[request] = thread
            self._handler_threads = [t for t in self._handler_threads if t.is_alive()]
            self._handler_threads.append(thread)
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._conn_lock:
                self._conns.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (OSError, ssl.SSLError, ValueError)):
            return  # a client that went away or failed the TLS handshake
        self.fake.server_errors.append(traceback.format_exc())

    def close_connections(self) -> None:
        with self._conn_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass

    def join_connections(self, timeout: float) -> None:
        """Wait until every connection thread has ended (call after ``shutdown()``)."""
        deadline = time.monotonic() + timeout
        with self._conn_lock:
            threads = list(self._handler_threads)
        for thread in threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0.01))


class _ClientGone(Exception):
    pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kubefake"
    sys_version = ""
    timeout = 300
    server: _Server

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing ------------------------------------------------------------------------

    @property
    def fake(self) -> FakeKube:
        return self.server.fake

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(
        self, code: int, payload: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Audit-Id", str(uuid.uuid4()))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        # Headers and body leave in one write (see TCP_NODELAY in _Server.get_request).
        socket_writer, self.wfile = self.wfile, io.BytesIO()
        try:
            self.end_headers()
            self.wfile.write(payload)
            data = self.wfile.getvalue()
        finally:
            self.wfile = socket_writer
        socket_writer.write(data)

    def _send_json(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(body).encode(), "application/json", headers)

    def _start_chunked(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        except OSError as exc:
            raise _ClientGone from exc

    def _end_chunked(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True

    def _client_gone(self) -> bool:
        sock = self.connection
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            if isinstance(sock, ssl.SSLSocket):
                previous = sock.gettimeout()
                sock.settimeout(0.01)
                try:
                    return bool(sock.recv(1) == b"")
                finally:
                    sock.settimeout(previous)
            return bool(sock.recv(1, socket.MSG_PEEK) == b"")
        except (ssl.SSLWantReadError, TimeoutError, BlockingIOError):
            return False
        except (OSError, ValueError):
            return True

    def _stream_over(self, deadline: float | None) -> bool:
        if self.fake._stopping.is_set() or self._client_gone():
            self.close_connection = True
            return True
        return deadline is not None and time.monotonic() >= deadline

    def _dispatch(self, method: str) -> None:
        fake = self.fake
        split = urlsplit(self.path)
        path = split.path
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        try:
            raw = self._read_body()
        except OSError:
            self.close_connection = True
            return
        content_type = self.headers.get("Content-Type")
        try:
            if path.startswith("/_fake/"):
                body = json.loads(raw) if raw else None
                self._send_json(200, fake._control(method, path, body))
                return
            fake._record(RecordedRequest(method, path, query, content_type))
            mode = fake._take_fault(path)
            if mode == "hang":
                while not self._stream_over(None):
                    fake._stopping.wait(0.05)
                self.close_connection = True
                return
            if mode == "drop":
                self.close_connection = True
                return
            if mode is not None:
                raise fake._fault_error(mode, method, path, query)
            if fake.token is not None and self.headers.get("Authorization") != (
                f"Bearer {fake.token}"
            ):
                raise ApiError(401, "Unauthorized", "Unauthorized")
            self._api(method, path, query, raw, content_type)
        except ApiError as error:
            self._send_json(error.code, error.body(), error.headers)
        except _ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except json.JSONDecodeError as exc:
            self._send_json(400, status_body(400, "BadRequest", f"invalid JSON: {exc}"))
        except Exception as exc:
            fake.server_errors.append(traceback.format_exc())
            self._send_json(
                500, status_body(500, "InternalError", f"Internal error occurred: {exc!r}")
            )

    # -- the API -------------------------------------------------------------------------

    def _decode(self, raw: bytes, content_type: str | None, rt: ResourceType) -> Any:
        if not raw:
            raise _bad_request(f"the object provided is unrecognized (must be of type {rt.kind})")
        try:
            return json.loads(raw)
        except ValueError:
            if _yaml is None or "yaml" not in (content_type or ""):
                raise _bad_request(
                    "the object provided is unrecognized (must be of type Patch)"
                ) from None
        try:
            return _yaml.safe_load(raw)
        except Exception as exc:
            raise _bad_request(f"error decoding YAML: {exc}") from None

    def _manager(self, query: dict[str, str]) -> str:
        manager = query.get("fieldManager")
        if manager:
            return manager
        agent = self.headers.get("User-Agent") or "unknown"
        return agent.split("/", 1)[0][:128] or "unknown"

    def _api(
        self, method: str, path: str, query: dict[str, str], raw: bytes, content_type: str | None
    ) -> None:
        fake = self.fake
        route = _parse_route(path)
        if not isinstance(route, _Route):
            if method != "GET":
                raise _method_not_allowed()
            if route.get("kind") == "APIVersions":
                route["serverAddressByClientCIDRs"][0]["serverAddress"] = f"{LOOPBACK}:{fake.port}"
            self._send_json(200, route)
            return
        rt = route.rt
        dry_run = query.get("dryRun") == "All"
        media = (content_type or "").split(";")[0].strip().lower()
        if method != "PATCH" and "force" in query:
            raise _patch_options_invalid(
                "force", "Forbidden", "may not be specified for non-apply patch"
            )
        if method == "GET":
            if route.name is None:
                if _parse_bool(query.get("watch")):
                    self._watch(route, query)
                else:
                    self._list(route, query)
            elif route.sub == "log":
                self._log(route, query)
            else:
                with fake._lock:
                    obj = fake._objects.get(route.key())
                    if obj is None:
                        raise _not_found(rt, route.name)
                    self._send_json(200, obj)
            return
        if method == "POST":
            if route.name is not None:
                raise _method_not_allowed()
            if rt.namespaced and not route.namespace:
                raise _method_not_allowed()
            body = self._decode(raw, content_type, rt)
            with fake._lock:
                created = fake._create(rt, route.namespace, body, self._manager(query), dry_run)
            self._send_json(201, created)
            return
        if method == "DELETE":
            self._delete(route, query, raw, dry_run)
            return
        if route.name is None or route.sub == "log" or (rt.namespaced and not route.namespace):
            raise _method_not_allowed()
        if method == "PUT":
            body = self._decode(raw, content_type, rt)
            with fake._lock:
                updated = fake._update(route, body, self._manager(query), dry_run)
            self._send_json(200, updated)
            return
        if method != "PATCH":
            raise _method_not_allowed()
        if media == "application/apply-patch+yaml":
            manager = query.get("fieldManager")
            if not manager:
                raise _patch_options_invalid(
                    "fieldManager", "Required", "is required for apply patch"
                )
            if route.sub is not None:
                raise _bad_request("kubefake only supports apply on the main resource")
            body = self._decode(raw, content_type, rt)
            force = _parse_bool(query.get("force"))
            with fake._lock:
                applied, is_new = fake._server_side_apply(
                    rt, route.namespace, route.name, body, manager, force, dry_run
                )
            self._send_json(201 if is_new else 200, applied)
            return
        if "force" in query:
            raise _patch_options_invalid(
                "force", "Forbidden", "may not be specified for non-apply patch"
            )
        if media not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f"include: application/apply-patch+yaml, application/merge-patch+json, "
                f"application/strategic-merge-patch+json (kubefake got {media or 'none'})",
            )
        patch = self._decode(raw, content_type, rt)
        if not isinstance(patch, dict):
            raise _bad_request("a merge patch must be a JSON object")
        strategic = media == "application/strategic-merge-patch+json"
        with fake._lock:
            updated = fake._update(
                route,
                None,
                self._manager(query),
                dry_run,
                patch=lambda current: _merge_patch(current, patch, strategic),
            )
        self._send_json(200, updated)

    def _delete(self, route: _Route, query: dict[str, str], raw: bytes, dry_run: bool) -> None:
        fake, rt = self.fake, route.rt
        options = _as_dict(json.loads(raw)) if raw else {}
        policy = query.get("propagationPolicy") or options.get("propagationPolicy")
        if _parse_bool(query.get("orphanDependents")) or options.get("orphanDependents"):
            policy = "Orphan"
        if route.name is not None:
            with fake._lock:
                deleted = fake._delete(route, policy, dry_run)
            if rt.kind == "Pod":
                self._send_json(200, deleted)
            else:
                details = _details(rt, route.name)
                details["uid"] = deleted["metadata"]["uid"]
                self._send_json(
                    200,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": details,
                    },
                )
            return
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = parse_field_selector(query.get("fieldSelector", ""))
        with fake._lock:
            removed = []
            for obj in list(fake._list(rt, route.namespace, labels, fields)):
                sub_route = _Route(
                    rt, obj["metadata"].get("namespace", ""), obj["metadata"]["name"], None
                )
                if sub_route.key() in fake._objects:
                    removed.append(fake._delete(sub_route, policy, dry_run))
            body = {
                "kind": f"{rt.kind}List",
                "apiVersion": rt.group_version,
                "metadata": {"resourceVersion": str(fake._rv)},
                "items": removed,
            }
        self._send_json(200, body)

    def _list(self, route: _Route, query: dict[str, str]) -> None:
        fake, rt = self.fake, route.rt
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = parse_field_selector(query.get("fieldSelector", ""))
        with fake._lock:
            items = fake._list(rt, route.namespace, labels, fields)
            rv = fake._rv
            start = 0
            token = query.get("continue")
            if token:
                try:
                    state = json.loads(base64.urlsafe_b64decode(token.encode()))
                    start = int(state["start"])
                except (ValueError, KeyError, TypeError):
                    raise ApiError(
                        410,
                        "Expired",
                        "the provided continue parameter is too old "
                        "to display a consistent list result",
                    ) from None
            limit = int(query.get("limit") or 0)
            page = items[start : start + limit] if limit > 0 else items[start:]
            list_meta: Obj = {"resourceVersion": str(rv)}
            if limit > 0 and start + limit < len(items):
                list_meta["continue"] = base64.urlsafe_b64encode(
                    json.dumps({"start": start + limit, "rv": rv}).encode()
                ).decode()
                list_meta["remainingItemCount"] = len(items) - start - limit
            output = []
            for item in page:
                copied = {k: v for k, v in item.items() if k not in ("apiVersion", "kind")}
                output.append(copied)
            body = {
                "kind": f"{rt.kind}List",
                "apiVersion": rt.group_version,
                "metadata": list_meta,
                "items": output,
            }
            payload = json.dumps(body).encode()
        self._send(200, payload, "application/json")

    def _watch(self, route: _Route, query: dict[str, str]) -> None:
        fake, rt = self.fake, route.rt
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = parse_field_selector(query.get("fieldSelector", ""))
        timeout = query.get("timeoutSeconds")
        deadline = time.monotonic() + float(timeout) if timeout else None
        requested = query.get("resourceVersion", "")
        initial_events = _parse_bool(query.get("sendInitialEvents"))

        def matches(obj: Obj | None) -> bool:
            if obj is None:
                return False
            if route.namespace and obj["metadata"].get("namespace") != route.namespace:
                return False
            return labels(obj) and fields(obj)

        lines: list[bytes] = []
        with fake._lock:
            if requested in ("", "0") or initial_events:
                for obj in fake._list(rt, route.namespace, labels, fields):
                    lines.append(_event_line("ADDED", obj))
                cursor = fake._rv
                if initial_events:
                    lines.append(
                        _event_line(
                            "BOOKMARK",
                            {
                                "kind": rt.kind,
                                "apiVersion": rt.group_version,
                                "metadata": {
                                    "resourceVersion": str(cursor),
                                    "annotations": {"k8s.io/initial-events-end": "true"},
                                },
                            },
                        )
                    )
            else:
                try:
                    cursor = int(requested)
                except ValueError:
                    raise _bad_request(f"invalid resourceVersion {requested!r}") from None
                if cursor < fake._events_floor:
                    gone = status_body(
                        410,
                        "Expired",
                        f"too old resource version: {cursor} ({fake._events_floor + 1})",
                    )
                    lines.append(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                    cursor = -1
        self._start_chunked("application/json")
        try:
            for line in lines:
                self._chunk(line)
            while cursor >= 0 and not self._stream_over(deadline):
                with fake._cond:
                    index = bisect.bisect_right(fake._event_rvs, cursor)
                    if index >= len(fake._events):
                        fake._cond.wait(timeout=0.05)
                        index = bisect.bisect_right(fake._event_rvs, cursor)
                    batch = [
                        e
                        for e in fake._events[index:]
                        if e.gv == rt.group_version and e.plural == rt.plural
                    ]
                    if index < len(fake._events):
                        cursor = fake._events[-1].rv
                for event in batch:
                    now_matches, was_matching = matches(event.obj), matches(event.old)
                    if event.type == "MODIFIED":
                        if now_matches and not was_matching:
                            kind = "ADDED"
                        elif was_matching and not now_matches:
                            kind = "DELETED"
                        elif now_matches:
                            kind = "MODIFIED"
                        else:
                            continue
                    elif now_matches:
                        kind = event.type
                    else:
                        continue
                    self._chunk(_event_line(kind, event.obj))
        except _ClientGone:
            self.close_connection = True
            return
        self._end_chunked()

    def _log(self, route: _Route, query: dict[str, str]) -> None:
        fake = self.fake
        namespace, name = route.namespace, route.name or ""
        with fake._lock:
            pod = fake._objects.get(route.key())
            if pod is None:
                raise _not_found(route.rt, name)
            pod_uid = pod["metadata"]["uid"]
            containers = [
                str(c.get("name"))
                for c in _as_list(pod["spec"].get("containers"))
                if isinstance(c, dict)
            ]
            container = query.get("container")
            if not container:
                if len(containers) != 1:
                    raise _bad_request(
                        f"a container name must be specified for pod {name}, choose one of: "
                        f"[{' '.join(containers)}]"
                    )
                container = containers[0]
            if container not in containers:
                raise _bad_request(f"container {container} is not valid for pod {name}")
            statuses = _as_list(_as_dict(pod.get("status")).get("containerStatuses"))
            state = next(
                (s.get("state", {}) for s in statuses if s.get("name") == container),
                {"waiting": {"reason": "ContainerCreating"}},
            )
            if "waiting" in state:
                reason = state["waiting"].get("reason", "ContainerCreating")
                raise _bad_request(
                    f'container "{container}" in pod "{name}" is waiting to start: {reason}'
                )
            revealed = fake._revealed_logs(namespace, name)
        timestamps = _parse_bool(query.get("timestamps"))

        def render(entry: tuple[float, float, str]) -> bytes:
            prefix = f"{_iso_nanos(entry[1])} " if timestamps else ""
            return f"{prefix}{entry[2]}\n".encode()

        if not _parse_bool(query.get("follow")):
            tail = query.get("tailLines")
            if tail is not None and tail.isdigit():
                revealed = revealed[len(revealed) - int(tail) :] if int(tail) else []
            self._send(200, b"".join(render(e) for e in revealed), "text/plain")
            return
        self._start_chunked("text/plain")
        sent = 0
        try:
            while True:
                with fake._cond:
                    revealed = fake._revealed_logs(namespace, name)
                    current = fake._objects.get(route.key())
                    alive = current is not None and current["metadata"]["uid"] == pod_uid
                    phase = (
                        _as_dict(current.get("status")).get("phase") if alive and current else None
                    )
                    pending = len(fake._logs.get((namespace, name), [])) > len(revealed)
                for entry in revealed[sent:]:
                    self._chunk(render(entry))
                sent = len(revealed)
                if not alive or (phase in ("Succeeded", "Failed") and not pending):
                    break
                if self._stream_over(None):
                    return
                with fake._cond:
                    fake._cond.wait(timeout=0.02)
        except _ClientGone:
            self.close_connection = True
            return
        self._end_chunked()


def _event_line(kind: str, obj: Obj) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


def _patch_options_invalid(field: str, kind: str, detail: str) -> ApiError:
    reason = {"Required": "FieldValueRequired", "Forbidden": "FieldValueForbidden"}[kind]
    label = "Required value" if kind == "Required" else "Forbidden"
    message = f"{label}: {detail}"
    return ApiError(
        422,
        "Invalid",
        f'PatchOptions.meta.k8s.io "" is invalid: {field}: {message}',
        {
            "group": "meta.k8s.io",
            "kind": "PatchOptions",
            "causes": [{"reason": reason, "message": message, "field": field}],
        },
    )


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the kubefake test API server.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--kubeconfig", type=Path, required=True, help="kubeconfig to write")
    parser.add_argument("--ready-file", type=Path, help="written with the port once serving")
    parser.add_argument("--namespace", default="default", help="the kubeconfig's namespace")
    parser.add_argument("--token", default="test-token", help='bearer token ("" for none)')
    parser.add_argument("--certfile", type=Path, help="serve HTTPS with this cert (PEM)")
    parser.add_argument("--keyfile", type=Path, help="private key, if not in --certfile")
    parser.add_argument("--cafile", type=Path, help="CA to put in the kubeconfig")
    parser.add_argument("--rollout-delay", type=float, default=0.1)
    parser.add_argument("--job-delay", type=float, default=0.2)
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fake = FakeKube(
        token=args.token or None,
        certfile=args.certfile,
        keyfile=args.keyfile,
        ca_pem=args.cafile.read_bytes() if args.cafile else None,
        port=args.port,
        rollout_delay=args.rollout_delay,
        job_delay=args.job_delay,
    )
    with fake:
        fake.write_kubeconfig(args.kubeconfig, namespace=args.namespace)
        if args.ready_file is not None:
            partial = args.ready_file.with_name(args.ready_file.name + ".tmp")
            partial.write_text(f"{fake.port}\n")
            partial.replace(args.ready_file)
        print(fake.url, flush=True)
        while not stop.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
