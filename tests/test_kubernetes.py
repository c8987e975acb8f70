"""The ``kubernetes`` and ``kubernetes.job`` steps against Kubernetes API servers on loopback.

Nothing is mocked: the steps drive the official client against tests/kubefake.py (the fake,
real HTTP on 127.0.0.1) and, for every test that needs no pod logs, no Job and nothing only the
fake can script or count, also against a real v1.20.2 control plane (tests/k8s_real.py). Those
tests take the ``backend`` fixture (tests/k8s_backends.py; ids ``fake`` and ``real``) and work
in a namespace of their own; where part of a test inspects what only the fake records (its
request log), that part is conditional on ``backend.fake`` and the same fact is asserted on the
cluster's objects for both. The rest take ``fake`` and ``kubeconfig``.

Most tests run steps through the real runner (``Target`` from docker_fixtures, which needs no
Docker engine); the history, rollback and ``plan`` tests go through the CLI and
``DeploymentManager``, one of them with the fake in a process of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import TypeVar

import pytest
import shipyard as sy
from docker_fixtures import Outcome
from docker_fixtures import Target
from kubefake import FakeKube
from polling import wait_for
from shipyard import PipelineDefinitionError
from shipyard import Status
from shipyard.plugins.kubernetes import DONE
from shipyard.plugins.kubernetes import FAILED
from shipyard.plugins.kubernetes import WAITING
from shipyard.plugins.kubernetes import ManifestError
from shipyard.plugins.kubernetes import load_documents
from shipyard.plugins.kubernetes import render
from shipyard.plugins.kubernetes import rollout_status

if TYPE_CHECKING:  # imported by pytest as the plugin it is (pytest_plugins, below)
    from k8s_backends import Backend

RESOURCES = Path(__file__).parent / "resources" / "k8s"

#: tests/k8s_backends.py: the ``backend`` fixture (the fake or the real plane, one per process).
pytest_plugins = ["k8s_backends"]

KUBEFAKE = Path(__file__).with_name("kubefake.py")
NS = "default"
T = TypeVar("T")


# -- helpers --------------------------------------------------------------------------------------


def image_of(cluster: FakeKube | Backend, kind: str, name: str, namespace: str = NS) -> str:
    obj = cluster.get(kind, namespace, name)
    assert obj is not None, f"{kind} {namespace}/{name} does not exist"
    return str(obj["spec"]["template"]["spec"]["containers"][0]["image"])


def managers(obj: dict[str, Any] | None) -> list[tuple[str, str]]:
    """``(manager, operation)`` of an object's managedFields."""
    assert obj is not None
    return [(m["manager"], m["operation"]) for m in obj["metadata"].get("managedFields") or []]


def never_ready(manifest: Path, deadline: int | None = None) -> None:
    """Give the Deployment in ``manifest`` a nodeSelector no node has, and a
    ``progressDeadlineSeconds`` if ``deadline``: on either server its new pods stay Pending
    (Unschedulable), and the rollout times out after the deadline."""
    text = manifest.read_text()
    assert "    spec:\n      containers:" in text
    assert "spec:\n  replicas: 2\n" in text
    text = text.replace(
        "    spec:\n      containers:",
        "    spec:\n      nodeSelector:\n        pool: nowhere\n      containers:",
    )
    if deadline is not None:
        text = text.replace(
            "spec:\n  replicas: 2\n",
            f"spec:\n  replicas: 2\n  progressDeadlineSeconds: {deadline}\n",
        )
    manifest.write_text(text)


def shipyard_lines(out: Outcome) -> list[str]:
    return [t for s, t in out.lines if s == "shipyard"]


def applies(fake: FakeKube) -> list[Any]:
    return [r for r in fake.requests if r.method == "PATCH"]


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with FakeKube() as server:
        yield server
    assert server.server_errors == []


