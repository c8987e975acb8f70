"""The loopback Kubernetes API (tests/kubefake.py), driven by the official client only.

Every request here is real HTTP(S) on 127.0.0.1 made by the ``kubernetes`` package: the
typed APIs, the dynamic client, ``watch.Watch`` and pod logs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import urllib3
from kubefake import FakeKube
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic import exceptions as dyn_errors
from kubernetes.dynamic.resource import Resource
from polling import wait_for

KUBEFAKE = Path(__file__).with_name("kubefake.py")
NS = "default"


# --------------------------------------------------------------------------- helpers


def status_of(error: ApiException) -> dict[str, Any]:
    """The apiserver's ``Status`` body carried by a client exception."""
    return json.loads(error.body)


def deployment(
    name: str = "web", replicas: int | None = 2, image: str = "nginx:1.25", **spec: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": image}]},
            },
            **spec,
        },
    }
    if replicas is not None:
        body["spec"]["replicas"] = replicas
    return body


def job(name: str = "migrate", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "busybox:1.36"}],
                }
            },
            **spec,
        },
    }


def rolled_out(apps: k8s.AppsV1Api, name: str = "web") -> k8s.V1Deployment | None:
    """The deployment once ``kubectl rollout status`` would call it done."""
    found = apps.read_namespaced_deployment_status(name, NS)
    status, wanted = found.status, found.spec.replicas
    if (
        status.observed_generation == found.metadata.generation
        and status.updated_replicas == wanted
        and status.replicas == wanted
        and status.available_replicas == wanted
    ):
        return found
    return None


def deadline_exceeded(apps: k8s.AppsV1Api, name: str = "web") -> k8s.V1Deployment | None:
    """The deployment once its Progressing condition turned False."""
    found = apps.read_namespaced_deployment_status(name, NS)
    progressing = condition(found, "Progressing")
    return found if progressing is not None and progressing.status == "False" else None


def condition(obj: Any, kind: str) -> Any:
    return next((c for c in obj.status.conditions or [] if c.type == kind), None)


def connect(kubeconfig: Path) -> k8s.ApiClient:
    return k8s_config.new_client_from_config(config_file=str(kubeconfig))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _typed_apis_built() -> None:
    """Client v37 builds each typed API class on first use, which takes up to seconds (pydantic
    call validators); pay it once here so that the tests' timings are the fake's own."""
    with k8s.ApiClient() as api_client:
        for api_class in (k8s.CoreV1Api, k8s.AppsV1Api, k8s.BatchV1Api, k8s.VersionApi):
            api_class(api_client)


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[FakeKube]:
    """A started server (``indirect`` parametrisation passes FakeKube options)."""
    before = set(threading.enumerate())
    server = FakeKube(**getattr(request, "param", {}))
    with server:
        yield server
    assert server.server_errors == []
    leftover = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftover == []


@pytest.fixture
def kubeconfig(fake: FakeKube, tmp_path: Path) -> Path:
    return fake.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def api(kubeconfig: Path) -> Iterator[k8s.ApiClient]:
    with connect(kubeconfig) as api_client:
        yield api_client


@pytest.fixture
def dyn(api: k8s.ApiClient, tmp_path: Path) -> DynamicClient:
    # A discovery cache per test: the default one lives in the shared temp dir, keyed by URL.
    return DynamicClient(api, cache_file=str(tmp_path / "discovery.json"))


@pytest.fixture
def deployments(dyn: DynamicClient) -> Resource:
    return dyn.resources.get(api_version="apps/v1", kind="Deployment")


@pytest.fixture
def apps(api: k8s.ApiClient) -> k8s.AppsV1Api:
    return k8s.AppsV1Api(api)


@pytest.fixture
def core(api: k8s.ApiClient) -> k8s.CoreV1Api:
    return k8s.CoreV1Api(api)


@pytest.fixture
def batch(api: k8s.ApiClient) -> k8s.BatchV1Api:
    return k8s.BatchV1Api(api)


# --------------------------------------------------------------------------- discovery


def test_discovery_serves_the_dynamic_and_typed_clients(
    fake: FakeKube, api: k8s.ApiClient, dyn: DynamicClient
) -> None:
    assert dyn.version["kubernetes"]["gitVersion"].startswith("v1.")
    for api_version, kind, namespaced in [
        ("v1", "Namespace", False),
        ("v1", "Pod", True),
        ("v1", "ConfigMap", True),
        ("v1", "Service", True),
        ("v1", "Secret", True),
        ("v1", "ServiceAccount", True),
        ("apps/v1", "Deployment", True),
        ("apps/v1", "StatefulSet", True),
        ("apps/v1", "DaemonSet", True),
        ("apps/v1", "ReplicaSet", True),
        ("batch/v1", "Job", True),
        ("networking.k8s.io/v1", "Ingress", True),
    ]:
        found = dyn.resources.get(api_version=api_version, kind=kind)
        assert found.namespaced is namespaced, kind
    pods = dyn.resources.get(api_version="v1", kind="Pod")
    assert set(pods.subresources) == {"log", "status"}
    assert "status" in dyn.resources.get(api_version="apps/v1", kind="Deployment").subresources

    assert k8s.VersionApi(api).get_code().git_version == "v1.31.0-kubefake"
    groups = k8s.ApisApi(api).get_api_versions().groups
    assert [g.name for g in groups] == ["apps", "batch", "networking.k8s.io"]
    core_names = {r.name for r in k8s.CoreV1Api(api).get_api_resources().resources}
    assert {"pods", "pods/log", "configmaps", "services", "secrets", "namespaces"} <= core_names
    assert {r.name for r in k8s.AppsV1Api(api).get_api_resources().resources} >= {
        "deployments",
        "deployments/status",
        "statefulsets",
        "daemonsets",
        "replicasets",
    }
    paths = {r.path for r in fake.requests if r.method == "GET"}
    assert {"/version", "/apis", "/api/v1", "/apis/apps/v1", "/apis/batch/v1"} <= paths


