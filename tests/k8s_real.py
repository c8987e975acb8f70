"""A real Kubernetes control plane (v1.20.2) on loopback, built from Debian's archive.

    python tests/k8s_real.py build           # build and cache the binaries (once per machine)
    python tests/k8s_real.py up DIR          # start etcd, the control plane and a hollow node
    python tests/k8s_real.py down DIR        # stop what ``up`` started (by its recorded pids)

``build`` fetches Debian 12's ``kubernetes`` source package (1.20.5+really1.20.2, the full
upstream v1.20.2 tree with vendor/), Go 1.19 and etcd 3.4 through a private APT configuration
derived from this machine's own APT sources (no system change: packages are unpacked with
``dpkg -x``), generates ``pkg/generated/openapi`` (not in the tarball), replaces the vendored
``modern-go/reflect2`` 1.0.1, broken under Go 1.18+, by Debian's 1.0.2, patches the hollow node
to bind 127.0.0.1 and give pods 127.0.0.1, and builds kube-apiserver, kube-controller-manager,
kube-scheduler and kubemark. The binaries are cached under
``$XDG_CACHE_HOME/shipyard/k8s-real/v1.20.2`` (``~/.cache`` by default); a second build builds
nothing.

``up`` runs everything on 127.0.0.1 with free ports: etcd; the API server with certificates
made at start (openssl), a static token file (``admin``: system:masters; ``nobody``: no rights),
Node and RBAC authorization, service-account keys and ``--endpoint-reconciler-type=none``;
the controller manager and scheduler without leader election; ``kubemark --morph=kubelet``, a
real kubelet with a fake container runtime. ``DIR/kubeconfig`` is the admin's kubeconfig (with a
``nobody`` context), ``DIR/plane.json`` the pids and addresses.

What it cannot do (the node has no reachable address and runs no containers): pod logs, exec,
port-forward, Service endpoints, httpGet/tcpSocket probes, a Job's command. Tests that need those
stay on the fake (tests/kubefake.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

VERSION = "1.20.2"
SOURCE = "kubernetes=1.20.5+really1.20.2-1.1+deb12u1"
DEBS = ["golang-1.19-go", "golang-1.19-src", "etcd-server", "golang-github-modern-go-reflect2-dev"]
BINARIES = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubemark", "etcd"]
NODE = "hollow-node-0"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shipyard" / "k8s-real" / f"v{VERSION}"


def binaries() -> dict[str, Path] | None:
    """The cached binaries, or None when they are not built yet."""
    found = {b: cache_dir() / "bin" / b for b in BINARIES}
    return found if all(p.is_file() and os.access(p, os.X_OK) for p in found.values()) else None


def _run(argv: list[str], **kw: object) -> None:
    shown = [str(a) if len(str(a)) < 120 else str(a)[:100] + "...(long)" for a in argv]
    print("+", " ".join(shown), flush=True)
    subprocess.run(argv, check=True, **kw)  # type: ignore[call-overload]


def _apt_sources(out: Path) -> None:
    """This machine's APT sources with deb-src added (deb822 and one-line formats)."""
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        text = src.read_text()
        if "debian" not in text:
            continue
        lines = ["Types: deb deb-src" if ln.strip() == "Types: deb" else ln
                 for ln in text.splitlines()]  # fmt: skip
        (out / f"{n}.sources").write_text("\n".join(lines) + "\n")
        n += 1
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        debs = [ln for ln in legacy.read_text().splitlines() if ln.startswith("deb ")]
        (out / "legacy.list").write_text(
            "\n".join(debs + ["deb-src " + ln[4:] for ln in debs]) + "\n"
        )


