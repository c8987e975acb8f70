"""The Kubernetes API servers the tests run against: the fake and a real v1.20.2 control plane.

``backend`` is one parametrised fixture, ids ``fake`` (tests/kubefake.py, a server of the test's
own) and ``real`` (tests/k8s_real.py, one plane per process, shared). Either way the test gets a
namespace of its own, ``KUBECONFIG`` naming it as the context's namespace, and a few ways to look
at the cluster: ``get``/``list_objects`` (plain dicts), ``apply`` as another field manager,
``add_namespace``. ``backend.fake`` is the ``FakeKube`` on the fake and None on the real plane,
for what only the fake can script or inspect.

``plane`` is the real plane's session fixture (its state: ``kubeconfig``, ``server``, ...). A
test module that uses them loads this module as a plugin (``pytest_plugins = ["k8s_backends"]``),
so each fixture is defined once, whichever modules run. The plane is started once per process
(per xdist worker), lazily, by the first test that needs it, and stopped when pytest ends. Every
test that uses it carries the xdist group ``k8s-real`` (``REAL``), so with ``--dist loadgroup``
one worker runs them all and no other starts a plane (see ``pytest_collection_modifyitems``).
``SHIPYARD_SKIP_K8S_REAL=1`` skips the real-backed tests, saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import k8s_real
import pytest
from kubefake import FakeKube
from kubefake import resource_type

Obj = dict[str, Any]

#: Read when the tests are collected: ``shipyarder`` removes every ``SHIPYARD_*`` variable from
#: the environment of its test, which may be the first to need the plane.
SKIP_REAL = os.environ.get("SHIPYARD_SKIP_K8S_REAL") == "1"
SKIP_REASON = "SHIPYARD_SKIP_K8S_REAL=1: the real Kubernetes control plane is not started"
#: The marks of every test (or parameter) that uses the real plane.
REAL = [pytest.mark.xdist_group("k8s-real")]
#: The backends, for ``@pytest.fixture(params=...)`` or ``parametrize(..., indirect=True)``.
BACKENDS = [pytest.param("fake", id="fake"), pytest.param("real", id="real", marks=REAL)]
#: Where the plane's binaries are cached depends on these; tests change them (HOME, the
#: discovery cache), so the plane is started with the values pytest started with.
_START_ENV = {name: os.environ.get(name) for name in ("HOME", "XDG_CACHE_HOME")}
REQUEST_TIMEOUT = (5, 30)


class Plane:
    """The real control plane of this process, and an admin client for looking at it."""

    def __init__(self, folder: Path) -> None:
        from kubernetes import client
        from kubernetes import config
        from kubernetes import dynamic

        self.folder = folder
        with _environment(_START_ENV):
            self.state: dict[str, Any] = k8s_real.up(folder)
        try:
            self.kubeconfig = Path(self.state["kubeconfig"])
            self.server = str(self.state["server"])
            cfg = json.loads(self.kubeconfig.read_text())
            self.ca = cfg["clusters"][0]["cluster"]["certificate-authority-data"]
            self.tokens = {u["name"]: u["user"]["token"] for u in cfg["users"]}
            self.api = config.new_client_from_config(str(self.kubeconfig), context="admin")
            self.dyn = dynamic.DynamicClient(self.api, cache_file=str(folder / "discovery.json"))
            self.core = client.CoreV1Api(self.api)
        except BaseException:
            k8s_real.down(folder)
            raise

    def stop(self) -> None:
        try:
            self.api.close()
        finally:
            k8s_real.down(self.folder)

    def resource(self, kind: str, api_version: str | None = None) -> Any:
        if api_version is None:
            api_version = resource_type(kind).group_version
            kind = resource_type(kind).kind
        return self.dyn.resources.get(api_version=api_version, kind=kind)

    def get(
        self, kind: str, namespace: str, name: str, api_version: str | None = None
    ) -> Obj | None:
        from kubernetes.dynamic.exceptions import NotFoundError

        res = self.resource(kind, api_version)
        try:
            resp = res.get(name=name, namespace=namespace or None, serialize=False,
                           _request_timeout=REQUEST_TIMEOUT)  # fmt: skip
        except NotFoundError:
            return None
        return _body(resp)

    def list_objects(self, kind: str, namespace: str | None, label_selector: str = "") -> list[Obj]:
        res = self.resource(kind)
        resp = res.get(namespace=namespace or None, label_selector=label_selector or None,
                       serialize=False, _request_timeout=REQUEST_TIMEOUT)  # fmt: skip
        return list(_body(resp).get("items") or [])

    def apply(self, body: Obj, field_manager: str, force: bool) -> Obj:
        res = self.resource(body["kind"], body.get("apiVersion"))
        meta = body["metadata"]
        resp = res.server_side_apply(
            body=body, name=meta["name"], namespace=meta.get("namespace"),
            field_manager=field_manager, force_conflicts=True if force else None,
            serialize=False, _request_timeout=REQUEST_TIMEOUT,
        )  # fmt: skip
        return _body(resp)


def _body(resp: Any) -> Obj:
    try:
        data = resp.data
    finally:
        resp.release_conn()
    return dict(json.loads(data))


@contextlib.contextmanager
def _environment(values: dict[str, str | None]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            _setenv(name, value)
        yield
    finally:
        for name, value in saved.items():
            _setenv(name, value)


def _setenv(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


_PLANE: Plane | None = None
_PLANE_ERROR: BaseException | None = None


def the_plane(tmp_path_factory: pytest.TempPathFactory, config: pytest.Config) -> Plane:
    """The plane of this process: started on first use (once, even if it fails), stopped at
    the end of the pytest run."""
    global _PLANE, _PLANE_ERROR
    if SKIP_REAL:
        pytest.skip(SKIP_REASON)
    if _PLANE_ERROR is not None:
        raise RuntimeError("the real Kubernetes control plane failed to start") from _PLANE_ERROR
    if _PLANE is None:
        try:
            _PLANE = Plane(tmp_path_factory.mktemp("k8s-plane"))
        except BaseException as exc:
            _PLANE_ERROR = exc
            raise

        def stop() -> None:
            global _PLANE
            plane, _PLANE = _PLANE, None
            if plane is not None:
                plane.stop()

        config.add_cleanup(stop)
    return _PLANE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Name each item's ``xdist_group`` in its node id, as ``--dist loadgroup`` needs.

    pytest-xdist (3.8) does it by setting ``item._nodeid``, which pytest 9 no longer reads (the
    node id lives in ``item._id``): every group was silently spread over the workers, and each
    worker started a control plane of its own. Where xdist's suffix took (other versions), or
    without ``loadgroup``, this does nothing.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = sorted(
            {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
             for m in item.iter_markers("xdist_group")}
        )  # fmt: skip
        if not names:
            continue
        suffix = "@" + "_".join(names)
        node_id = getattr(item, "_id", None)
        if node_id is None or item.nodeid.endswith(suffix):
            continue
        item._id = type(node_id).parse(item.nodeid + suffix)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def plane(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> dict[str, Any]:
    """The real plane's state (``kubeconfig``, ``server``, ``dir``, ``pids``, ``version``)."""
    return the_plane(tmp_path_factory, pytestconfig).state