# --------------------------------------------------------------------------- apply


def test_apply_creates_then_updates_and_an_identical_apply_is_a_no_op(
    fake: FakeKube, deployments: Resource
) -> None:
    created = deployments.server_side_apply(
        body=deployment(), field_manager="shipyard", namespace=NS, serialize=False
    )
    assert created.status == 201
    first = json.loads(created.data)
    assert first["metadata"]["generation"] == 1
    assert first["metadata"]["namespace"] == NS
    assert first["metadata"]["uid"]
    assert first["metadata"]["creationTimestamp"].endswith("Z")
    assert first["spec"]["strategy"]["type"] == "RollingUpdate"  # defaulted
    (entry,) = first["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"]) == ("shipyard", "Apply")
    assert "f:replicas" in entry["fieldsV1"]["f:spec"]
    assert "f:strategy" not in entry["fieldsV1"]["f:spec"]  # defaults are nobody's

    method, path, query, content_type = fake.requests[-1]
    assert (method, path) == ("PATCH", "/apis/apps/v1/namespaces/default/deployments/web")
    assert query["fieldManager"] == "shipyard"
    assert content_type == "application/apply-patch+yaml"

    updated = deployments.server_side_apply(
        body=deployment(replicas=3), field_manager="shipyard", namespace=NS, serialize=False
    )
    assert updated.status == 200
    second = json.loads(updated.data)
    assert second["metadata"]["generation"] == 2
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])

    # Let the rollout finish, then an identical apply changes nothing at all.
    wait_for(lambda: deployments.get(name="web", namespace=NS).status.availableReplicas == 3)
    before = deployments.get(name="web", namespace=NS)
    again = deployments.server_side_apply(
        body=deployment(replicas=3), field_manager="shipyard", namespace=NS
    )
    assert again.metadata.generation == 2
    assert again.metadata.resourceVersion == before.metadata.resourceVersion


def test_apply_removes_what_the_manager_stopped_applying(deployments: Resource) -> None:
    body = deployment(replicas=3)
    body["metadata"]["labels"]["tier"] = "frontend"
    deployments.server_side_apply(body=body, field_manager="shipyard", namespace=NS)
    slimmer = deployment(replicas=None)
    result = deployments.server_side_apply(body=slimmer, field_manager="shipyard", namespace=NS)
    assert dict(result.metadata.labels) == {"app": "web"}
    assert result.spec.replicas == 1  # dropped, then defaulted again
    assert result.metadata.generation == 2


def test_apply_conflicts_with_another_manager_unless_forced(
    deployments: Resource, apps: k8s.AppsV1Api
) -> None:
    deployments.server_side_apply(
        body=deployment(replicas=2), field_manager="kubectl", namespace=NS
    )
    with pytest.raises(dyn_errors.ConflictError) as caught:
        deployments.server_side_apply(
            body=deployment(replicas=3), field_manager="shipyard", namespace=NS
        )
    assert caught.value.status == 409
    assert status_of(caught.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'Apply failed with 1 conflict: conflict with "kubectl": .spec.replicas',
        "reason": "Conflict",
        "details": {
            "causes": [
                {
                    "reason": "FieldManagerConflict",
                    "message": 'conflict with "kubectl"',
                    "field": ".spec.replicas",
                }
            ]
        },
        "code": 409,
    }
    # Agreeing on a value is not a conflict: both managers own it.
    shared = deployments.server_side_apply(
        body=deployment(replicas=2), field_manager="shipyard", namespace=NS
    )
    assert {m.manager for m in shared.metadata.managedFields} == {"kubectl", "shipyard"}

    forced = deployments.server_side_apply(
        body=deployment(replicas=3), field_manager="shipyard", namespace=NS, force_conflicts=True
    )
    assert forced.spec.replicas == 3
    kubectl = next(m for m in forced.metadata.managedFields if m.manager == "kubectl")
    assert "f:replicas" not in kubectl.fieldsV1["f:spec"]

    # An imperative edit (operation Update) owns what it changed, too.
    apps.patch_namespaced_deployment(
        "web", NS, {"spec": {"replicas": 5}}, field_manager="kubectl-edit"
    )
    with pytest.raises(dyn_errors.ConflictError) as caught:
        deployments.server_side_apply(
            body=deployment(replicas=3), field_manager="shipyard", namespace=NS
        )
    assert status_of(caught.value)["message"] == (
        'Apply failed with 1 conflict: conflict with "kubectl-edit" using apps/v1: .spec.replicas'
    )


def test_apply_without_field_manager_or_with_a_foreign_namespace_is_refused(
    deployments: Resource,
) -> None:
    with pytest.raises(dyn_errors.UnprocessibleEntityError) as caught:
        deployments.patch(
            body=deployment(), namespace=NS, content_type="application/apply-patch+yaml"
        )
    body = status_of(caught.value)
    assert body["reason"] == "Invalid"
    assert body["message"] == (
        'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: '
        "is required for apply patch"
    )

    elsewhere = deployment()
    elsewhere["metadata"]["namespace"] = "other"
    with pytest.raises(dyn_errors.BadRequestError) as caught:
        deployments.server_side_apply(body=elsewhere, field_manager="shipyard", namespace=NS)
    body = status_of(caught.value)
    assert (body["code"], body["reason"]) == (400, "BadRequest")
    assert "namespace" in body["message"]