def build() -> dict[str, Path]:
    """Build (or find) the binaries; their paths."""
    found = binaries()
    if found:
        print(f"k8s-real: v{VERSION} binaries cached in {cache_dir() / 'bin'}")
        return found
    start = time.monotonic()
    cache_dir().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="k8s-build-", dir=cache_dir()))
    try:
        apt = work / "apt"
        for d in ("lists/partial", "cache/archives/partial"):
            (apt / d).mkdir(parents=True)
        _apt_sources(apt / "etc")
        conf = apt / "apt.conf"
        conf.write_text(
            f'Dir::State "{apt}";\nDir::State::Lists "{apt}/lists";\n'
            'Dir::State::status "/var/lib/dpkg/status";\n'
            f'Dir::Cache "{apt}/cache";\nDir::Etc::SourceList "/dev/null";\n'
            f'Dir::Etc::SourceParts "{apt}/etc";\nAPT::Sandbox::User "root";\n'
        )
        env = {**os.environ, "APT_CONFIG": str(conf), "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-q"], env=env)
        src, debs, root = work / "src", work / "debs", work / "root"
        for d in (src, debs, root):
            d.mkdir()
        _run(["apt-get", "source", "-q", "--download-only", SOURCE], env=env, cwd=src)
        _run(["apt-get", "download", "-q", *DEBS], env=env, cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(root)])
        (orig,) = src.glob("*.orig.tar.gz")
        _run(["tar", "xzf", str(orig), "-C", str(work)])
        gopath = work / "gopath"
        tree = gopath / "src" / "k8s.io" / "kubernetes"
        tree.parent.mkdir(parents=True)
        (work / f"kubernetes-{VERSION}").rename(tree)
        _prepare_tree(tree, root)
        goroot = root / "usr" / "lib" / "go-1.19"
        genv = {
            **os.environ, "GOROOT": str(goroot), "GOPATH": str(gopath), "GO111MODULE": "off",
            "CGO_ENABLED": "0", "GOFLAGS": "", "GOCACHE": str(work / "gocache"),
            "PATH": f"{goroot / 'bin'}:{os.environ['PATH']}",
        }  # fmt: skip
        go = str(goroot / "bin" / "go")
        _openapi(tree, go, genv, work)
        out = work / "bin"
        _run([go, "build", "-o", str(out) + "/", "./cmd/kube-apiserver",
              "./cmd/kube-controller-manager", "./cmd/kube-scheduler", "./cmd/kubemark"],
             cwd=tree, env=genv)  # fmt: skip
        shutil.copy2(root / "usr" / "bin" / "etcd", out / "etcd")
        final = cache_dir() / "bin"
        shutil.rmtree(final, ignore_errors=True)
        out.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # sources and Go's build cache: ~2 GB
    print(f"k8s-real: built v{VERSION} in {time.monotonic() - start:.0f}s into {final}")
    found = binaries()
    assert found is not None
    return found


def _prepare_tree(tree: Path, root: Path) -> None:
    reflect2 = tree / "vendor" / "github.com" / "modern-go" / "reflect2"
    shutil.rmtree(reflect2)
    shutil.copytree(root / "usr/share/gocode/src/github.com/modern-go/reflect2", reflect2)
    _patch(
        tree / "pkg/kubemark/hollow_kubelet.go", 'c.Address = "0.0.0.0"', 'c.Address = "127.0.0.1"'
    )
    _patch(tree / "staging/src/k8s.io/cri-api/pkg/apis/testing/fake_runtime_service.go",
           '[]string{"192.168.192.168"}', '[]string{"127.0.0.1"}')  # fmt: skip


def _patch(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if old not in text:
        raise SystemExit(f"k8s-real: {path} has no {old!r} to patch")
    path.write_text(text.replace(old, new))


def _openapi(tree: Path, go: str, env: dict[str, str], work: Path) -> None:
    """Generate pkg/generated/openapi from the packages tagged +k8s:openapi-gen."""
    gen = work / "openapi-gen"
    _run([go, "build", "-o", str(gen), "./vendor/k8s.io/kube-openapi/cmd/openapi-gen"],
         cwd=tree, env=env)  # fmt: skip
    skip = ("vendor/k8s.io/code-generator/", "vendor/k8s.io/sample-apiserver/")
    dirs: set[str] = set()
    for top in ("pkg", "cmd", "plugin", "vendor/k8s.io"):
        for dirpath, _dirs, files in os.walk(tree / top, followlinks=True):
            rel = os.path.relpath(dirpath, tree)
            if rel.startswith(skip) or (rel + "/").startswith(skip):
                continue
            for f in files:
                if f.endswith(".go") and "+k8s:openapi-gen=" in (Path(dirpath) / f).read_text(
                    errors="replace"
                ):
                    dirs.add("k8s.io/kubernetes/" + rel)
                    break
    _run([str(gen), "--logtostderr", "-i", ",".join(sorted(dirs)),
          "-p", "k8s.io/kubernetes/pkg/generated/openapi", "-O", "zz_generated.openapi",
          "-h", "vendor/k8s.io/code-generator/hack/boilerplate.go.txt",
          "-r", str(work / "violations.report")], cwd=tree, env=env)  # fmt: skip


# -- up and down ------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _certs(d: Path) -> None:
    def ssl_(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ssl_("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=shipyard-test-ca",
         "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes\n")
    ssl_("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver",
         "-keyout", str(d / "apiserver.key"), "-out", str(d / "apiserver.csr"))  # fmt: skip
    ssl_("x509", "-req", "-in", str(d / "apiserver.csr"), "-CA", str(d / "ca.crt"), "-CAkey",
         str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(d / "san.cnf"),
         "-out", str(d / "apiserver.crt"))  # fmt: skip
    ssl_("genrsa", "-out", str(d / "sa.key"), "2048")
    ssl_("rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub"))


def _kubeconfig(d: Path, server: str, users: dict[str, str], current: str) -> Path:
    ca = (d / "ca.crt").read_text()
    import base64

    ca64 = base64.b64encode(ca.encode()).decode()
    cfg = {
        "apiVersion": "v1", "kind": "Config", "current-context": current,
        "clusters": [{"name": "real", "cluster": {"server": server,
                                                  "certificate-authority-data": ca64}}],
        "users": [{"name": u, "user": {"token": t}} for u, t in users.items()],
        "contexts": [{"name": u, "context": {"cluster": "real", "user": u,
                                             "namespace": "default"}} for u in users],
    }  # fmt: skip
    path = d / f"{current}.kubeconfig"
    path.write_text(json.dumps(cfg, indent=1))
    path.chmod(0o600)
    return path


#: The processes this interpreter started (kept: a dropped Popen warns it still runs).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _spawn(d: Path, name: str, argv: list[str]) -> int:
    with open(d / f"{name}.log", "wb") as log:  # the child has its own copy of the descriptor
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)  # fmt: skip
    _CHILDREN[proc.pid] = proc
    return proc.pid


