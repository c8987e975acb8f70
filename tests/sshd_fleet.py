"""A real fleet of SSH hosts for the fleet tests: one Debian ``sshd`` per host, on loopback.

Each host has its own ``sshd`` process (``/usr/sbin/sshd -D``), its own host key, its own Unix
login user (created with ``useradd``, removed at the end) with its own home and release folder,
and its own address ``127.<worker>.0.<n>`` on a port chosen free (loopback only; two xdist
workers get different address ranges). A client key pair and a ``known_hosts`` file are made
per run. If ``sshd`` cannot start, the fixture fails: the tests never skip for want of it.

Network namespaces were considered (see tests/test_postgres.py): distinct loopback addresses
are what this fixture uses; a host "whose network dies" is simulated by stopping its sshd
processes with SIGSTOP (:meth:`Host.freeze`).

:func:`health_servers` gives each host a small HTTP server on its own address (one port for
all), answering ``/health`` from the host's ``current`` release, for per-host health checks.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
#: How many hosts the fleet has.
SIZE = 6


@dataclass
class Host:
    """One host of the fleet."""

    name: str
    address: str
    port: int
    user: str
    home: Path
    host_key: Path
    public_host_key: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    frozen: list[int] = field(default_factory=list)

    @property
    def spec(self) -> str:
        """``user@address:port``, as ``hosts([...])`` takes it."""
        return f"{self.user}@{self.address}:{self.port}"

    @property
    def releases(self) -> Path:
        return self.home / "releases"

    @property
    def current(self) -> Path:
        return self.home / "current"

    def known_hosts_line(self) -> str:
        return f"[{self.address}]:{self.port} {self.public_host_key}"

    def sshd_pids(self) -> list[int]:
        """The listening sshd and every sshd process under it (one per connection)."""
        assert self.proc is not None
        pids = [self.proc.pid]
        changed = True
        while changed:
            changed = False
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) in pids:
                    continue
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                comm = stat.split("(", 1)[1].rsplit(")", 1)[0]
                if ppid in pids and comm.startswith("sshd"):
                    pids.append(int(entry))
                    changed = True
        return pids

    def freeze(self) -> None:
        """Stop the host answering: SIGSTOP to its sshd processes (its network goes silent)."""
        self.frozen = self.sshd_pids()
        for pid in self.frozen:
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.frozen = []

    def processes(self, name: str) -> list[int]:
        """Pids of this host's user running a program called ``name``."""
        uid = pwd.getpwnam(self.user).pw_uid
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}").st_uid != uid:
                    continue
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if comm == name and state not in ("Z", "X"):
                found.append(int(entry))
        return found

    def reset(self) -> None:
        """Empty the host's releases and ``current`` (as root; the user owns what is made)."""
        if self.current.is_symlink() or self.current.exists():
            self.current.unlink()
        shutil.rmtree(self.releases, ignore_errors=True)
        self.releases.mkdir()
        shutil.chown(self.releases, self.user, self.user)


@dataclass
class Fleet:
    """The running fleet and the client's files."""

    hosts: list[Host]
    client_key: Path
    known_hosts: Path
    root: Path

    def regions(self) -> dict[str, list[Host]]:
        """Three regions: canary (1 host), eu (2), us (the rest)."""
        return {"canary": self.hosts[:1], "eu": self.hosts[1:3], "us": self.hosts[3:]}


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True, capture_output=True,
    )  # fmt: skip
    kind, blob = path.with_suffix(".pub").read_text().split()[:2]
    return f"{kind} {blob}"


def _wait_listening(host: Host, deadline: float) -> None:
    assert host.proc is not None
    while time.monotonic() < deadline:
        if host.proc.poll() is not None:
            log = host.log.read_text() if host.log and host.log.exists() else ""
            pytest.fail(f"sshd for {host.name} exited with {host.proc.returncode}:\n{log}")
        try:
            with socket.create_connection((host.address, host.port), timeout=0.5) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail(f"sshd for {host.name} did not answer on {host.address}:{host.port}")