def test_invalid_objects_get_422_with_the_offending_fields(
    deployments: Resource, apps: k8s.AppsV1Api
) -> None:
    no_selector = deployment()
    del no_selector["spec"]["selector"]
    no_template = deployment()
    del no_template["spec"]["template"]
    bad_name = deployment(name="Web_1")
    no_image = deployment()
    del no_image["spec"]["template"]["spec"]["containers"][0]["image"]
    cases = [
        (no_selector, "spec.selector", "FieldValueRequired"),
        (no_template, "spec.template.spec.containers", "FieldValueRequired"),
        (bad_name, "metadata.name", "FieldValueInvalid"),
        (no_image, "spec.template.spec.containers[0].image", "FieldValueRequired"),
    ]
    for body, field, reason in cases:
        name = body["metadata"]["name"]
        with pytest.raises(dyn_errors.UnprocessibleEntityError) as caught:
            deployments.server_side_apply(body=body, field_manager="shipyard", namespace=NS)
        status = status_of(caught.value)
        assert status["code"] == 422
        assert status["reason"] == "Invalid"
        assert status["message"].startswith(f'Deployment.apps "{name}" is invalid: ')
        assert status["details"]["kind"] == "Deployment"
        assert (field, reason) in {(c["field"], c["reason"]) for c in status["details"]["causes"]}
    assert apps.list_namespaced_deployment(NS).items == []


def _no_selector(body: dict[str, Any]) -> None:
    del body["spec"]["selector"]


def _other_selector(body: dict[str, Any]) -> None:
    body["spec"]["selector"] = {"matchLabels": {"app": "other"}}


def _empty_selector(body: dict[str, Any]) -> None:
    body["spec"]["selector"] = {}


def _bad_template_label(body: dict[str, Any]) -> None:
    body["spec"]["template"]["metadata"]["labels"]["tier"] = "a b"


def _no_template(body: dict[str, Any]) -> None:
    del body["spec"]["template"]


def _wider_selector(body: dict[str, Any]) -> None:
    body["spec"]["selector"]["matchLabels"]["tier"] = "x"
    body["spec"]["template"]["metadata"]["labels"]["tier"] = "x"


_MISMATCH = "`selector` does not match template `labels`"
_LABEL = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)


@pytest.mark.parametrize(
    ("change", "update", "message"),
    [
        (_no_selector, False, f'[spec.selector: Required value, spec.template.metadata.labels: Invalid value: map[string]string{{"app":"web"}}: {_MISMATCH}]'),
        (_other_selector, False, f'spec.template.metadata.labels: Invalid value: map[string]string{{"app":"web"}}: {_MISMATCH}'),
        (_empty_selector, False, "spec.selector: Invalid value: v1.LabelSelector{MatchLabels:map[string]string(nil), MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: empty selector is invalid for deployment"),
        (_bad_template_label, False, f'spec.template.labels: Invalid value: "a b": {_LABEL}'),
        (_no_template, False, f"[spec.template.metadata.labels: Invalid value: map[string]string(nil): {_MISMATCH}, spec.template.spec.containers: Required value]"),
        (_wider_selector, True, 'spec.selector: Invalid value: v1.LabelSelector{MatchLabels:map[string]string{"app":"web", "tier":"x"}, MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: field is immutable'),
        (_no_selector, True, f'[spec.selector: Required value, spec.template.metadata.labels: Invalid value: map[string]string{{"app":"web"}}: {_MISMATCH}, spec.selector: Invalid value: "null": field is immutable]'),
    ],
    ids=["no-selector", "other-selector", "empty-selector", "template-label", "no-template",
         "selector-changed", "selector-removed"],
)  # fmt: skip
def test_validation_messages_are_the_apiservers_own(
    deployments: Resource, change: Any, update: bool, message: str
) -> None:
    # Worded, ordered and with values printed as a v1.20.2 apiserver does (tests/k8s_real.py):
    # Go's %#v of maps and selectors, the template's labels at spec.template.labels, and on an
    # update the object's errors and then the update's.
    body = deployment(name="web")
    if update:
        deployments.server_side_apply(body=deployment(), field_manager="shipyard", namespace=NS)
    change(body)
    with pytest.raises(dyn_errors.UnprocessibleEntityError) as caught:
        deployments.server_side_apply(body=body, field_manager="shipyard", namespace=NS)
    assert status_of(caught.value)["message"] == f'Deployment.apps "web" is invalid: {message}'


def test_applying_a_list_item_twice_is_a_500_before_any_validation(
    deployments: Resource, apps: k8s.AppsV1Api
) -> None:
    body = deployment()
    body["spec"]["template"]["spec"]["containers"].append({"name": "app", "image": "x:1"})
    with pytest.raises(dyn_errors.InternalServerError) as caught:
        deployments.server_side_apply(body=body, field_manager="shipyard", namespace=NS)
    # Server-side apply cannot merge the list; the apiserver's Status has no reason.
    assert status_of(caught.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "failed to create typed patch object: .spec.template.spec.containers: "
        'duplicate entries for key [name="app"]',
        "code": 500,
    }
    assert apps.list_namespaced_deployment(NS).items == []
    # A create is validated instead: the duplicate is a 422 there.
    with pytest.raises(ApiException) as created:
        apps.create_namespaced_deployment(NS, body)
    assert status_of(created.value)["message"].endswith(
        'spec.template.spec.containers[1].name: Duplicate value: "app"'
    )


def test_an_object_nobody_manages_is_given_to_before_first_apply_by_an_apply(
    fake: FakeKube, dyn: DynamicClient
) -> None:
    # The apiserver gives what an object nobody manages holds (here: a namespace made inside
    # the server, or one whose only applier owned no field) to an Update manager of its own,
    # at the first apply: that apply is a change, the next identical one is not.
    namespaces = dyn.resources.get(api_version="v1", kind="Namespace")
    fake.add_namespace("team")
    before = namespaces.get(name="team")
    assert "managedFields" not in before.metadata
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}}
    first = namespaces.server_side_apply(body=body, field_manager="shipyard")
    assert first.metadata.resourceVersion != before.metadata.resourceVersion
    (entry,) = first.to_dict()["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"]) == ("before-first-apply", "Update")
    assert entry["fieldsV1"]["f:spec"] == {"f:finalizers": {}}
    again = namespaces.server_side_apply(body=body, field_manager="shipyard")
    assert again.metadata.resourceVersion == first.metadata.resourceVersion