#: The hollow kubelet's fake container runtime listens here, a path compiled into kubemark: two
#: hollow nodes on one machine share it, and the one that exits last removes the other's socket
#: (its pods then stay ContainerCreating for good).
RUNTIME_SOCKET = "/tmp/kubelet_remote.sock"


def _other_hollow_nodes() -> list[int]:
    """Pids of running hollow kubelets (of another plane: a test run beside this one)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"/kubemark") and b"--morph=kubelet" in argv:
            found.append(int(entry.name))
    return found


def _wait_for_other_hollow_nodes(timeout: float) -> None:
    """Start no hollow node while another runs (or is still exiting): see RUNTIME_SOCKET."""
    deadline = time.monotonic() + timeout
    while others := _other_hollow_nodes():
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"another hollow kubelet is running (pid {', '.join(map(str, others))}) and "
                f"would share {RUNTIME_SOCKET} with this one; stop its plane "
                "(python tests/k8s_real.py down DIR) or let its test run finish"
            )
        time.sleep(0.2)


def up(d: Path, timeout: float = 120) -> dict[str, object]:
    """Start the plane in ``d`` (see the module's docstring); its state."""
    bins = build()
    d.mkdir(parents=True, exist_ok=True)
    _certs(d)
    etcd_c, etcd_p, api, kl, klro = _free_ports(5)
    tokens = {"admin": os.urandom(16).hex(), "nobody": os.urandom(16).hex(),
              "controller-manager": os.urandom(16).hex(), "scheduler": os.urandom(16).hex(),
              "node": os.urandom(16).hex()}  # fmt: skip
    (d / "tokens.csv").write_text(
        f'{tokens["admin"]},admin,1,"system:masters"\n'
        f"{tokens['nobody']},nobody,2\n"
        # All controllers under one identity (no per-controller service accounts): it gets
        # every right, as the controllers together have them.
        f'{tokens["controller-manager"]},system:kube-controller-manager,3,"system:masters"\n'
        f"{tokens['scheduler']},system:kube-scheduler,4\n"
        f'{tokens["node"]},system:node:{NODE},5,"system:nodes"\n'
    )
    server = f"https://127.0.0.1:{api}"
    admin = _kubeconfig(d, server, {"admin": tokens["admin"], "nobody": tokens["nobody"]}, "admin")
    cm = _kubeconfig(
        d, server, {"controller-manager": tokens["controller-manager"]}, "controller-manager"
    )
    sched = _kubeconfig(d, server, {"scheduler": tokens["scheduler"]}, "scheduler")
    node = _kubeconfig(d, server, {"node": tokens["node"]}, "node")
    pids: dict[str, int] = {}
    pids["etcd"] = _spawn(d, "etcd", [
        str(bins["etcd"]), "--data-dir", str(d / "etcd"), "--name", "default",
        "--listen-client-urls", f"http://127.0.0.1:{etcd_c}",
        "--advertise-client-urls", f"http://127.0.0.1:{etcd_c}",
        "--listen-peer-urls", f"http://127.0.0.1:{etcd_p}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_p}",
        "--initial-cluster", f"default=http://127.0.0.1:{etcd_p}",
        "--listen-metrics-urls", "",
    ])  # fmt: skip
    state: dict[str, object] = {"dir": str(d), "pids": pids, "server": server,
                                "kubeconfig": str(admin), "version": VERSION}  # fmt: skip
    (d / "plane.json").write_text(json.dumps(state))
    pids["kube-apiserver"] = _spawn(d, "kube-apiserver", [
        str(bins["kube-apiserver"]), f"--etcd-servers=http://127.0.0.1:{etcd_c}",
        f"--secure-port={api}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
        f"--tls-cert-file={d / 'apiserver.crt'}", f"--tls-private-key-file={d / 'apiserver.key'}",
        f"--client-ca-file={d / 'ca.crt'}", f"--token-auth-file={d / 'tokens.csv'}",
        "--authorization-mode=Node,RBAC", f"--service-account-key-file={d / 'sa.pub'}",
        f"--service-account-signing-key-file={d / 'sa.key'}",
        "--service-account-issuer=https://kubernetes.default.svc",
        "--service-cluster-ip-range=10.0.0.0/24", "--endpoint-reconciler-type=none",
        "--insecure-port=0", "--profiling=false",
    ])  # fmt: skip
    (d / "plane.json").write_text(json.dumps(state))
    _wait(lambda: _get(server, "/readyz", tokens["admin"], d) == 200, "the API server's /readyz",
          timeout, d)  # fmt: skip
    pids["kube-controller-manager"] = _spawn(d, "kube-controller-manager", [
        str(bins["kube-controller-manager"]), f"--kubeconfig={cm}", "--leader-elect=false",
        f"--service-account-private-key-file={d / 'sa.key'}", f"--root-ca-file={d / 'ca.crt'}",
        "--bind-address=127.0.0.1", "--secure-port=0", "--port=0",
        "--use-service-account-credentials=false", "--controllers=*,-nodeipam",
    ])  # fmt: skip
    pids["kube-scheduler"] = _spawn(d, "kube-scheduler", [
        str(bins["kube-scheduler"]), f"--kubeconfig={sched}", "--leader-elect=false",
        "--bind-address=127.0.0.1", "--secure-port=0", "--port=0",
    ])  # fmt: skip
    _wait_for_other_hollow_nodes(timeout)
    pids["kubemark"] = _spawn(d, "kubemark", [
        str(bins["kubemark"]), "--morph=kubelet", f"--name={NODE}", f"--kubeconfig={node}",
        f"--kubelet-port={kl}", f"--kubelet-read-only-port={klro}",
    ])  # fmt: skip
    (d / "plane.json").write_text(json.dumps(state))
    _wait(lambda: _node_ready(server, tokens["admin"], d), f"node {NODE} Ready", timeout, d)
    return state


def _ctx(d: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(d / "ca.crt"))


def _get(server: str, path: str, token: str, d: Path) -> int | dict[str, object]:
    req = urllib.request.Request(server + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5, context=_ctx(d)) as r:
            body = r.read()
            return json.loads(body) if path.startswith("/api") else r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _node_ready(server: str, token: str, d: Path) -> bool:
    node = _get(server, f"/api/v1/nodes/{NODE}", token, d)
    if not isinstance(node, dict):
        return False
    conds = node.get("status", {}).get("conditions", [])  # type: ignore[union-attr]
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _wait(ok: object, what: str, timeout: float, d: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ok():  # type: ignore[operator]
        if time.monotonic() > deadline:
            tails = "".join(
                f"\n--- {p.name} ---\n"
                + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                for p in sorted(d.glob("*.log"))
            )
            down(d)
            raise RuntimeError(f"k8s-real: timed out after {timeout:g}s waiting for {what}{tails}")
        time.sleep(0.25)


def down(d: Path) -> None:
    """Stop what ``up`` started in ``d``, by its recorded pids only."""
    try:
        state = json.loads((d / "plane.json").read_text())
    except (OSError, ValueError):
        return
    pids = list(state["pids"].values())
    for pid in reversed(pids):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for pid in pids:
        proc = _CHILDREN.pop(pid, None)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                break
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if proc is not None:
                proc.wait(5)


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        build()
    elif argv[:1] == ["up"] and len(argv) == 2:
        state = up(Path(argv[1]).resolve())
        print(json.dumps(state, indent=1))
    elif argv[:1] == ["down"] and len(argv) == 2:
        down(Path(argv[1]).resolve())
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