class Backend:
    """One test's view of a Kubernetes API server (see the module's docstring)."""

    def __init__(
        self, name: str, tmp_path: Path, *, fake: FakeKube | None = None, real: Plane | None = None
    ) -> None:
        self.name = name
        self.fake = fake
        self.real = real
        #: The namespace of the test (the kubeconfig context's), created and empty.
        self.namespace = f"t-{uuid.uuid4().hex[:8]}"
        #: The context name in the kubeconfigs written for the test.
        self.context = name
        #: The API server's URL.
        self.server = fake.url if fake is not None else real.server  # type: ignore[union-attr]
        #: A node pods are scheduled on (for a nodeSelector that matches).
        self.node = fake.node_names[0] if fake is not None else k8s_real.NODE
        self._namespaces: list[str] = []
        self.add_namespace(self.namespace)
        self.kubeconfig = self.write_kubeconfig(tmp_path / "kubeconfig")

    def __repr__(self) -> str:
        return f"<Backend {self.name} {self.server} namespace {self.namespace}>"

    def unique(self, name: str) -> str:
        """A namespace name of this test's own, for what a test would call ``name``."""
        return f"{self.namespace}-{name}"

    def write_kubeconfig(
        self,
        path: Path,
        namespace: str | None = None,
        context: str | None = None,
        token: str | None = None,
    ) -> Path:
        """A kubeconfig for the server: one context (default: the test's namespace and the
        backend's name), the admin's token unless ``token`` is given."""
        namespace = namespace or self.namespace
        context = context or self.context
        if self.fake is not None:
            return self.fake.write_kubeconfig(path, namespace=namespace, token=token,
                                              context=context)  # fmt: skip
        assert self.real is not None
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": context, "cluster": {
                "server": self.server, "certificate-authority-data": self.real.ca}}],
            "users": [{"name": context, "user": {"token": token or self.real.tokens["admin"]}}],
            "contexts": [{"name": context, "context": {
                "cluster": context, "user": context, "namespace": namespace}}],
        }  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path

    def add_namespace(self, name: str) -> None:
        if self.fake is not None:
            self.fake.add_namespace(name)
            return
        assert self.real is not None
        self.real.core.create_namespace({"metadata": {"name": name}},
                                        _request_timeout=REQUEST_TIMEOUT)  # fmt: skip
        self._namespaces.append(name)

    def created_namespace(self, name: str) -> None:
        """``name`` was created by the test (a Namespace document): delete it at the end."""
        if self.real is not None:
            self._namespaces.append(name)

    def get(
        self, kind: str, namespace: str, name: str, api_version: str | None = None
    ) -> Obj | None:
        """The object as the server has it (a dict), or None."""
        if self.fake is not None:
            return self.fake.get(kind, namespace, name)
        assert self.real is not None
        return self.real.get(kind, namespace, name, api_version)

    def list_objects(self, kind: str, namespace: str, label_selector: str = "") -> list[Obj]:
        if self.fake is not None:
            return self.fake.list_objects(kind, namespace, label_selector)
        assert self.real is not None
        return self.real.list_objects(kind, namespace, label_selector)

    def apply(self, body: Obj, field_manager: str = "kubectl", *, force: bool = False) -> Obj:
        """Server-side apply ``body`` as ``field_manager``: someone else's change."""
        if self.fake is not None:
            return self.fake.apply(body, field_manager, force=force)
        assert self.real is not None
        return self.real.apply(body, field_manager, force)

    def close(self) -> None:
        """Delete the test's namespaces on the real plane (not waited for)."""
        if self.real is None:
            return
        from kubernetes.client.exceptions import ApiException

        for name in self._namespaces:
            with contextlib.suppress(ApiException):
                self.real.core.delete_namespace(name, _request_timeout=REQUEST_TIMEOUT)


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Backend]:
    """The fake or the real plane, with a namespace of the test's own (see the module)."""
    if request.param == "fake":
        with FakeKube() as fake:
            b = Backend("fake", tmp_path, fake=fake)
            monkeypatch.setenv("KUBECONFIG", str(b.kubeconfig))
            monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
            yield b
        assert fake.server_errors == []
        return
    real = the_plane(tmp_path_factory, request.config)
    b = Backend("real", tmp_path, real=real)
    monkeypatch.setenv("KUBECONFIG", str(b.kubeconfig))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        yield b
    finally:
        b.close()
