"""A real PostgreSQL cluster for the tests: ``initdb`` + ``pg_ctl`` on a free loopback port.

Started once per test session (tests/conftest.py), in about a second. As root (CI runs as root,
and PostgreSQL refuses to run as root) the cluster is made and run by the ``postgres`` user
Debian's package creates. Every test store is a schema of its own in one database (or a database
of its own where a test needs one), so nothing is shared between tests but the server.

By hand: ``python tests/pg_cluster.py up DIR`` prints a URL; ``python tests/pg_cluster.py down DIR``.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

#: The role the tests connect as; its password is made at start.
ROLE = "shipyard"


def bindir() -> Path:
    """Where Debian's PostgreSQL keeps initdb and pg_ctl (the newest version installed)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError(
        "PostgreSQL is not installed (no initdb): apt-get install postgresql, as .ci/run does"
    )


def _version_key(path: str) -> tuple[int, ...]:
    part = Path(path).parent.parent.name
    return tuple(int(x) for x in part.split(".") if x.isdigit())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_owner(argv: list[str]) -> list[str]:
    """Run as ``postgres`` when we are root; as ourselves otherwise."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


class Cluster:
    """One running cluster: ``url(dbname, schema)`` gives a store URL on it."""

    def __init__(self, root: Path, port: int, password: str) -> None:
        self.root = root
        self.port = port
        self.password = password
        self.data = root / "data"
        self.sockets = root / "sockets"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def url(self, dbname: str = "shipyard", schema: str | None = None, *, password: bool = True,
            port_override: int | None = None, **params: str) -> str:  # fmt: skip
        auth = f"{ROLE}:{quote(self.password, safe='')}" if password else ROLE
        query = dict(params)
        if schema:
            query["options"] = f"-csearch_path={schema}"
        qs = "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
        port = port_override or self.port
        return f"postgresql://{auth}@127.0.0.1:{port}/{dbname}" + (f"?{qs}" if qs else "")

    def psql(self, sql: str, dbname: str = "shipyard") -> str:
        """Run ``sql`` as the superuser over the unix socket; returns the output."""
        out = subprocess.run(
            _as_owner([str(bindir() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                       "-h", str(self.sockets), "-p", str(self.port), "-d", dbname, "-c", sql]),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {out.stderr.strip()}")
        return out.stdout

    def create_database(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}" OWNER {ROLE}', dbname="postgres")
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            _as_owner([str(bindir() / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                       "stop"]),
            capture_output=True, timeout=60,
        )  # fmt: skip


def start(root: Path | None = None, *, netns: str | None = None,
          listen: str = "127.0.0.1") -> Cluster:  # fmt: skip
    """Make and start a cluster under ``root`` (a new temporary folder by default).

    ``netns``: run the server inside that network namespace (made by the test), listening on
    ``listen`` there; its unix socket is reachable from everywhere.
    """
    if root is None:
        # Not under pytest's folders: those are private to root, and the server runs as postgres.
        root = Path(tempfile.mkdtemp(prefix="shipyard-pg-"))
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    _chown(root)
    port = free_port()
    password = secrets.token_urlsafe(12)
    cluster = Cluster(root, port, password)
    cluster.sockets.mkdir(exist_ok=True)
    _chown(cluster.sockets)
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    _chown(pwfile)
    bins = bindir()
    r = subprocess.run(
        _as_owner([str(bins / "initdb"), "-D", str(cluster.data), "-U", "postgres", "-A", "trust",
                   "--no-instructions", "-E", "UTF8", "--locale=C"]),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"initdb failed: {r.stderr.strip() or r.stdout.strip()}")
    conf = cluster.data / "postgresql.conf"
    with conf.open("a") as f:
        f.write(
            f"listen_addresses = '{listen}'\nport = {port}\n"
            f"unix_socket_directories = '{cluster.sockets}'\n"
            "max_connections = 300\nfsync = on\nshared_buffers = 64MB\n"
            "log_min_messages = warning\nlogging_collector = off\n"
        )
    # Passwords over TCP (as a real server asks), trust on the unix socket for the fixtures.
    (cluster.data / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        "host all all 10.0.0.0/8 scram-sha-256\nhost all all ::1/128 scram-sha-256\n"
    )
    in_ns = ["ip", "netns", "exec", netns] if netns else []
    r = subprocess.run(
        in_ns + _as_owner([str(bins / "pg_ctl"), "-D", str(cluster.data), "-l",
                           str(root / "server.log"), "-w", "-t", "60", "start"]),
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    if r.returncode != 0:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        raise RuntimeError(f"pg_ctl start failed: {r.stderr.strip()} {log[-2000:]}")
    cluster.psql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'", dbname="postgres")
    cluster.psql(f"CREATE DATABASE shipyard OWNER {ROLE}", dbname="postgres")
    return cluster


def _wait_gone(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("up", "down"):
        sys.exit("usage: python tests/pg_cluster.py up|down DIR")
    where = Path(sys.argv[2]).absolute()
    if sys.argv[1] == "up":
        c = start(where)
        (where / "port").write_text(str(c.port))
        print(c.url())
    else:
        port = int((where / "port").read_text())
        Cluster(where, port, "").stop()
        _wait_gone(where / "data" / "postmaster.pid")