@pytest.fixture
def kubeconfig(fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """KUBECONFIG names the fake; the discovery cache lives in the test's folder."""
    path = fake.write_kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with the example manifests in ``k8s/``: relative paths start here."""
    shutil.copytree(RESOURCES, tmp_path / "project" / "k8s")
    return tmp_path / "project"


@pytest.fixture
def target() -> Target:
    return Target()


def run(target: Target, project: Path, *steps: sy.Step, **kwargs: Any) -> Outcome:
    return target.run(*steps, rootdir=project, **kwargs)


# -- rendering (no server) ------------------------------------------------------------------------


def test_render_replaces_variables_and_keeps_the_rest() -> None:
    text = "a: ${X}\nb: $${X} and $Y and ${X}\n"
    assert render(text, {"X": "1"}, "f.yaml") == "a: 1\nb: ${X} and $Y and 1\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb: ${NOPE}\n", "f.yaml:2: unknown variable ${NOPE} (known: X); pass it with --var NOPE=VALUE"),
        ("a: ${X Y}\n", "f.yaml:1: ${X Y} is not a variable reference"),
    ],
    ids=["unknown", "not-a-name"],
)  # fmt: skip
def test_render_errors_name_the_file_and_line(text: str, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        render(text, {"X": "1"}, "f.yaml")
    assert caught.value.message.startswith(message)


def test_a_value_with_a_line_break_is_refused() -> None:
    with pytest.raises(ManifestError, match=r"f.yaml:1: the value of \$\{X\} has a line break"):
        render("a: ${X}\n", {"X": "1\nb: 2"}, "f.yaml")


def test_load_documents_renders_expands_lists_and_applies_namespaces_first(project: Path) -> None:
    docs = load_documents(["k8s/multi"], project, {"CHANNEL": "beta", "DEPLOYMENT_VERSION": "7"})
    assert [(d.kind, d.name, d.namespace) for d in docs] == [
        ("Namespace", "prod", None),
        ("ConfigMap", "settings", None),
        ("ConfigMap", "prod-settings", "prod"),
        ("Secret", "api-key", None),
        ("ServiceAccount", "worker", None),
        ("StatefulSet", "db", None),
        ("DaemonSet", "agent", "prod"),
    ]
    assert [d.where for d in docs][:3] == [
        "k8s/multi/c-namespace.yaml:2",
        "k8s/multi/a-config.yaml:2",
        "k8s/multi/a-config.yaml:9",
    ]
    assert docs[1].body["data"] == {"channel": "beta"}
    assert docs[5].ref == "statefulset.apps/db"


def test_yaml_is_loaded_safely_and_timestamps_stay_text(project: Path) -> None:
    variables = {"DEPLOYMENT_VERSION": "1", "DEPLOYMENT_ENVIRONMENT": "e", "DEPLOYMENT_ID": "3"}
    config = load_documents(["k8s/app.yaml"], project, variables)[0]
    assert config.body["data"]["released"] == "2024-05-01T10:00:00Z"
    (project / "evil.yaml").write_text("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(
        ManifestError, match=r"evil.yaml:1: invalid YAML: could not determine a constructor"
    ):
        load_documents(["evil.yaml"], project, variables)


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("k8s/broken.yaml", "k8s/broken.yaml:7: invalid YAML: while parsing a flow sequence, "),
        ("k8s/unknown-variable.yaml", "k8s/unknown-variable.yaml:7: unknown variable ${RELEASE_CHANNEL}"),
        ("k8s/nope.yaml", "manifest 'k8s/nope.yaml' not found (looked for "),
    ],
    ids=["yaml", "variable", "missing"],
)  # fmt: skip
def test_manifest_errors_name_the_file(project: Path, manifest: str, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        load_documents([manifest], project, {"DEPLOYMENT_VERSION": "1"})
    assert caught.value.message.startswith(message)


# -- rollout status: the rules of `kubectl rollout status` ----------------------------------------


def _deployment(generation: int = 2, **status: Any) -> dict[str, Any]:
    return {"kind": "Deployment", "metadata": {"generation": generation},
            "spec": {"replicas": 3}, "status": status}  # fmt: skip


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (_deployment(observedGeneration=1), (WAITING, "waiting for the controller to observe the new spec")),
        (_deployment(observedGeneration=2, updatedReplicas=1, replicas=3), (WAITING, "1 of 3 new replicas have been updated")),
        (_deployment(observedGeneration=2, updatedReplicas=3, replicas=4), (WAITING, "1 old replicas are pending termination")),
        (_deployment(observedGeneration=2, updatedReplicas=3, replicas=3, availableReplicas=2), (WAITING, "2 of 3 updated replicas are available")),
        (_deployment(observedGeneration=2, updatedReplicas=3, replicas=3, availableReplicas=3), (DONE, "successfully rolled out")),
        (_deployment(observedGeneration=2, conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "too slow"}]), (FAILED, "ProgressDeadlineExceeded: too slow")),
        ({"kind": "StatefulSet", "metadata": {"generation": 1}, "spec": {"replicas": 2}, "status": {"observedGeneration": 1, "readyReplicas": 1}}, (WAITING, "1 of 2 pods are ready")),
        ({"kind": "StatefulSet", "metadata": {"generation": 1}, "spec": {"replicas": 2}, "status": {"observedGeneration": 1, "readyReplicas": 2, "updatedReplicas": 1, "currentRevision": "a", "updateRevision": "b"}}, (WAITING, "1 of 2 pods are at revision b")),
        ({"kind": "StatefulSet", "metadata": {"generation": 1}, "spec": {"replicas": 4, "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 2}}}, "status": {"observedGeneration": 1, "readyReplicas": 4, "updatedReplicas": 2}}, (DONE, "partitioned roll out complete: 2 new pods have been updated")),
        ({"kind": "StatefulSet", "metadata": {"generation": 1}, "spec": {"updateStrategy": {"type": "OnDelete"}}, "status": {}}, (DONE, "not waited for: updateStrategy OnDelete has no rollout to watch")),
        ({"kind": "DaemonSet", "metadata": {"generation": 1}, "spec": {}, "status": {"observedGeneration": 1, "desiredNumberScheduled": 3, "updatedNumberScheduled": 3, "numberAvailable": 1}}, (WAITING, "1 of 3 updated pods are available")),
        ({"kind": "DaemonSet", "metadata": {"generation": 1}, "spec": {}, "status": {"observedGeneration": 1, "desiredNumberScheduled": 3, "updatedNumberScheduled": 3, "numberAvailable": 3}}, (DONE, "successfully rolled out")),
    ],
    ids=["not-observed", "updating", "old-pending", "unavailable", "done", "deadline", "sts-ready",
         "sts-revision", "sts-partition", "sts-ondelete", "ds-unavailable", "ds-done"],
)  # fmt: skip
def test_rollout_status_follows_kubectl(obj: dict[str, Any], expected: tuple[str, str]) -> None:
    assert rollout_status(obj) == expected


# -- apply ----------------------------------------------------------------------------------------


def test_apply_server_side_applies_every_document_with_the_rendered_version(
    backend: Backend, project: Path, target: Target
) -> None:
    ns = backend.namespace
    out = run(target, project, sy.kubernetes("k8s/app.yaml"), version="1.4.2")
    assert out.status is Status.SUCCEEDED, out.error
    assert image_of(backend, "Deployment", "web", ns) == "registry.example/web:1.4.2"
    config = backend.get("ConfigMap", ns, "web-config")
    assert config is not None
    assert config["data"] == {
        "version": "1.4.2",
        "environment": "staging",
        "deployment": str(target.next_id),
        "released": "2024-05-01T10:00:00Z",
        "literal": "${NOT_A_VARIABLE} and $HOME",
    }
    # Server-side apply, field manager shipyard, for every document; never a create (which
    # would be an Update entry). A controller has an entry of its own on the real plane.
    for kind, name in [("ConfigMap", "web-config"), ("Deployment", "web"), ("Service", "web")]:
        mine = [m for m in managers(backend.get(kind, ns, name)) if m[0] == "shipyard"]
        assert mine == [("shipyard", "Apply")], kind
    if backend.fake is not None:  # and what went over the wire
        patches = applies(backend.fake)
        assert len(patches) == 3
        assert {r.content_type for r in patches} == {"application/apply-patch+yaml"}
        assert {r.query["fieldManager"] for r in patches} == {"shipyard"}
        assert "force" not in patches[0].query
        assert not [r for r in backend.fake.requests if r.method in ("POST", "PUT")]
    lines = shipyard_lines(out)
    assert lines[:3] == [
        f"configmap/web-config created (namespace {ns})",
        f"deployment.apps/web created (namespace {ns})",
        f"service/web created (namespace {ns})",
    ]
    assert lines[-1] == f"deployment.apps/web (namespace {ns}): successfully rolled out"

    again = run(target, project, sy.kubernetes("k8s/app.yaml"), version="1.4.2")
    assert again.status is Status.SUCCEEDED, again.error
    assert f"deployment.apps/web unchanged (namespace {ns})" in shipyard_lines(again)
    newer = run(target, project, sy.kubernetes("k8s/app.yaml"), version="1.5.0")
    assert newer.status is Status.SUCCEEDED, newer.error
    assert f"deployment.apps/web configured (namespace {ns})" in shipyard_lines(newer)
    assert image_of(backend, "Deployment", "web", ns) == "registry.example/web:1.5.0"


def test_namespaces_come_from_the_document_then_the_step_then_the_kubeconfig(
    backend: Backend, project: Path, target: Target
) -> None:
    # The kubeconfig context's namespace is the test's own ("team"); the manifests' Namespace
    # document and the step's namespace= get names of the test's own too.
    team, staging, prod = backend.namespace, backend.unique("staging"), backend.unique("prod")
    backend.add_namespace(staging)
    backend.created_namespace(prod)
    for path in (project / "k8s" / "multi").iterdir():
        path.write_text(
            path.read_text()
            .replace("${CHANNEL}", "beta")
            .replace("namespace: prod\n", f"namespace: {prod}\n")
            .replace("name: prod\n", f"name: {prod}\n")
        )
    if backend.fake is not None:
        backend.fake.script_rollout(prod, "agent", "slow", delay=0.2)

    out = run(target, project, sy.kubernetes("k8s/multi", timeout=60), version="2.0")
    assert out.status is Status.SUCCEEDED, out.error
    for kind, name in [("ConfigMap", "settings"), ("Secret", "api-key"),
                       ("ServiceAccount", "worker"), ("StatefulSet", "db")]:  # fmt: skip
        assert backend.get(kind, team, name) is not None, (kind, name)
    assert backend.get("ConfigMap", prod, "prod-settings") is not None
    assert image_of(backend, "DaemonSet", "agent", prod) == "registry.example/agent:2.0"
    assert backend.get("Namespace", "", prod) is not None
    lines = shipyard_lines(out)
    assert lines[0] == f"namespace/{prod} created"
    assert (
        f"statefulset.apps/db (namespace {team}): successfully rolled out (2 pods at revision "
        in "\n".join(lines)
    )
    assert f"daemonset.apps/agent (namespace {prod}): successfully rolled out" in lines

    out = run(
        target, project, sy.kubernetes("k8s/multi", namespace=staging, timeout=60), version="2.0"
    )
    assert out.status is Status.SUCCEEDED, out.error
    assert image_of(backend, "StatefulSet", "db", staging) == "registry.example/db:2.0"
    assert backend.get("ConfigMap", staging, "settings") is not None
    assert backend.get("ConfigMap", staging, "prod-settings") is None  # the document's own wins


def test_a_slow_rollout_is_followed_until_done(
    fake: FakeKube, kubeconfig: Path, project: Path, target: Target
) -> None:
    fake.script_rollout(NS, "web", "slow", delay=0.6)
    out = run(target, project, sy.kubernetes("k8s/app.yaml"), version="1")
    assert out.status is Status.SUCCEEDED, out.error
    progress = [t for t in shipyard_lines(out) if t.startswith("deployment.apps/web (namespace")]
    assert len(progress) >= 3
    assert progress[-1].endswith(": successfully rolled out")
    assert any("of 2" in t for t in progress)


def test_progress_deadline_exceeded_fails_with_the_reason_and_the_pods_not_ready(
    fake: FakeKube, kubeconfig: Path, project: Path, target: Target
) -> None:
    fake.script_rollout(NS, "web", "deadline", delay=0.2, pod_reason="ImagePullBackOff")
    out = run(target, project, sy.kubernetes("k8s/app.yaml"), version="9.9")
    assert out.status is Status.FAILED
    error = out.result.error
    assert error is not None
    pods = sorted(p["metadata"]["name"] for p in fake.list_objects("Pod", NS, "app=web"))
    assert len(pods) == 2
    assert error.startswith(
        "deployment.apps/web (namespace default) failed to roll out: ProgressDeadlineExceeded: "
        'ReplicaSet "web-'
    )
    assert "has timed out progressing.; pods not ready: " in error
    for pod in pods:
        assert f"{pod} (ImagePullBackOff)" in error
    assert error.endswith("see kubectl describe deployment.apps/web -n default")


def test_the_step_timeout_fails_with_the_controllers_reason_and_the_pods_not_ready(
    backend: Backend, project: Path, target: Target
) -> None:
    ns = backend.namespace
    never_ready(project / "k8s" / "app.yaml")
    out = run(target, project, sy.kubernetes("k8s/app.yaml", timeout=3), version="1")
    assert out.status is Status.FAILED
    error = out.result.error
    assert error is not None
    # The deployment controller's own words, as both servers put them.
    assert error.startswith(
        f"the rollout did not finish within 3s: deployment.apps/web (namespace {ns}): "
        "0 of 2 updated replicas are available (Available=False MinimumReplicasUnavailable: "
        "Deployment does not have minimum availability.; Progressing=True ReplicaSetUpdated: "
        'ReplicaSet "web-'
    ), error
    assert '" is progressing.); pods not ready: web-' in error
    pods = sorted(p["metadata"]["name"] for p in backend.list_objects("Pod", ns, "app=web"))
    assert len(pods) == 2
    for pod in pods:
        assert f"{pod} (Pending)" in error
    assert 2.0 < out.seconds < 6.0  # gives up a moment early, to say why


def test_wait_false_does_not_wait(backend: Backend, project: Path, target: Target) -> None:
    never_ready(project / "k8s" / "app.yaml")
    out = run(target, project, sy.kubernetes("k8s/app.yaml", wait=False), version="1")
    assert out.status is Status.SUCCEEDED, out.error
    assert f"deployment.apps/web created (namespace {backend.namespace})" in shipyard_lines(out)
    assert not any("rolled out" in t or "replicas" in t for t in shipyard_lines(out))


def test_a_cancelled_apply_stops_waiting_at_once(
    backend: Backend, project: Path, target: Target
) -> None:
    never_ready(project / "k8s" / "app.yaml")

    async def scenario() -> tuple[Outcome, float]:
        task = asyncio.ensure_future(target.arun(sy.kubernetes("k8s/app.yaml"), rootdir=project))
        while await asyncio.to_thread(backend.get, "Deployment", backend.namespace, "web") is None:
            assert not task.done(), task.result()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        started = time.monotonic()
        task.cancel()
        out = await task
        return out, time.monotonic() - started

    out, took = asyncio.run(scenario())
    assert out.status is Status.CANCELLED
    assert took < 3.0  # not the step's 300 s


def test_the_default_kubeconfig_and_a_merged_kubeconfig_with_a_context(
    backend: Backend,
    tmp_path: Path,
    project: Path,
    target: Target,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ns = backend.namespace
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    backend.write_kubeconfig(tmp_path / "home" / ".kube" / "config")
    out = run(target, project, sy.kubernetes("k8s/app.yaml", wait=False), version="1")
    assert out.status is Status.SUCCEEDED, out.error
    assert image_of(backend, "Deployment", "web", ns) == "registry.example/web:1"

    # KUBECONFIG=a:b merges the files, as kubectl does; context= picks one of their contexts.
    team = backend.unique("team")
    backend.add_namespace(team)
    first = backend.write_kubeconfig(tmp_path / "a")
    second = backend.write_kubeconfig(tmp_path / "b", namespace=team, context="team")
    monkeypatch.setenv("KUBECONFIG", f"{first}{os.pathsep}{second}")
    out = run(
        target, project, sy.kubernetes("k8s/app.yaml", context="team", wait=False), version="2"
    )
    assert out.status is Status.SUCCEEDED, out.error
    assert image_of(backend, "Deployment", "web", team) == "registry.example/web:2"
    assert image_of(backend, "Deployment", "web", ns) == "registry.example/web:1"


def test_a_conflict_fails_unless_force_conflicts(
    backend: Backend, project: Path, target: Target
) -> None:
    ns = backend.namespace
    first = run(target, project, sy.kubernetes("k8s/app.yaml"), version="1")
    assert first.status is Status.SUCCEEDED, first.error
    # Someone scaled the Deployment with kubectl: .spec.replicas is theirs now.
    backend.apply(
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "web", "namespace": ns}, "spec": {"replicas": 5}},
        field_manager="kubectl", force=True,
    )  # fmt: skip
    out = run(target, project, sy.kubernetes("k8s/app.yaml"), version="2")
    assert out.status is Status.FAILED
    assert out.result.error == (
        f"cannot apply deployment.apps/web (namespace {ns}) from k8s/app.yaml:14: Apply failed "
        'with 1 conflict: conflict with "kubectl": .spec.replicas; fields in the manifest are '
        "owned by another field manager: change them back there, remove them from the manifest, "
        "or pass force_conflicts=True to take them over"
    )
    assert image_of(backend, "Deployment", "web", ns) == "registry.example/web:1"
    assert ("kubectl", "Apply") in managers(backend.get("Deployment", ns, "web"))

    out = run(target, project, sy.kubernetes("k8s/app.yaml", force_conflicts=True), version="2")
    assert out.status is Status.SUCCEEDED, out.error
    forced = backend.get("Deployment", ns, "web")
    assert forced is not None
    assert forced["spec"]["replicas"] == 2
    assert image_of(backend, "Deployment", "web", ns) == "registry.example/web:2"
    # Forcing took .spec.replicas over: kubectl owned nothing else, so its entry is gone.
    assert ("kubectl", "Apply") not in managers(forced)
    if backend.fake is not None:
        assert applies(backend.fake)[-1].query["force"].lower() == "true"


# -- errors ---------------------------------------------------------------------------------------


def _stopped_server_kubeconfig(tmp_path: Path) -> Path:
    with FakeKube() as gone:
        return gone.write_kubeconfig(tmp_path / "gone-kubeconfig")


@pytest.mark.parametrize(
    ("setup", "manifest", "options", "expected"),
    [
        pytest.param("no-kubeconfig", "k8s/app.yaml", {},
                     "no kubeconfig: KUBECONFIG is not set, {home}/.kube/config does not exist, and this is not a pod in a cluster; set KUBECONFIG to your cluster's kubeconfig file",
                     id="no-kubeconfig"),
        pytest.param("missing-kubeconfig", "k8s/app.yaml", {},
                     "KUBECONFIG is '{tmp}/nope', but there is no such file; point KUBECONFIG at your cluster's kubeconfig",
                     id="missing-kubeconfig"),
        pytest.param("unreachable", "k8s/app.yaml", {},
                     "cannot reach the Kubernetes API server at http://127.0.0.1:{port} (context 'fake' of {tmp}/gone-kubeconfig): connection refused; check that the cluster is running",
                     id="unreachable"),
        pytest.param("hang", "k8s/app.yaml", {"request_timeout": 0.5},
                     "cannot reach the Kubernetes API server at http://127.0.0.1:{port} (context 'fake' of {tmp}/kubeconfig): no answer within 0.5s; check that the cluster is running",
                     id="hang"),
        pytest.param("drop", "k8s/app.yaml", {},
                     "lost the Kubernetes API server at http://127.0.0.1:{port} (context 'fake' of {tmp}/kubeconfig) while trying to apply configmap/web-config (namespace default) from k8s/app.yaml:3: the server closed the connection without answering",
                     id="drop"),
        pytest.param("403", "k8s/app.yaml", {},
                     'not allowed to apply deployment.apps/web (namespace default) from k8s/app.yaml:14 (403 Forbidden: deployments.apps "web" is forbidden: User "system:anonymous" cannot patch resource "deployments" in API group "apps" in the namespace "default"); ask a cluster admin for the RBAC permission, or use a kubeconfig context that has it',
                     id="403"),
        pytest.param("", "k8s/nope.yaml", {},
                     "manifest 'k8s/nope.yaml' not found (looked for {project}/k8s/nope.yaml, relative to the pipelines file's folder); check the path",
                     id="missing-file"),
        pytest.param("", "k8s/broken.yaml", {},
                     "k8s/broken.yaml:7: invalid YAML: while parsing a flow sequence, ",
                     id="yaml-error"),
        pytest.param("", "k8s/unknown-variable.yaml", {},
                     "k8s/unknown-variable.yaml:7: unknown variable ${{RELEASE_CHANNEL}} (known: DEPLOYMENT_ENVIRONMENT, DEPLOYMENT_ID, DEPLOYMENT_PIPELINE, DEPLOYMENT_VERSION); pass it with --var RELEASE_CHANNEL=VALUE",
                     id="unknown-variable"),
    ],
)  # fmt: skip
def test_every_error_is_one_clear_sentence(
    setup: str,
    manifest: str,
    options: dict[str, Any],
    expected: str,
    fake: FakeKube,
    kubeconfig: Path,
    project: Path,
    target: Target,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "home"
    port = fake.port
    if setup == "no-kubeconfig":
        monkeypatch.delenv("KUBECONFIG")
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("HOME", str(home))
    elif setup == "missing-kubeconfig":
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nope"))
    elif setup == "unreachable":
        gone = _stopped_server_kubeconfig(tmp_path)
        port = int(
            json.loads(gone.read_text())["clusters"][0]["cluster"]["server"].rsplit(":", 1)[1]
        )
        monkeypatch.setenv("KUBECONFIG", str(gone))
    elif setup == "403":
        fake.set_fault("403", path_prefix="/apis/apps/v1/namespaces")
    elif setup in ("hang", "drop"):
        fake.set_fault(setup, path_prefix="/api" if setup == "hang" else "/api/v1/namespaces")
    started = time.monotonic()
    out = run(target, project, sy.kubernetes(manifest, **options), version="1")
    took = time.monotonic() - started
    fake.fault = None
    assert out.status is Status.FAILED
    error = out.result.error
    assert error is not None
    assert "\n" not in error
    assert error.startswith(expected.format(home=home, tmp=tmp_path, port=port, project=project)), (
        error
    )
    assert took < 5.0


@pytest.mark.parametrize(
    ("setup", "manifest", "options", "expected"),
    [
        pytest.param("", "k8s/app.yaml", {"context": "prod"},
                     "the kubeconfig {tmp}/kubeconfig has no context 'prod' (contexts: {context}); fix the step's context= or the kubeconfig",
                     id="unknown-context"),
        pytest.param("401", "k8s/app.yaml", {},
                     "the Kubernetes API server at {server} (context '{context}' of {tmp}/kubeconfig) rejected the credentials (401 Unauthorized); log in again or renew the token in the kubeconfig",
                     id="401"),
        pytest.param("", "k8s/invalid.yaml", {},
                     'the API server refused to apply deployment.apps/web (namespace {ns}) from k8s/invalid.yaml:1 because the object is invalid: Deployment.apps "web" is invalid: [spec.selector: Required value, spec.template.metadata.labels: Invalid value: map[string]string{{"app":"web"}}: `selector` does not match template `labels`]; fix the manifest',
                     id="422"),
        pytest.param("", "k8s/widget.yaml", {},
                     "the cluster at {server} (context '{context}' of {tmp}/kubeconfig) does not serve kind 'Widget' of apiVersion 'example.com/v1' (widget.example.com/gadget from k8s/widget.yaml:1); check apiVersion and kind, or install the CustomResourceDefinition that defines it first",
                     id="unknown-kind"),
        pytest.param("", "k8s/elsewhere.yaml", {},
                     "cannot apply configmap/settings (namespace nowhere) from k8s/elsewhere.yaml:1: namespace 'nowhere' does not exist; create it (kubectl create namespace nowhere) or add a Namespace document to the manifests",
                     id="missing-namespace"),
        pytest.param("", "k8s/duplicate.yaml", {},
                     'cannot apply deployment.apps/web (namespace {ns}) from k8s/duplicate.yaml:2: the API server cannot merge it for server-side apply (failed to create typed patch object: .spec.template.spec.containers: duplicate entries for key [name="web"]); fix the manifest: ',
                     id="duplicate-key"),
    ],
)  # fmt: skip
def test_what_the_server_refuses_is_one_clear_sentence(
    setup: str,
    manifest: str,
    options: dict[str, Any],
    expected: str,
    backend: Backend,
    project: Path,
    target: Target,
    tmp_path: Path,
) -> None:
    if setup == "401":
        backend.write_kubeconfig(backend.kubeconfig, token="wrong")
    started = time.monotonic()
    out = run(target, project, sy.kubernetes(manifest, **options), version="1")
    took = time.monotonic() - started
    assert out.status is Status.FAILED
    error = out.result.error
    assert error is not None
    assert "\n" not in error
    assert error.startswith(
        expected.format(
            tmp=tmp_path, server=backend.server, context=backend.context, ns=backend.namespace
        )
    ), error
    assert took < 5.0


def test_a_dead_server_is_not_hidden_by_retries(
    fake: FakeKube, kubeconfig: Path, project: Path, target: Target
) -> None:
    run(target, project, sy.kubernetes("k8s/app.yaml"), version="1")  # the discovery is cached now
    fake.set_fault("hang", path_prefix="/apis/apps/v1")
    before = len(fake.requests)
    out = run(target, project, sy.kubernetes("k8s/app.yaml", request_timeout=(1, 0.5)), version="2")
    fake.fault = None
    assert out.status is Status.FAILED
    assert "no answer within 0.5s" in (out.result.error or "")
    hung = [r for r in fake.requests[before:] if r.path.startswith("/apis/apps/v1")]
    assert len(hung) == 1  # one GET, no silent second, third and fourth try
    assert out.seconds < 5.0


# -- jobs -----------------------------------------------------------------------------------------


def test_a_job_succeeds_with_its_log_in_the_history(
    shipyarder: Any, fake: FakeKube, kubeconfig: Path
) -> None:
    fake.script_job(NS, "migrate", logs=["migrating 1 of 2", "migrating 2 of 2", "done"], delay=0.4)
    shipyarder.makepipelines(
        """
        import shipyard as sy

        @sy.pipeline
        def shop(d):
            return [sy.stage("migrate", sy.kubernetes.job(
                "migrate", f"registry.example/shop:{d.version}", "./manage.py migrate --noinput",
                env={"TOKEN": sy.secret("SHOP_TOKEN"), "LEVEL": 3}))]
        """
    )
    shipyarder.monkeypatch.setenv("SHOP_TOKEN", "s3cr3t-t0ken")
    result = shipyarder.deploy("shop", "4.2", "prod")
    assert result.status == "succeeded", result.document
    step = result.document["stages"][0]["steps"][0]
    assert step["exit_code"] == 0
    logs = shipyarder.run("logs", str(result.id))
    logs.fnmatch_lines([
        "*job.batch/migrate (namespace default) created from registry.example/shop:4.2",
        "*pod migrate-*: Running",
        "*migrating 1 of 2",
        "*migrating 2 of 2",
        "*done",
        "*job.batch/migrate (namespace default) succeeded",
    ])  # fmt: skip
    job = fake.get("Job", NS, "migrate")
    assert job is not None  # kept for `kubectl logs` until its ttl
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600
    assert job["spec"]["backoffLimit"] == 0
    assert job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "shipyard"
    assert job["metadata"]["annotations"]["shipyard/deployment"] == str(result.id)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["./manage.py", "migrate", "--noinput"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TOKEN"] == "s3cr3t-t0ken"  # the real secret reaches the pod...
    assert env["LEVEL"] == "3"
    assert env["DEPLOYMENT_VERSION"] == "4.2"
    plan = shipyarder.run("plan", "shop", "4.2", "-e", "prod")
    assert "TOKEN=***" in plan.stdout  # ...and nothing else shows it
    assert "s3cr3t" not in plan.stdout + logs.stdout


def test_a_failing_job_fails_the_step_with_its_exit_code_and_output(
    fake: FakeKube, kubeconfig: Path, target: Target
) -> None:
    fake.script_job(NS, "migrate", logs=[f"line {i}" for i in range(1, 16)], succeed=False,
                    exit_code=3, delay=0.4)  # fmt: skip
    out = target.run(sy.kubernetes.job("migrate", "busybox:1.36", ["sh", "-c", "exit 3"]))
    assert out.status is Status.FAILED
    result = out.result
    assert result.exit_code == 3
    assert result.error is not None
    assert result.error.startswith(
        "job.batch/migrate (namespace default) failed (BackoffLimitExceeded: Job has reached "
        "the specified backoff limit); pod migrate-"
    )
    assert " exited with 3; last output:\n  line 6\n" in result.error
    assert result.error.endswith("  line 15")
    assert result.output_tail[-1] == "line 15"
    assert [t for s, t in out.lines if s == "stdout"] == [f"line {i}" for i in range(1, 16)]
    assert fake.get("Job", NS, "migrate") is not None  # kept per ttl, to look at


def test_a_job_with_ttl_0_is_deleted_and_a_finished_one_is_replaced(
    fake: FakeKube, kubeconfig: Path, target: Target
) -> None:
    fake.script_job(NS, "seed", logs=["seeded"], delay=0.2)
    first = target.run(sy.kubernetes.job("seed", "busybox:1.36"))
    assert first.status is Status.SUCCEEDED, first.error
    assert fake.get("Job", NS, "seed") is not None
    second = target.run(sy.kubernetes.job("seed", "busybox:1.36", ttl=0))
    assert second.status is Status.SUCCEEDED, second.error
    lines = shipyard_lines(second)
    assert lines[0] == (
        f"deleted the finished job.batch/seed (namespace default) of deployment {target.next_id - 1}"
    )
    assert lines[-1] == "deleted job.batch/seed (namespace default) (ttl=0)"
    assert "seeded" in [t for s, t in second.lines if s == "stdout"]
    assert fake.get("Job", NS, "seed") is None
    assert fake.list_objects("Pod", NS, "job-name=seed") == []


def test_a_job_not_made_by_shipyard_is_never_touched(
    fake: FakeKube, kubeconfig: Path, target: Target
) -> None:
    fake.apply(
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "seed", "namespace": NS},
         "spec": {"template": {"spec": {"restartPolicy": "Never",
                                        "containers": [{"name": "x", "image": "busybox"}]}}}}
    )  # fmt: skip
    out = target.run(sy.kubernetes.job("seed", "busybox:1.36"))
    assert out.status is Status.FAILED
    assert out.result.error == (
        "a Job job.batch/seed (namespace default) already exists and was not created by "
        "Shipyard; Shipyard never touches it: delete or rename it, or give this step another "
        "Job name"
    )
    job = fake.get("Job", NS, "seed")
    assert job is not None
    assert "shipyard/run" not in (job["metadata"].get("annotations") or {})


def test_a_job_that_times_out_is_deleted(fake: FakeKube, kubeconfig: Path, target: Target) -> None:
    fake.script_job(NS, "slow", logs=["working"] * 60, delay=30)  # a line every 0.5s
    out = target.run(sy.kubernetes.job("slow", "busybox:1.36", timeout=3))
    assert out.status is Status.FAILED
    assert out.result.error is not None
    assert out.result.error.startswith(
        "job.batch/slow (namespace default) did not finish within 3s (pod slow-"
    )
    assert ": Running); deleted it; last output:\n  working" in out.result.error
    assert fake.get("Job", NS, "slow") is None
    assert fake.list_objects("Pod", NS, "job-name=slow") == []
    assert out.seconds < 6.0


def test_a_cancelled_job_is_deleted_at_once(
    fake: FakeKube, kubeconfig: Path, target: Target
) -> None:
    fake.script_job(NS, "long", logs=["started"], delay=60)

    async def scenario() -> tuple[Outcome, float]:
        task = asyncio.ensure_future(target.arun(sy.kubernetes.job("long", "busybox:1.36")))
        while not fake.list_objects("Pod", NS, "job-name=long") or not any(
            r.path.endswith("/log") for r in fake.requests
        ):
            assert not task.done(), task.result()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        started = time.monotonic()
        task.cancel()  # like Ctrl-C: the runner records the step cancelled
        out = await task
        return out, time.monotonic() - started

    out, took = asyncio.run(scenario())
    assert out.status is Status.CANCELLED
    assert took < 5.0  # not the 60 s of the Job, nor a 30 s read timeout
    assert fake.get("Job", NS, "long") is None
    assert fake.list_objects("Pod", NS, "job-name=long") == []
    assert "deleted job.batch/long (namespace default) (cancelled)" in shipyard_lines(out)
    delete = [r for r in fake.requests if r.method == "DELETE"][-1]
    assert delete.query["propagationPolicy"] == "Background"


# -- definition -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: sy.kubernetes("k8s/", namespce="x"), "kubernetes step: unknown option 'namespce'; did you mean 'namespace'?"),
        (lambda: sy.kubernetes([]), "kubernetes step: manifest must be a file or folder"),
        (lambda: sy.kubernetes("k8s/", namespace="Prod"), "kubernetes step: namespace must be a DNS label"),
        (lambda: sy.kubernetes("k8s/", wait="yes"), "kubernetes step: wait must be True or False"),
        (lambda: sy.kubernetes("k8s/", request_timeout=(1, 2, 3)), "kubernetes step: request_timeout must be seconds or a (connect, read) pair"),
        (lambda: sy.kubernetes.job("Migrate_DB", "img"), "kubernetes.job step: the Job name must be a DNS label"),
        (lambda: sy.kubernetes.job("migrate", None), "kubernetes.job step: image must be an image reference"),
        (lambda: sy.kubernetes.job("migrate", "img", ttl=-1), "kubernetes.job step: ttl must be a whole number"),
    ],
    ids=["typo", "no-manifest", "namespace", "wait", "request-timeout", "job-name", "image", "ttl"],
)  # fmt: skip
def test_bad_options_are_definition_errors(build: Callable[[], Any], message: str) -> None:
    with pytest.raises(PipelineDefinitionError) as caught:
        build()
    assert caught.value.message.startswith(message)


def test_the_facade() -> None:
    step = sy.kubernetes("k8s/", "prod", timeout=60)
    assert (step.kind, step.namespace, step.timeout, step.name) == (
        "kubernetes", "prod", 60, "kubernetes apply k8s/"
    )  # fmt: skip
    job = sy.kubernetes.job("migrate", image="img:1", name="schema")
    assert (job.kind, job.job, job.name, job.timeout, job.ttl) == (
        "kubernetes.job", "migrate", "schema", 600, 3600
    )  # fmt: skip
    assert "kubernetes.job" in repr(sy.kubernetes)


# -- the history, rollback, the CLI and plan -----------------------------------------------------

PIPELINES = """
import shipyard as sy

@sy.pipeline(environments=["staging"], rollback="manual")
def web(d):
    return [sy.stage("release", sy.kubernetes("k8s/app.yaml", timeout=20))]
"""


def test_rollback_re_applies_exactly_what_the_previous_version_applied(
    shipyarder: Any, backend: Backend
) -> None:
    ns = backend.namespace
    shipyarder.copy(RESOURCES, "k8s")
    shipyarder.makepipelines(PIPELINES)
    first = shipyarder.deploy("web", "1.0", "staging")
    assert first.status == "succeeded", first.document
    # 2.0's pods fit no node: its rollout exceeds its (short) progress deadline.
    never_ready(shipyarder.path / "k8s" / "app.yaml", deadline=2)
    second = shipyarder.deploy("web", "2.0", "staging", rollback=False)
    assert second.status == "failed"
    assert "ProgressDeadlineExceeded" in second.document["error"]
    assert image_of(backend, "Deployment", "web", ns) == "registry.example/web:2.0"

    manager = shipyarder.manager()
    back = manager.wait(manager.rollback(second.id))
    assert (back["status"], back["version"], back["rollback_of"]) == ("succeeded", "1.0", second.id)
    deployment = backend.get("Deployment", ns, "web")
    assert deployment is not None
    assert image_of(backend, "Deployment", "web", ns) == "registry.example/web:1.0"
    # The fields only 2.0 applied are gone again (and defaulted again where they have a default).
    assert "nodeSelector" not in deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["progressDeadlineSeconds"] == 600
    config = backend.get("ConfigMap", ns, "web-config")
    assert config is not None
    assert config["data"]["version"] == "1.0"
    # What deployment 1 applied, byte for byte: its own DEPLOYMENT_ID, not the rollback's.
    assert config["data"]["deployment"] == str(first.id)
    logs = shipyarder.run("logs", str(back["id"]))
    logs.fnmatch_lines([
        f"*applying the 3 object(s) deployment #{first.id} applied, exactly (today's files are not rendered)",
        f"*deployment.apps/web configured (namespace {ns})",
        f"*deployment.apps/web (namespace {ns}): successfully rolled out",
    ])  # fmt: skip


def test_rollback_is_exact_even_when_the_manifests_changed_since(
    shipyarder: Any, backend: Backend
) -> None:
    # Issue 12, item 3 (and 21): 2.0 adds a nodeSelector that needs a new variable, fails its
    # check, and the automatic rollback must bring back 1.0's spec, not re-render today's files
    # (which would fail on ${NODE}, or keep the nodeSelector). The selector names a node the
    # pods fit, so that 2.0 and 2.1 roll out (2.0 then fails its smoke test).
    ns = backend.namespace
    shipyarder.copy(RESOURCES, "k8s")
    shipyarder.makepipelines(
        """
        import shipyard as sy

        @sy.pipeline(environments=["staging"], rollback="auto")
        def web(d):
            return [
                sy.stage("release", sy.kubernetes("k8s/app.yaml", timeout=20)),
                sy.stage("verify", sy.command("sh", "-c", 'test "$DEPLOYMENT_VERSION" != 2.0',
                                              name="smoke test")),
            ]
        """
    )
    first = shipyarder.deploy("web", "1.0", "staging")
    assert first.status == "succeeded", first.document
    app = shipyarder.path / "k8s" / "app.yaml"
    app.write_text(
        app.read_text().replace(
            "    spec:\n      containers:",
            "    spec:\n      nodeSelector:\n        kubernetes.io/hostname: ${NODE}\n"
            "      containers:",
        )
    )
    node = f"NODE={backend.node}"
    second = shipyarder.run("deploy", "web", "2.0", "-e", "staging", "--var", node)
    assert second.exit_code == 1, second
    assert "smoke test" in second.output, second.output
    rows = {d["id"]: d for d in second.history}
    back = max(rows.values(), key=lambda d: d["id"])
    assert (back["rollback_of"], back["version"], back["status"]) == (
        first.id + 1,
        "1.0",
        "succeeded",
    ), second.output
    spec = backend.get("Deployment", ns, "web")["spec"]["template"]["spec"]
    assert "nodeSelector" not in spec, spec
    assert spec["containers"][0]["image"] == "registry.example/web:1.0"
    # A later deployment renders today's files again, as usual.
    third = shipyarder.run("deploy", "web", "2.1", "-e", "staging", "--var", node)
    assert third.exit_code == 0, third
    assert backend.get("Deployment", ns, "web")["spec"]["template"]["spec"]["nodeSelector"] == {
        "kubernetes.io/hostname": backend.node
    }


def test_plan_shows_the_rendered_objects_and_talks_to_no_server(
    shipyarder: Any, fake: FakeKube, kubeconfig: Path
) -> None:
    shipyarder.copy(RESOURCES, "k8s")
    shipyarder.makepipelines(
        """
        import shipyard as sy

        @sy.pipeline
        def web(d):
            return [sy.stage("release", sy.kubernetes(["k8s/app.yaml", "k8s/multi"], namespace="shop")),
                    sy.stage("broken", sy.kubernetes("k8s/unknown-variable.yaml"))]
        """
    )
    result = shipyarder.run("plan", "web", "3.1", "-e", "prod", "--var", "CHANNEL=edge")
    # Everything is shown, and the step deploy would fail on makes plan exit 2 (issue 12.7).
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(
        "Error: 1 step of the plan cannot be rendered (deploy would fail): stage 'broken', step "
    ), result.stderr
    assert "unknown variable ${RELEASE_CHANNEL}" in result.stderr
    result.fnmatch_lines([
        "[[]1/2] release",
        "  - kubernetes: server-side apply k8s/app.yaml, k8s/multi (namespace: the document's, else shop); wait for *",
        "      namespace/prod  [[]k8s/multi/c-namespace.yaml:2]",
        "      configmap/web-config (namespace shop)  [[]k8s/app.yaml:3]",
        "      deployment.apps/web (namespace shop): image registry.example/web:3.1  [[]k8s/app.yaml:14]",
        "      service/web (namespace shop)  [[]k8s/app.yaml:37]",
        "      configmap/settings (namespace shop)  [[]k8s/multi/a-config.yaml:2]",
        "      configmap/prod-settings (namespace prod)  [[]k8s/multi/a-config.yaml:9]",
        "      secret/api-key (namespace shop)  [[]k8s/multi/a-config.yaml:18]",
        "      serviceaccount/worker (namespace shop)  [[]k8s/multi/a-config.yaml:18]",
        "      statefulset.apps/db (namespace shop): image registry.example/db:3.1  [[]k8s/multi/b-workloads.yaml:1]",
        "      daemonset.apps/agent (namespace prod): image registry.example/agent:3.1  [[]k8s/multi/b-workloads.yaml:20]",
        "[[]2/2] broken",
        "      cannot render the manifests: k8s/unknown-variable.yaml:7: unknown variable ${RELEASE_CHANNEL} *",
    ])  # fmt: skip
    as_json = shipyarder.run("plan", "web", "3.1", "-e", "prod", "--var", "CHANNEL=edge", "--json")
    assert as_json.exit_code == 2, as_json
    assert as_json.json()["stages"][1]["steps"][0]["details"][0].startswith(
        "cannot render the manifests: k8s/unknown-variable.yaml:7: unknown variable"
    )
    step = as_json.json()["stages"][0]["steps"][0]
    assert step["details"][2] == (
        "deployment.apps/web (namespace shop): image registry.example/web:3.1  [k8s/app.yaml:14]"
    )
    assert fake.requests == []  # plan rendered everything without asking the server


def test_plan_and_list_do_not_import_the_kubernetes_client(shipyarder: Any) -> None:
    shipyarder.copy(RESOURCES, "k8s")
    shipyarder.makepipelines(PIPELINES)
    for args in (["list"], ["plan", "web", "1.0", "-e", "staging"]):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "shipyard", *args],
            capture_output=True, text=True, timeout=60, cwd=shipyarder.path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        imported = {
            line.rsplit("|", 1)[-1].strip().split(".")[0]
            for line in proc.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert "shipyard" in imported
        assert imported & {"kubernetes", "urllib3", "asyncio"} == set(), args
    assert "registry.example/web:1.0" in proc.stdout


@pytest.fixture
def kubefake_process(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The fake as a process of its own: ``(url, kubeconfig)``."""
    kubeconfig, ready = tmp_path / "proc-kubeconfig", tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, str(KUBEFAKE), "--port", "0", "--kubeconfig", str(kubeconfig),
         "--ready-file", str(ready), "--job-delay", "0.3"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(ready.exists, timeout=30, what="kubefake to start")
        yield f"http://127.0.0.1:{ready.read_text().strip()}", kubeconfig
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err


def _post(url: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def test_the_cli_deploys_to_a_fake_in_another_process(
    shipyarder: Any, kubefake_process: tuple[str, Path], tmp_path: Path
) -> None:
    url, kubeconfig = kubefake_process
    shipyarder.copy(RESOURCES, "k8s")
    shipyarder.makepipelines(
        """
        import shipyard as sy

        @sy.pipeline(environments=["staging"])
        def web(d):
            return [
                sy.stage("migrate", sy.kubernetes.job("migrate", f"registry.example/web:{d.version}",
                                                      ["./migrate", "up"])),
                sy.stage("release", sy.kubernetes("k8s/app.yaml", timeout=20)),
            ]
        """
    )
    _post(f"{url}/_fake/script", {"kind": "job", "namespace": NS, "name": "migrate",
                                  "logs": ["applied 0042_orders"], "delay": 0.3})  # fmt: skip
    env = {"KUBECONFIG": str(kubeconfig), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = shipyarder.spawn("deploy", "web", "5.0", "-e", "staging", env=env, timeout=120)
    assert result.exit_code == 0, result.output
    result.fnmatch_lines([
        "*applied 0042_orders*",
        "*deployment.apps/web created (namespace default)*",
        "*deployment.apps/web (namespace default): successfully rolled out*",
    ])  # fmt: skip
    with urllib.request.urlopen(f"{url}/_fake/requests", timeout=5) as resp:
        seen = json.loads(resp.read())["requests"]
    patches = [r for r in seen if r["method"] == "PATCH"]
    assert {r["query"]["fieldManager"] for r in patches} == {"shipyard"}
    assert {r["path"] for r in patches} >= {"/apis/apps/v1/namespaces/default/deployments/web"}
    cache = tmp_path / "cache" / "shipyard" / "kubernetes"
    assert cache.stat().st_mode & 0o777 == 0o700
    assert [p.name.startswith("discovery-") for p in cache.iterdir()] == [True]
    assert os.environ.get("KUBECONFIG") != str(kubeconfig)  # only the child saw it


def test_rendered_manifests_holding_a_secret_are_not_kept(
    shipyarder: Any, backend: Backend
) -> None:
    # The history never holds a secret: a masked copy could not be applied again anyway, so a
    # rollback to this deployment renders the files again (and says so).
    shipyarder.makefile(
        "k8s/token.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: token\ndata:\n  token: ${TOKEN}\n",
    )
    shipyarder.makepipelines(
        """
        import shipyard as sy

        @sy.pipeline(environments=["staging"])
        def web(d):
            return [sy.stage("release",
                             sy.command("true", env={"T": sy.secret("API_TOKEN")}, name="uses it"),
                             sy.kubernetes("k8s/token.yaml", timeout=20))]
        """
    )
    r = shipyarder.run("deploy", "web", "1.0", "-e", "staging", "--var", "TOKEN=s3cr3t-v4lue",
                       env={"API_TOKEN": "s3cr3t-v4lue"})  # fmt: skip
    assert r.exit_code == 0, r
    assert "the rendered manifests hold a secret: not kept in the history" in r.stdout
    from shipyard.sdk import open_store

    store = open_store(r.history_path, create=False)
    try:
        assert store.artifacts(1) == []
    finally:
        store.close()
    assert backend.get("ConfigMap", backend.namespace, "token")["data"]["token"] == "s3cr3t-v4lue"


def test_kill_9_during_a_job_deletes_it_at_the_next_command(
    shipyarder: Any, fake: FakeKube, kubeconfig: Path
) -> None:
    # Issue 12, item 2: the Job of a killed deployment is deleted by the command that records
    # the deployment interrupted, and the history says so.
    import subprocess
    import time

    fake.script_job(NS, "migrate", logs=["migrating"], delay=300)
    shipyarder.makepipelines(
        """
        import shipyard as sy

        @sy.pipeline
        def web(d):
            return [sy.stage("migrate", sy.kubernetes.job("migrate", image="img:1", timeout=600))]
        """
    )
    cli = shipyarder.popen("deploy", "web", "1.0", "-e", "staging",
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while fake.get("Job", NS, "migrate") is None:
        assert time.monotonic() < deadline, "the Job was never created"
        assert cli.poll() is None, "the deployment ended before its Job was created"
        time.sleep(0.05)
    cli.kill()
    cli.wait(10)
    assert fake.get("Job", NS, "migrate") is not None  # kill -9 left it
    r = shipyarder.spawn("status")
    assert r.exit_code == 0, r
    assert "repair of #1: deleted job.batch/migrate (namespace default) and its pods" in r.stderr
    assert fake.get("Job", NS, "migrate") is None
    shown = shipyarder.spawn("show", "1")
    assert "interrupted" in shown.stdout
    logs = shipyarder.spawn("logs", "1")
    assert "repair of #1: deleted job.batch/migrate" in logs.stdout
    # Said once: the next command has nothing left to do.
    again = shipyarder.spawn("status")
    assert "repair of" not in again.stderr