def test_a_secrets_string_data_is_owned_and_written_at_every_apply(dyn: DynamicClient) -> None:
    # stringData is folded into data and never stored, yet its applier owns it, and each apply
    # of it is a write (a new resourceVersion), as on the apiserver.
    secrets = dyn.resources.get(api_version="v1", kind="Secret")
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "key"},
            "stringData": {"token": "s3cr3t"}}  # fmt: skip
    first = secrets.server_side_apply(body=body, field_manager="shipyard", namespace=NS).to_dict()
    assert first["data"] == {"token": "czNjcjN0"}
    assert "stringData" not in first
    (entry,) = first["metadata"]["managedFields"]
    assert (entry["manager"], entry["fieldsV1"]) == ("shipyard", {"f:stringData": {"f:token": {}}})
    again = secrets.server_side_apply(body=body, field_manager="shipyard", namespace=NS).to_dict()
    assert int(again["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    assert again["data"] == first["data"]


def test_missing_objects_and_unknown_resources_are_404(
    deployments: Resource, dyn: DynamicClient, core: k8s.CoreV1Api
) -> None:
    with pytest.raises(dyn_errors.NotFoundError) as caught:
        deployments.get(name="nope", namespace=NS)
    assert status_of(caught.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'deployments.apps "nope" not found',
        "reason": "NotFound",
        "details": {"name": "nope", "group": "apps", "kind": "deployments"},
        "code": 404,
    }
    with pytest.raises(dyn_errors.NotFoundError) as caught:
        dyn.request("get", "/apis/apps/v1/namespaces/default/widgets")
    assert status_of(caught.value)["message"] == "the server could not find the requested resource"
    with pytest.raises(ApiException) as typed:
        core.read_namespaced_config_map("nope", NS)
    assert typed.value.status == 404
    with pytest.raises(dyn_errors.NotFoundError) as caught:
        deployments.server_side_apply(
            body=deployment(), field_manager="shipyard", namespace="missing"
        )
    assert status_of(caught.value)["message"] == 'namespaces "missing" not found'


def test_apply_accepts_a_yaml_body(api: k8s.ApiClient, apps: k8s.AppsV1Api) -> None:
    manifest = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: app
          image: nginx:1.25
"""
    # The client's own transport, sending the manifest text as kubectl does.
    response = api.rest_client.request(
        "PATCH",
        f"{api.configuration.host}/apis/apps/v1/namespaces/default/deployments/web"
        "?fieldManager=kubectl",
        headers={
            "Content-Type": "application/apply-patch+yaml; charset=utf-8",
            "Authorization": api.configuration.auth_settings()["BearerToken"]["value"],
        },
        body=manifest,
    )
    assert response.status == 201
    found = apps.read_namespaced_deployment("web", NS)
    assert found.spec.template.spec.containers[0].image == "nginx:1.25"
    assert [m.manager for m in found.metadata.managed_fields] == ["kubectl"]


def test_dynamic_client_watch_and_status_subresource(fake: FakeKube, deployments: Resource) -> None:
    fake.script_rollout(NS, "web", "success", delay=0.2)
    deployments.server_side_apply(body=deployment(), field_manager="shipyard", namespace=NS)
    seen = []
    for event in deployments.watch(namespace=NS, name="web", timeout=3):
        seen.append(event["type"])
        if event["object"].status.availableReplicas == 2:
            break
    assert seen[0] == "ADDED"
    assert "MODIFIED" in seen
    status = deployments.status.get(name="web", namespace=NS)
    assert status.status.observedGeneration == status.metadata.generation == 1
    assert fake.requests[-1].path == "/apis/apps/v1/namespaces/default/deployments/web/status"


def test_dry_run_apply_stores_nothing(deployments: Resource, apps: k8s.AppsV1Api) -> None:
    preview = deployments.server_side_apply(
        body=deployment(), field_manager="shipyard", namespace=NS, dry_run="All"
    )
    assert preview.spec.replicas == 2
    assert apps.list_namespaced_deployment(NS).items == []


# --------------------------------------------------------------------------- rollouts


def test_rollout_success(
    fake: FakeKube, deployments: Resource, apps: k8s.AppsV1Api, core: k8s.CoreV1Api
) -> None:
    fake.script_rollout(NS, "web", "success", delay=0.3)
    deployments.server_side_apply(
        body=deployment(replicas=2), field_manager="shipyard", namespace=NS
    )
    early = apps.read_namespaced_deployment_status("web", NS)
    assert not early.status.available_replicas
    done = wait_for(lambda: rolled_out(apps), what="rollout")
    assert condition(done, "Available").status == "True"
    progressing = condition(done, "Progressing")
    assert (progressing.status, progressing.reason) == ("True", "NewReplicaSetAvailable")
    assert done.status.ready_replicas == 2

    pods = core.list_namespaced_pod(NS, label_selector="app=web").items
    assert len(pods) == 2
    (rs,) = apps.list_namespaced_replica_set(NS, label_selector="app=web").items
    template_hash = rs.metadata.labels["pod-template-hash"]
    for pod in pods:
        assert pod.metadata.name.startswith(f"web-{template_hash}-")
        assert pod.status.phase == "Running"
        assert condition(pod, "Ready").status == "True"
        assert pod.metadata.owner_references[0].name == rs.metadata.name
    assert done.metadata.annotations["deployment.kubernetes.io/revision"] == "1"


def test_unscripted_rollout_succeeds_quickly_and_updates_replace_pods(
    deployments: Resource, apps: k8s.AppsV1Api, core: k8s.CoreV1Api
) -> None:
    deployments.server_side_apply(body=deployment(), field_manager="shipyard", namespace=NS)
    wait_for(lambda: rolled_out(apps), timeout=1.0, what="default rollout")
    old_pods = {p.metadata.name for p in core.list_namespaced_pod(NS).items}

    deployments.server_side_apply(
        body=deployment(image="nginx:1.26"), field_manager="shipyard", namespace=NS
    )
    done = wait_for(lambda: rolled_out(apps), timeout=1.0, what="update rollout")
    assert done.metadata.generation == 2
    assert done.metadata.annotations["deployment.kubernetes.io/revision"] == "2"
    new_pods = core.list_namespaced_pod(NS, label_selector="app=web").items
    assert len(new_pods) == 2
    assert not old_pods & {p.metadata.name for p in new_pods}
    assert {p.spec.containers[0].image for p in new_pods} == {"nginx:1.26"}
    sets = apps.list_namespaced_replica_set(NS).items
    assert sorted(rs.spec.replicas for rs in sets) == [0, 2]


def test_slow_rollout_reports_progress_through_a_watch(
    fake: FakeKube, deployments: Resource, apps: k8s.AppsV1Api
) -> None:
    fake.script_rollout(NS, "web", "slow", delay=0.6)
    started = time.monotonic()
    applied = deployments.server_side_apply(
        body=deployment(replicas=3), field_manager="shipyard", namespace=NS
    )
    ready_counts = []
    watcher = watch.Watch()
    for event in watcher.stream(
        apps.list_namespaced_deployment,
        NS,
        field_selector="metadata.name=web",
        resource_version=applied.metadata.resourceVersion,  # every change after the apply
        timeout_seconds=3,
    ):
        found = event["object"]
        assert found.metadata.name == "web"
        ready_counts.append(found.status.ready_replicas or 0)
        if found.status.observed_generation == 1 and found.status.available_replicas == 3:
            watcher.stop()
    assert time.monotonic() - started >= 0.5
    assert ready_counts[-1] == 3
    assert {1, 2} <= set(ready_counts)
    assert ready_counts == sorted(ready_counts)


def test_deadline_rollout_reports_progress_deadline_exceeded(
    fake: FakeKube, deployments: Resource, apps: k8s.AppsV1Api, core: k8s.CoreV1Api
) -> None:
    fake.script_rollout(NS, "web", "deadline", delay=0.2, pod_reason="ImagePullBackOff")
    deployments.server_side_apply(
        body=deployment(replicas=2), field_manager="shipyard", namespace=NS
    )

    found = wait_for(lambda: deadline_exceeded(apps), what="progress deadline")
    progressing = condition(found, "Progressing")
    assert progressing.reason == "ProgressDeadlineExceeded"
    rs_name = apps.list_namespaced_replica_set(NS).items[0].metadata.name
    assert progressing.message == f'ReplicaSet "{rs_name}" has timed out progressing.'
    assert condition(found, "Available").status == "False"
    assert found.status.observed_generation == found.metadata.generation
    assert found.status.unavailable_replicas == 2

    not_ready = [
        pod
        for pod in core.list_namespaced_pod(NS, label_selector="app=web").items
        if condition(pod, "Ready").status != "True"
    ]
    assert len(not_ready) == 2
    waiting = not_ready[0].status.container_statuses[0].state.waiting
    assert waiting.reason == "ImagePullBackOff"


def test_stuck_rollout_is_observed_but_never_progresses(
    fake: FakeKube, deployments: Resource, apps: k8s.AppsV1Api
) -> None:
    fake.script_rollout(NS, "web", "stuck")
    deployments.server_side_apply(
        body=deployment(replicas=2), field_manager="shipyard", namespace=NS
    )

    def progressing() -> Any:
        found = apps.read_namespaced_deployment_status("web", NS)
        cond = condition(found, "Progressing")
        return found if cond is not None and cond.reason == "ReplicaSetUpdated" else None

    # Created the ReplicaSet, then (next sync, its pods made) "progressing", as the controller
    # says; then nothing, however long one waits.
    found = wait_for(progressing, what="Progressing ReplicaSetUpdated")
    rs_name = apps.list_namespaced_replica_set(NS).items[0].metadata.name
    assert condition(found, "Progressing").message == f'ReplicaSet "{rs_name}" is progressing.'
    assert found.status.updated_replicas == 2
    assert not found.status.ready_replicas
    assert condition(found, "Progressing").status == "True"
    assert condition(found, "Available").status == "False"


def test_scaling_up_a_stuck_deployment_keeps_the_ready_pods_ready(
    fake: FakeKube, deployments: Resource, apps: k8s.AppsV1Api, core: k8s.CoreV1Api
) -> None:
    deployments.server_side_apply(
        body=deployment(replicas=2), field_manager="shipyard", namespace=NS
    )
    wait_for(lambda: rolled_out(apps), what="first rollout")
    fake.script_rollout(NS, "web", "stuck", pod_reason="CrashLoopBackOff")
    deployments.server_side_apply(
        body=deployment(replicas=3), field_manager="shipyard", namespace=NS
    )

    def observed() -> Any:
        found = apps.read_namespaced_deployment_status("web", NS)
        return found if found.status.observed_generation == 2 else None

    found = wait_for(observed, what="scale-up observed")
    assert (found.status.updated_replicas, found.status.ready_replicas) == (3, 2)
    # maxUnavailable 25% of 3 rounds down to 0, so 2 available of 3 is not "Available".
    assert condition(found, "Available").status == "False"
    pods = core.list_namespaced_pod(NS, label_selector="app=web").items
    waiting = [p for p in pods if not p.status.container_statuses[0].ready]
    assert len(waiting) == 1
    assert waiting[0].status.container_statuses[0].state.waiting.reason == "CrashLoopBackOff"
    assert waiting[0].status.container_statuses[0].restart_count > 0


def test_statefulset_rollout(api: k8s.ApiClient, dyn: DynamicClient, core: k8s.CoreV1Api) -> None:
    body = deployment(name="db", replicas=2)
    body["kind"] = "StatefulSet"
    body["spec"]["serviceName"] = "db"
    statefulsets = dyn.resources.get(api_version="apps/v1", kind="StatefulSet")
    statefulsets.server_side_apply(body=body, field_manager="shipyard", namespace=NS)
    apps = k8s.AppsV1Api(api)

    def done() -> Any:
        found = apps.read_namespaced_stateful_set_status("db", NS)
        status = found.status
        finished = (
            status.observed_generation == found.metadata.generation
            and status.ready_replicas == 2
            and status.current_revision == status.update_revision
        )
        return found if finished else None

    first = wait_for(done, what="statefulset")
    assert sorted(p.metadata.name for p in core.list_namespaced_pod(NS).items) == ["db-0", "db-1"]

    body["spec"]["template"]["spec"]["containers"][0]["image"] = "nginx:1.26"
    statefulsets.server_side_apply(body=body, field_manager="shipyard", namespace=NS)
    second = wait_for(
        lambda: (s := done()) and s.metadata.generation == 2 and s, what="statefulset update"
    )
    assert second.status.update_revision != first.status.update_revision
    assert second.status.updated_replicas == 2


@pytest.mark.parametrize("fake", [{"nodes": 2}], indirect=True)
def test_daemonset_rollout(
    fake: FakeKube, dyn: DynamicClient, apps: k8s.AppsV1Api, core: k8s.CoreV1Api
) -> None:
    body = deployment(name="agent", replicas=None)
    body["kind"] = "DaemonSet"
    fake.script_rollout(NS, "agent", "success", delay=0.1)
    daemonsets = dyn.resources.get(api_version="apps/v1", kind="DaemonSet")
    daemonsets.server_side_apply(body=body, field_manager="shipyard", namespace=NS)

    def done() -> Any:
        status = apps.read_namespaced_daemon_set_status("agent", NS).status
        return status if status.number_available == status.desired_number_scheduled else None

    status = wait_for(done, what="daemonset")
    assert status.desired_number_scheduled == 2
    assert status.updated_number_scheduled == 2
    nodes = {
        p.spec.node_name for p in core.list_namespaced_pod(NS, label_selector="app=agent").items
    }
    assert nodes == {"fake-node-1", "fake-node-2"}


@pytest.mark.parametrize("fake", [{"nodes": 2}], indirect=True)
def test_pods_that_fit_no_node_stay_pending_until_the_progress_deadline(
    fake: FakeKube, deployments: Resource, apps: k8s.AppsV1Api, core: k8s.CoreV1Api
) -> None:
    # Whatever the script says: a nodeSelector no fake node has leaves the pods Pending, as the
    # scheduler leaves them, and the Deployment's own progressDeadlineSeconds runs out.
    body = deployment(replicas=2, progressDeadlineSeconds=1)
    body["spec"]["template"]["spec"]["nodeSelector"] = {"pool": "gpu"}
    started = time.monotonic()
    deployments.server_side_apply(body=body, field_manager="shipyard", namespace=NS)
    found = wait_for(lambda: deadline_exceeded(apps), timeout=10, what="progress deadline")
    assert time.monotonic() - started >= 1.0
    assert condition(found, "Progressing").reason == "ProgressDeadlineExceeded"
    pods = core.list_namespaced_pod(NS, label_selector="app=web").items
    assert len(pods) == 2
    for pod in pods:
        assert pod.spec.node_name is None
        assert pod.status.phase == "Pending"
        assert pod.status.container_statuses is None
        (scheduled,) = pod.status.conditions
        assert (scheduled.type, scheduled.status, scheduled.reason) == (
            "PodScheduled", "False", "Unschedulable",
        )  # fmt: skip
        assert scheduled.message == (
            "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity."
        )

    # A selector a node matches schedules the pods there (hostname, os and arch labels).
    body["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "fake-node-2"}
    deployments.server_side_apply(body=body, field_manager="shipyard", namespace=NS)
    wait_for(lambda: rolled_out(apps), what="rollout on fake-node-2")
    ready = [p for p in core.list_namespaced_pod(NS, label_selector="app=web").items
             if p.status.phase == "Running"]  # fmt: skip
    assert {p.spec.node_name for p in ready} == {"fake-node-2"}


@pytest.mark.parametrize("fake", [{"nodes": 2}], indirect=True)
def test_a_daemonset_runs_on_the_nodes_its_selector_matches(
    fake: FakeKube, dyn: DynamicClient, apps: k8s.AppsV1Api, core: k8s.CoreV1Api
) -> None:
    body = deployment(name="agent", replicas=None)
    body["kind"] = "DaemonSet"
    body["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "fake-node-1"}
    daemonsets = dyn.resources.get(api_version="apps/v1", kind="DaemonSet")
    daemonsets.server_side_apply(body=body, field_manager="shipyard", namespace=NS)

    def done() -> Any:
        status = apps.read_namespaced_daemon_set_status("agent", NS).status
        return status if status.observed_generation and status.number_available == 1 else None

    status = wait_for(done, what="daemonset")
    assert status.desired_number_scheduled == 1
    pods = core.list_namespaced_pod(NS, label_selector="app=agent").items
    assert [p.spec.node_name for p in pods] == ["fake-node-1"]


def test_deleting_a_deployment_cascades_to_replicasets_and_pods(
    deployments: Resource, apps: k8s.AppsV1Api, core: k8s.CoreV1Api
) -> None:
    deployments.server_side_apply(body=deployment(), field_manager="shipyard", namespace=NS)
    wait_for(lambda: rolled_out(apps))
    status = apps.delete_namespaced_deployment("web", NS, propagation_policy="Foreground")
    # V1Status before client v37, a plain dict from v37 on.
    assert apps.api_client.sanitize_for_serialization(status)["status"] == "Success"
    assert apps.list_namespaced_replica_set(NS).items == []
    assert core.list_namespaced_pod(NS).items == []


# --------------------------------------------------------------------------- jobs


def test_job_success_with_followed_logs(
    fake: FakeKube, batch: k8s.BatchV1Api, core: k8s.CoreV1Api
) -> None:
    fake.script_job(
        NS,
        "migrate",
        logs=["migrating 1/2", "migrating 2/2", "done"],
        succeed=True,
        delay=0.8,
        start_delay=0.5,
    )
    batch.create_namespaced_job(NS, job())
    pods = wait_for(lambda: core.list_namespaced_pod(NS, label_selector="job-name=migrate").items)
    (pod,) = pods
    name = pod.metadata.name
    assert name.startswith("migrate-")
    assert len(name) == len("migrate-") + 5
    with pytest.raises(ApiException) as early:
        core.read_namespaced_pod_log(name, NS)
    assert early.value.status == 400
    assert status_of(early.value)["message"] == (
        f'container "main" in pod "{name}" is waiting to start: ContainerCreating'
    )

    wait_for(lambda: core.read_namespaced_pod(name, NS).status.phase == "Running")
    followed = list(watch.Watch().stream(core.read_namespaced_pod_log, name=name, namespace=NS))
    assert followed == ["migrating 1/2", "migrating 2/2", "done"]

    def complete() -> Any:
        found = batch.read_namespaced_job_status("migrate", NS)
        return found if condition(found, "Complete") else None

    finished = wait_for(complete, what="job completion")
    assert finished.status.succeeded == 1
    assert not finished.status.active
    assert core.read_namespaced_pod(name, NS).status.phase == "Succeeded"
    assert core.read_namespaced_pod_log(name, NS) == "migrating 1/2\nmigrating 2/2\ndone\n"
    assert core.read_namespaced_pod_log(name, NS, tail_lines=1) == "done\n"


def test_job_failure(
    fake: FakeKube, dyn: DynamicClient, batch: k8s.BatchV1Api, core: k8s.CoreV1Api
) -> None:
    fake.script_job(
        NS, "migrate", logs=["connecting", "error: relation exists"], succeed=False, delay=0.2
    )
    jobs = dyn.resources.get(api_version="batch/v1", kind="Job")
    jobs.server_side_apply(body=job(), field_manager="shipyard", namespace=NS)

    def failed() -> Any:
        found = batch.read_namespaced_job_status("migrate", NS)
        return found if condition(found, "Failed") else None

    found = wait_for(failed, what="job failure")
    cond = condition(found, "Failed")
    assert (cond.status, cond.reason) == ("True", "BackoffLimitExceeded")
    assert found.status.failed == 1
    (pod,) = core.list_namespaced_pod(NS, label_selector="job-name=migrate").items
    assert pod.status.phase == "Failed"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 1
    assert core.read_namespaced_pod_log(pod.metadata.name, NS) == (
        "connecting\nerror: relation exists\n"
    )


def test_job_deletion_propagation_and_ttl(
    fake: FakeKube, batch: k8s.BatchV1Api, core: k8s.CoreV1Api
) -> None:
    for name in ("one", "two", "three"):
        fake.script_job(NS, name, delay=0.1)
    batch.create_namespaced_job(NS, job("one"))
    batch.create_namespaced_job(NS, job("two"))
    batch.create_namespaced_job(NS, job("three", ttlSecondsAfterFinished=0))

    def pods_of(name: str) -> list[k8s.V1Pod]:
        return core.list_namespaced_pod(NS, label_selector=f"job-name={name}").items

    wait_for(lambda: pods_of("one") and pods_of("two"))
    batch.delete_namespaced_job("one", NS, propagation_policy="Background")
    assert pods_of("one") == []
    batch.delete_namespaced_job("two", NS)  # batch/v1 Jobs orphan their pods by default
    (orphan,) = pods_of("two")
    assert not orphan.metadata.owner_references

    wait_for(
        lambda: not batch.list_namespaced_job(NS, field_selector="metadata.name=three").items,
        what="ttl expiry",
    )
    assert pods_of("three") == []


# --------------------------------------------------------------------------- watch & list


def test_watch_from_resource_version_with_field_selector_and_timeout(
    core: k8s.CoreV1Api,
) -> None:
    start = core.list_namespaced_config_map(NS).metadata.resource_version
    for name in ("a", "b"):
        core.create_namespaced_config_map(NS, {"metadata": {"name": name}, "data": {"k": "1"}})
    core.patch_namespaced_config_map("a", NS, {"data": {"k": "2"}})
    core.delete_namespaced_config_map("a", NS)

    started = time.monotonic()
    events = [
        (e["type"], e["object"].metadata.name, (e["object"].data or {}).get("k"))
        for e in watch.Watch().stream(
            core.list_namespaced_config_map,
            NS,
            resource_version=start,
            field_selector="metadata.name=a",
            timeout_seconds=1,
        )
    ]
    assert events == [("ADDED", "a", "1"), ("MODIFIED", "a", "2"), ("DELETED", "a", "2")]
    assert 0.9 <= time.monotonic() - started < 2.5

    page = core.list_namespaced_config_map(NS, limit=1)
    assert [c.metadata.name for c in page.items] == ["b"]
    assert page.metadata.resource_version


# --------------------------------------------------------------------------- faults


def test_forbidden_and_unauthorized_faults(
    fake: FakeKube, deployments: Resource, core: k8s.CoreV1Api
) -> None:
    fake.set_fault("403", path_prefix="/apis/apps/v1/namespaces/default/deployments")
    with pytest.raises(dyn_errors.ForbiddenError) as caught:
        deployments.server_side_apply(body=deployment(), field_manager="shipyard", namespace=NS)
    assert status_of(caught.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'deployments.apps "web" is forbidden: User "system:anonymous" cannot patch '
        'resource "deployments" in API group "apps" in the namespace "default"',
        "reason": "Forbidden",
        "details": {"name": "web", "group": "apps", "kind": "deployments"},
        "code": 403,
    }
    assert core.list_namespaced_pod(NS).items == []  # other paths are untouched

    fake.fault = "401"
    with pytest.raises(ApiException) as typed:
        core.list_namespaced_pod(NS)
    assert typed.value.status == 401
    assert status_of(typed.value)["reason"] == "Unauthorized"

    fake.set_fault("500", times=1)
    with pytest.raises(ApiException) as typed:
        core.list_namespaced_pod(NS)
    assert typed.value.status == 500
    assert core.list_namespaced_pod(NS).items == []
    assert fake.fault is None


def test_requests_without_the_token_are_unauthorized(fake: FakeKube, tmp_path: Path) -> None:
    with connect(fake.write_kubeconfig(tmp_path / "wrong", token="wrong-token")) as wrong:
        with pytest.raises(ApiException) as caught:
            k8s.CoreV1Api(wrong).list_namespaced_pod(NS)
    assert caught.value.status == 401
    assert status_of(caught.value)["message"] == "Unauthorized"


def test_hang_fault_times_out_on_the_client(fake: FakeKube, core: k8s.CoreV1Api) -> None:
    fake.fault = "hang"
    # A (connect, read) tuple: clients before v36 silently ignore a float timeout.
    started = time.monotonic()
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        core.create_namespaced_config_map(
            NS, {"metadata": {"name": "x"}}, _request_timeout=(0.3, 0.3)
        )
    assert time.monotonic() - started < 1.0
    # GETs are retried by urllib3 (3 retries by default), each within the timeout.
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        core.list_namespaced_pod(NS, _request_timeout=(0.15, 0.15))


def test_drop_fault_closes_the_connection(fake: FakeKube, core: k8s.CoreV1Api) -> None:
    fake.fault = "drop"
    with pytest.raises(urllib3.exceptions.ProtocolError):
        core.create_namespaced_config_map(NS, {"metadata": {"name": "x"}})
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        core.list_namespaced_pod(NS)
    fake.fault = None
    assert core.list_namespaced_pod(NS).items == []


# --------------------------------------------------------------------------- process & TLS


def _post(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_separate_process_with_control_endpoint(tmp_path: Path) -> None:
    kubeconfig, ready = tmp_path / "kubeconfig", tmp_path / "ready"
    process = subprocess.Popen(
        [
            sys.executable,
            str(KUBEFAKE),
            "--port",
            "0",
            "--kubeconfig",
            str(kubeconfig),
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(ready.exists, timeout=10, what="kubefake process")
        base = f"http://127.0.0.1:{int(ready.read_text())}"
        assert process.stdout is not None
        assert process.stdout.readline().strip() == base
        assert json.loads(kubeconfig.read_text())["clusters"][0]["cluster"]["server"] == base

        _post(
            f"{base}/_fake/script",
            {"kind": "rollout", "namespace": NS, "name": "web", "mode": "deadline", "delay": 0.1},
        )
        with connect(kubeconfig) as api:
            dyn = DynamicClient(api, cache_file=str(tmp_path / "discovery.json"))
            deployments = dyn.resources.get(api_version="apps/v1", kind="Deployment")
            deployments.server_side_apply(body=deployment(), field_manager="shipyard", namespace=NS)
            apps = k8s.AppsV1Api(api)
            wait_for(lambda: deadline_exceeded(apps), what="progress deadline")

            _post(f"{base}/_fake/fault", {"mode": "403", "path_prefix": "/api/v1"})
            with pytest.raises(ApiException) as caught:
                k8s.CoreV1Api(api).list_namespaced_pod(NS)
            assert caught.value.status == 403
            _post(f"{base}/_fake/fault", {"mode": None})
            assert len(k8s.CoreV1Api(api).list_namespaced_pod(NS).items) == 2

        with urllib.request.urlopen(f"{base}/_fake/requests", timeout=5) as response:
            logged = json.loads(response.read())["requests"]
        applies = [r for r in logged if r["method"] == "PATCH"]
        assert applies[0]["query"]["fieldManager"] == "shipyard"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=5) == 0
        finally:
            if process.poll() is None:
                process.kill()
            if process.stdout is not None:
                process.stdout.close()


def test_https_with_a_trusted_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
        str(server_pem)
    )
    before = set(threading.enumerate())
    with FakeKube(certfile=server_pem, ca_pem=ca.cert_pem.bytes()) as fake:
        assert fake.url.startswith("https://127.0.0.1:")
        kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
        cluster = json.loads(kubeconfig.read_text())["clusters"][0]["cluster"]
        assert cluster["certificate-authority-data"]
        with connect(kubeconfig) as api:
            assert api.configuration.verify_ssl
            dyn = DynamicClient(api, cache_file=str(tmp_path / "discovery.json"))
            deployments = dyn.resources.get(api_version="apps/v1", kind="Deployment")
            deployments.server_side_apply(body=deployment(), field_manager="shipyard", namespace=NS)
            wait_for(lambda: rolled_out(k8s.AppsV1Api(api)))
            lines = []
            watcher = watch.Watch()
            for event in watcher.stream(
                k8s.CoreV1Api(api).list_namespaced_pod, NS, timeout_seconds=2
            ):
                lines.append(event["object"].metadata.name)
                if len(lines) == 2:
                    watcher.stop()
            assert len(lines) == 2

        untrusting = json.loads(kubeconfig.read_text())
        del untrusting["clusters"][0]["cluster"]["certificate-authority-data"]
        (tmp_path / "untrusting").write_text(json.dumps(untrusting))
        with connect(tmp_path / "untrusting") as api:
            with pytest.raises(urllib3.exceptions.MaxRetryError) as caught:
                k8s.VersionApi(api).get_code()
            assert isinstance(caught.value.reason, urllib3.exceptions.SSLError)
        assert fake.server_errors == []
    assert [t for t in threading.enumerate() if t not in before] == []