def start_fleet(root: Path, worker: int, size: int = SIZE) -> Fleet:
    """Create the users, keys and configs, start every sshd, wait until each answers."""
    if os.geteuid() != 0:
        pytest.fail("the SSH fleet needs root (useradd, sshd); run the fleet tests as root")
    if not os.path.exists(SSHD):
        pytest.fail(f"{SSHD} is missing: install Debian's openssh-server")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    client_key = root / "client_key"
    client_pub = _keygen(client_key)
    hosts: list[Host] = []
    tag = f"{os.getpid() % 100000}"
    try:
        for n in range(size):
            name = f"host{n + 1}"
            user = f"syf{tag}w{worker}h{n + 1}"
            address = f"127.{10 + worker}.0.{n + 2}"
            subprocess.run(
                ["useradd", "--create-home", "--shell", "/bin/sh", "--password", "*", user],
                check=True, capture_output=True,
            )  # fmt: skip
            home = Path(pwd.getpwnam(user).pw_dir)
            ssh_dir = home / ".ssh"
            ssh_dir.mkdir(mode=0o700)
            (ssh_dir / "authorized_keys").write_text(client_pub + "\n")
            (home / "releases").mkdir()
            for p in (ssh_dir, ssh_dir / "authorized_keys", home / "releases"):
                shutil.chown(p, user, user)
            (ssh_dir / "authorized_keys").chmod(0o600)
            hdir = root / name
            hdir.mkdir()
            host_key = hdir / "host_key"
            pub = _keygen(host_key)
            host = Host(name, address, _free_port(address), user, home, host_key, pub)
            hosts.append(host)
            config = hdir / "sshd_config"
            config.write_text(
                "\n".join([
                    f"ListenAddress {address}:{host.port}",
                    f"HostKey {host_key}",
                    f"PidFile {hdir / 'sshd.pid'}",
                    f"AllowUsers {user}",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "UsePAM no",
                    "PermitRootLogin no",
                    "Subsystem sftp internal-sftp",
                    "MaxStartups 100:30:200",
                    "MaxSessions 50",
                    "LogLevel INFO",
                    "",
                ])
            )  # fmt: skip
            host.log = hdir / "sshd.log"
            host.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config), "-E", str(host.log)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        for host in hosts:
            _wait_listening(host, deadline)
    except BaseException:
        stop_fleet(hosts)
        raise
    known_hosts = root / "known_hosts"
    known_hosts.write_text("".join(h.known_hosts_line() + "\n" for h in hosts))
    return Fleet(hosts, client_key, known_hosts, root)


def stop_fleet(hosts: list[Host]) -> None:
    """Stop every sshd (and what runs under it), remove the users and their homes."""
    for host in hosts:
        host.thaw()
        if host.proc is not None and host.proc.poll() is None:
            for pid in host.sshd_pids():
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                host.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                host.proc.kill()
                host.proc.wait()
        for pid in _pids_of(host.user):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["userdel", "--remove", host.user], capture_output=True)


def _pids_of(user: str) -> list[int]:
    """Pids of the processes run by ``user`` (one of the fleet's own users)."""
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
                pids.append(int(entry))
        except OSError:
            pass
    return pids


class _HealthHandler(BaseHTTPRequestHandler):
    """``GET /health``: 200 and the file's text when ``current/healthy`` exists, else 503."""

    server: _HealthServer

    def do_GET(self) -> None:
        path = self.server.host.current / "healthy"
        try:
            status, body = 200, path.read_bytes()
        except OSError:
            status, body = 503, b"unhealthy: no current/healthy"
        if self.path != "/health":
            status, body = 404, b"not found"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


class _HealthServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: Host, port: int) -> None:
        self.host = host
        super().__init__((host.address, port), _HealthHandler)


@contextlib.contextmanager
def health_servers(hosts: list[Host]) -> Iterator[int]:
    """One HTTP server per host, on the host's address and a port common to all; the port."""
    for _ in range(20):
        port = _free_port(hosts[0].address)
        servers: list[_HealthServer] = []
        try:
            for h in hosts:
                servers.append(_HealthServer(h, port))
        except OSError:
            for srv in servers:
                srv.server_close()
            continue
        break
    else:
        pytest.fail("no port free on every fleet address for the health servers")
    threads = [threading.Thread(target=srv.serve_forever, daemon=True) for srv in servers]
    for t in threads:
        t.start()
    try:
        yield port
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()
        for t in threads:
            t.join()


@pytest.fixture(scope="session", name="fleet")
def fleet_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The session's fleet of real sshd hosts (see the module docstring)."""
    worker_id = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    worker = int(worker_id[2:]) if worker_id[2:].isdigit() else 0
    fleet = start_fleet(tmp_path_factory.mktemp("fleet"), worker)
    try:
        yield fleet
    finally:
        stop_fleet(fleet.hosts)
