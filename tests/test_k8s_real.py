"""Kubernetes steps against a real control plane: v1.20.2 on loopback (tests/k8s_real.py).

What the fake (tests/kubefake.py) cannot tell: server-side apply field ownership, the server's
own validation, controllers moving status along, RBAC refusals. The plane (tests/k8s_backends.py)
is started once per test session, on the worker that runs the xdist group ``k8s-real``, and
shared with the real-backed half of tests/test_kubernetes.py. Set SHIPYARD_SKIP_K8S_REAL=1 to
skip them on a machine that cannot build it; CI never does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.xdist_group("k8s-real"), pytest.mark.slow]  # as k8s_backends.REAL

#: tests/k8s_backends.py: the ``plane`` fixture (one per process), shared with test_kubernetes.py.
pytest_plugins = ["k8s_backends"]

SHIPYARD = Path(sys.executable).parent / "shipyard"

APP = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
data:
  version: "${DEPLOYMENT_VERSION}"
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  progressDeadlineSeconds: 8
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          image: registry.example/web:${DEPLOYMENT_VERSION}
"""


@pytest.fixture
def api(plane: dict[str, Any]) -> Any:
    from kubernetes import client
    from kubernetes import config

    return client.ApiClient(config.new_client_from_config(plane["kubeconfig"]).configuration)


@pytest.fixture
def namespace(api: Any) -> str:
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    return name


class Project:
    def __init__(self, root: Path, plane: dict[str, Any], namespace: str) -> None:
        self.root, self.ns = root, namespace
        (root / "k8s").mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
        self.env |= {"KUBECONFIG": plane["kubeconfig"], "NO_COLOR": "1",
                     "XDG_CACHE_HOME": str(root / "cache")}  # fmt: skip

    def pipelines(self, steps: str, rollback: str = "manual") -> None:
        (self.root / "pipelines.py").write_text(textwrap.dedent(f"""
            import shipyard as sy

            @sy.pipeline(rollback={rollback!r})
            def web(d):
                return [sy.stage("release", {steps})]
            """))  # fmt: skip

    def manifest(self, text: str, name: str = "app.yaml") -> None:
        (self.root / "k8s" / name).write_text(text)

    def run(self, *args: str, context: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        argv = [str(SHIPYARD), "--history", str(self.root / "h.db"), *args]
        if context:
            env["SHIPYARD_TEST_CONTEXT"] = context
        return subprocess.run(argv, cwd=self.root, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    def history(self) -> list[dict[str, Any]]:
        r = self.run("history", "--json")
        assert r.returncode == 0, r.stderr
        return list(json.loads(r.stdout))


@pytest.fixture
def project(tmp_path: Path, plane: dict[str, Any], namespace: str) -> Project:
    return Project(tmp_path, plane, namespace)


def _deployment(api: Any, namespace: str, name: str = "web") -> Any:
    from kubernetes import client

    return client.AppsV1Api(api).read_namespaced_deployment(name, namespace)


def test_apply_waits_for_a_real_rollout_and_rolls_an_update(project: Project, api: Any) -> None:
    project.manifest(APP)
    project.pipelines(f'sy.kubernetes("k8s/app.yaml", namespace={project.ns!r}, timeout=60)')
    first = project.run("deploy", "web", "1.0", "-e", "prod")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"deployment.apps/web created (namespace {project.ns})" in first.stdout
    assert "successfully rolled out" in first.stdout
    dep = _deployment(api, project.ns)
    assert dep.status.available_replicas == 2
    assert dep.metadata.managed_fields[0].manager == "shipyard"
    second = project.run("deploy", "web", "1.1", "-e", "prod")
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"deployment.apps/web configured (namespace {project.ns})" in second.stdout
    assert _deployment(api, project.ns).spec.template.spec.containers[0].image == (
        "registry.example/web:1.1"
    )


def test_a_field_owned_by_another_manager_is_a_named_conflict(project: Project, api: Any) -> None:
    from kubernetes import client

    # Another tool (kubectl edit, say) set data.owner with its own field manager.
    client.CoreV1Api(api).create_namespaced_config_map(
        project.ns, {"metadata": {"name": "settings"}, "data": {"owner": "ops"}},
        field_manager="kubectl-edit",
    )  # fmt: skip
    project.manifest(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  owner: shipyard\n",
        "settings.yaml",
    )
    project.pipelines(f'sy.kubernetes("k8s/settings.yaml", namespace={project.ns!r})')
    r = project.run("deploy", "web", "1.0", "-e", "prod")
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert "configmap/settings" in out
    assert "kubectl-edit" in out, out
    assert ".data.owner" in out, out
    assert "force_conflicts=True" in out
    assert "Traceback" not in r.stdout + r.stderr
    project.pipelines(
        f'sy.kubernetes("k8s/settings.yaml", namespace={project.ns!r}, force_conflicts=True)'
    )
    forced = project.run("deploy", "web", "1.1", "-e", "prod")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    cm = client.CoreV1Api(api).read_namespaced_config_map("settings", project.ns)
    assert cm.data["owner"] == "shipyard"


def test_the_servers_own_validation_error_names_object_file_and_field(project: Project) -> None:
    project.manifest(APP.replace("matchLabels: {app: web}", "matchLabels: {app: other}"))
    project.pipelines(f'sy.kubernetes("k8s/app.yaml", namespace={project.ns!r})')
    r = project.run("deploy", "web", "1.0", "-e", "prod")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "deployment.apps/web" in r.stdout
    assert "k8s/app.yaml:8" in r.stdout, r.stdout
    assert "spec.template.metadata.labels" in r.stdout, r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    assert project.history()[0]["status"] == "failed"


def test_a_port_without_its_protocol_is_a_manifest_error_before_1_21(project: Project) -> None:
    # Kubernetes before 1.21 cannot server-side apply a list item that omits a key field, even
    # one with a default: a Service port without its protocol. The apiserver answers 500; the
    # step says it is the manifest (no "try again later, or check the cluster's health").
    # The fake serves what 1.21 and later do (protocol defaulted first), so this is real-only.
    project.manifest(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  selector: {app: web}\n"
        "  ports:\n    - port: 80\n",
        "svc.yaml",
    )
    project.pipelines(f'sy.kubernetes("k8s/svc.yaml", namespace={project.ns!r})')
    r = project.run("deploy", "web", "1.0", "-e", "prod")
    assert r.returncode == 1, r.stdout + r.stderr
    assert (
        f"cannot apply service/web (namespace {project.ns}) from k8s/svc.yaml:1: the API server "
        "cannot merge it for server-side apply (failed to create typed patch object: "
        ".spec.ports: element 0: associative list with keys has an element that omits key field "
        '"protocol"'
    ) in r.stdout, r.stdout
    assert "need every port's protocol written out (protocol: TCP)" in r.stdout
    assert "cluster's health" not in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_a_token_without_rights_is_refused_with_verb_resource_and_namespace(
    project: Project, plane: dict[str, Any]
) -> None:
    project.manifest(APP)
    project.pipelines(f'sy.kubernetes("k8s/app.yaml", namespace={project.ns!r}, context="nobody")')
    r = project.run("deploy", "web", "1.0", "-e", "prod")
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert "forbidden" in out.lower(), out
    assert project.ns in out
    assert "configmaps" in out, out
    assert "Traceback" not in out + r.stderr


def test_a_failed_rollout_is_rolled_back_to_exactly_what_ran_before(
    project: Project, api: Any
) -> None:
    # Issue 21 (and 12, item 3): 2.0 adds a nodeSelector no node has, with a variable only
    # today's files know; its rollout exceeds its deadline, and the automatic rollback must
    # re-apply what 1.0 applied, not today's files (which would fail on ${POOL}).
    project.manifest(APP)
    project.pipelines(
        f'sy.kubernetes("k8s/app.yaml", namespace={project.ns!r}, timeout=90)', rollback="auto"
    )
    first = project.run("deploy", "web", "1.0", "-e", "prod")
    assert first.returncode == 0, first.stdout + first.stderr
    project.manifest(APP.replace(
        "    spec:\n      containers:",
        "    spec:\n      nodeSelector:\n        pool: ${POOL}\n      containers:",
    ))  # fmt: skip
    second = project.run("deploy", "web", "2.0", "-e", "prod", "--var", "POOL=gpu")
    assert second.returncode == 1, second.stdout + second.stderr
    out = second.stdout
    assert "ProgressDeadlineExceeded" in out, out
    assert "pods not ready: web-" in out, out
    assert "applying the 2 object(s) deployment #1 applied, exactly" in out, out
    rows = {d["id"]: d for d in project.history()}
    assert (rows[2]["status"], rows[3]["rollback_of"], rows[3]["status"]) == (
        "failed", 2, "succeeded",
    )  # fmt: skip
    dep = _deployment(api, project.ns)
    assert dep.spec.template.spec.node_selector is None
    assert dep.spec.template.spec.containers[0].image == "registry.example/web:1.0"
    assert dep.status.available_replicas == 2


def test_a_crd_and_its_custom_resource_in_one_step(project: Project, api: Any) -> None:
    # The CRD goes first and is waited for (Established) and the API discovered again, so
    # that the custom resource after it can be applied in the same step.
    group = f"{project.ns}.example.com"
    project.manifest(textwrap.dedent(f"""\
        apiVersion: example.com/v1
        kind: Widget
        metadata:
          name: w1
        spec:
          size: 3
        ---
        apiVersion: apiextensions.k8s.io/v1
        kind: CustomResourceDefinition
        metadata:
          name: widgets.{group}
        spec:
          group: {group}
          names: {{kind: Widget, plural: widgets, singular: widget}}
          scope: Namespaced
          versions:
            - name: v1
              served: true
              storage: true
              schema:
                openAPIV3Schema:
                  type: object
                  properties:
                    spec: {{type: object, properties: {{size: {{type: integer}}}}}}
        """).replace("apiVersion: example.com/v1", f"apiVersion: {group}/v1"), "crd.yaml")  # fmt: skip
    project.pipelines(f'sy.kubernetes("k8s/crd.yaml", namespace={project.ns!r}, timeout=60)')
    r = project.run("deploy", "web", "1.0", "-e", "prod")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert out.index(f"widgets.{group} created") < out.index(f"widgets.{group} established")
    assert out.index("established") < out.index(
        f"widget.{group}/w1 created (namespace {project.ns})"
    )
    from kubernetes import client

    got = client.CustomObjectsApi(api).get_namespaced_custom_object(
        group, "v1", project.ns, "widgets", "w1"
    )
    assert got["spec"]["size"] == 3


def test_a_namespace_being_deleted_is_refused_clearly(project: Project, api: Any) -> None:
    from kubernetes import client

    core = client.CoreV1Api(api)
    # A ConfigMap with a finalizer nobody removes keeps the namespace Terminating.
    core.create_namespaced_config_map(
        project.ns, {"metadata": {"name": "hold", "finalizers": ["example.com/hold"]}}
    )
    core.delete_namespace(project.ns)
    project.manifest(APP)
    project.pipelines(f'sy.kubernetes("k8s/app.yaml", namespace={project.ns!r}, timeout=30)')
    r = project.run("deploy", "web", "1.0", "-e", "prod")
    assert r.returncode == 1, r.stdout + r.stderr
    assert (
        f"cannot apply configmap/web-config (namespace {project.ns}) from k8s/app.yaml:1: its "
        "namespace is being deleted (Terminating"
    ) in r.stdout, r.stdout
    assert "wait until it is gone and deploy again, or deploy to another namespace" in r.stdout
    assert "RBAC" not in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    # Let it go.
    core.patch_namespaced_config_map("hold", project.ns, {"metadata": {"finalizers": None}})
