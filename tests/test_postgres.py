"""The PostgreSQL store seen from CI runners: separate ``shipyard`` processes sharing one store.

A "runner" here is a ``shipyard`` process with its own working folder and HOME, sharing with the
others only the store URL, as jobs on ephemeral CI runners do. The cluster is the test run's own
(tests/pg_cluster.py); each test gets a schema of its own in it. The port itself is checked by the
contract suite (tests/store_contract.py), which runs over both stores.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from runners import SHIPYARD
from runners import Fleet
from runners import done
from runners import out_of as _out
from tcp_relay import Relay


@pytest.fixture
def store_url(pg: Any) -> Iterator[str]:
    schema = f"r_{uuid.uuid4().hex[:12]}"
    pg.psql(f"CREATE SCHEMA {schema} AUTHORIZATION shipyard")
    yield pg.url(schema=schema)
    pg.psql(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def fleet(tmp_path: Path, store_url: str) -> Fleet:
    return Fleet(tmp_path, store_url)


# -- history and rollback across runners ------------------------------------------------------


def test_history_and_rollback_are_seen_from_another_runner(fleet: Fleet, pg: Any) -> None:
    a, b = fleet.runner(), fleet.runner()
    assert a.run("deploy", "web", "1.0", "-e", "prod").returncode == 0
    failed = a.run("deploy", "web", "1.1", "-e", "prod", "--var", "fail=1")
    assert failed.returncode == 1, _out(failed)
    seen = b.json("history")
    assert [(d["version"], d["status"]) for d in seen] == [("1.1", "failed"), ("1.0", "succeeded")]
    rb = b.run("rollback", "web", "-e", "prod")
    assert rb.returncode == 0, _out(rb)
    latest = a.json("history")[0]
    assert (latest["version"], latest["status"], latest["rollback_of"]) == (
        "1.0", "succeeded", seen[0]["id"])  # fmt: skip
    # The password never shows, even where the URL is printed: in an error naming the store.
    unreachable = fleet.url.replace(f":{pg.port}/", ":1/")
    shown = a.run("--store", unreachable, "history")
    assert shown.returncode == 2, _out(shown)
    assert "postgresql://shipyard:***@127.0.0.1:1/" in shown.stderr
    assert pg.password not in _out(shown)
    audit = b.json("show", str(latest["id"]))
    assert pg.password not in json.dumps(audit)


# -- locks across runners ---------------------------------------------------------------------


def test_ten_runners_racing_one_runs_and_nine_name_the_holder_and_its_runner(fleet: Fleet) -> None:
    runners = [fleet.runner() for _ in range(10)]
    release = fleet.root / "release"
    procs = [r.start("deploy", "web", f"1.{i}", "-e", "prod", "--var", f"sleep=until:{release}")
             for i, r in enumerate(runners)]  # fmt: skip
    # The winner holds the lock until the nine others have been refused.
    wait_for(lambda: sum(p.poll() is not None for p in procs) == 9, timeout=120,
             what="nine runners to be refused")  # fmt: skip
    release.touch()
    outs = [done(p) for p in procs]
    winners = [i for i, (rc, _) in enumerate(outs) if rc == 0]
    assert len(winners) == 1, outs
    w = winners[0]
    for i, (rc, out) in enumerate(outs):
        if i == w:
            continue
        assert rc == 3, out
        assert "is locked by deployment" in out, out
        assert f"version 1.{w}" in out, out
        assert f"runner https://ci.example/jobs/r{w + 1}" in out, out
    assert len(fleet.runner().json("history")) == 1


def test_ten_runners_waiting_all_run_in_arrival_order_without_overlap(fleet: Fleet) -> None:
    first = fleet.runner().start("deploy", "web", "0", "-e", "prod", "--var", "sleep=3")
    procs = [first]
    try:
        wait_for(lambda: fleet.started("0"), timeout=60, what="the first deployment to start")
        for i in range(1, 10):
            p = fleet.runner().start("deploy", "web", str(i), "-e", "prod", "--wait-lock",
                                     "300", "--var", "sleep=0.2")  # fmt: skip
            procs.append(p)
            # Queued (or running) before the next one starts: the arrival order is known.
            wait_for(lambda p=p, i=i: _waiting(p) or fleet.started(str(i)), timeout=60,
                     what=f"runner {i} to queue")  # fmt: skip
        for p in procs:
            rc, out = done(p, timeout=300)
            assert rc == 0, out
    finally:
        for p in procs:  # whatever happened, no runner is left behind, no pipe open
            if p.poll() is None:
                p.kill()
            if p.stdout is not None and not p.stdout.closed:
                p.communicate()
    events = fleet.events()
    starts = [v for w, v, _ in events if w == "start"]
    assert starts == [str(i) for i in range(10)], events
    spans: dict[str, dict[str, float]] = {}
    for what, version, ts in events:
        spans.setdefault(version, {})[what] = ts
    ordered = [spans[str(i)] for i in range(10)]
    for before, after in itertools.pairwise(ordered):
        assert before["end"] <= after["start"], ordered


def _waiting(p: subprocess.Popen[str]) -> bool:
    """Whether the runner said it is waiting for the lock (its stderr's first line)."""
    assert p.stderr is not None
    os.set_blocking(p.stderr.fileno(), False)
    chunk = p.stderr.readline()
    if chunk:
        p.__dict__.setdefault("_seen", []).append(chunk)
    return "waiting for the lock" in "".join(p.__dict__.get("_seen", []))


def test_kill_9_of_the_holder_frees_the_lock_at_once_and_it_is_interrupted(fleet: Fleet) -> None:
    holder = fleet.runner().start("deploy", "web", "1.0", "-e", "prod", "--var", "sleep=60")
    wait_for(lambda: fleet.started("1.0"), timeout=30, what="the holder's step to start")
    holder.kill()
    done(holder)
    killed_at = time.time()
    nxt = fleet.runner().run("deploy", "web", "2.0", "-e", "prod", "--wait-lock", "30")
    assert nxt.returncode == 0, _out(nxt)
    started = next(ts for w, v, ts in fleet.events() if w == "start" and v == "2.0")
    assert started - killed_at < 2.0 + _startup_allowance(), started - killed_at
    first = fleet.runner().json("history")[-1]
    assert (first["version"], first["status"]) == ("1.0", "interrupted"), first


def _startup_allowance() -> float:
    """The new runner's own start (Python and Shipyard import) is not lock hand-over time."""
    return 1.5


def test_a_sigstopped_holder_keeps_its_lock(fleet: Fleet) -> None:
    holder = fleet.runner().start("deploy", "web", "1.0", "-e", "prod", "--var", "sleep=2")
    wait_for(lambda: fleet.started("1.0"), timeout=30, what="the holder's step to start")
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        time.sleep(3)  # longer than its heartbeat interval: it is silent, not gone
        refused = fleet.runner().run("deploy", "web", "2.0", "-e", "prod")
        assert refused.returncode == 3, _out(refused)
        assert "locked by deployment 1" in _out(refused)
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    rc, out = done(holder)
    assert rc == 0, out
    assert fleet.runner().run("deploy", "web", "2.0", "-e", "prod").returncode == 0


def test_unlock_from_another_runner_ends_the_holders_session_and_it_stops(fleet: Fleet) -> None:
    holder = fleet.runner().start("deploy", "web", "1.0", "-e", "prod", "--var", "sleep=30")
    wait_for(lambda: fleet.started("1.0"), timeout=30, what="the holder's step to start")
    other = fleet.runner()
    r = other.run("unlock", "web", "-e", "prod", "--reason", "runner is stuck")
    assert r.returncode == 0, _out(r)
    rc, out = done(holder)
    assert rc == 1, out
    assert "the lock was lost" in out, out
    dep = other.json("show", "1")
    assert dep["status"] == "interrupted", dep
    assert "unlocked by" in dep["error"], dep
    assert "runner is stuck" in dep["error"], dep
    assert not any(w == "after" for w, _, _ in fleet.events())  # it stopped before its next step
    assert other.run("deploy", "web", "2.0", "-e", "prod").returncode == 0


def test_a_holder_whose_session_ends_stops_before_its_next_step(
    fleet: Fleet, pg: Any, store_url: str
) -> None:
    holder = fleet.runner().start("deploy", "web", "1.0", "-e", "prod", "--var", "sleep=4")
    wait_for(lambda: fleet.started("1.0"), timeout=30, what="the holder's step to start")
    # The server ends the session holding the lock (as after a network loss, or a DBA): that
    # session only, the one this store's lock row names (other tests share the cluster).
    schema = store_url.rsplit("search_path%3D", 1)[1]
    pg.psql(f"SELECT pg_terminate_backend(backend_pid) FROM {schema}.locks")
    rc, out = done(holder)
    assert rc == 1, out
    assert "the lock was lost" in out, out
    dep = fleet.runner().json("show", "1")
    assert dep["status"] == "interrupted", dep
    assert "the lock was lost" in dep["error"], dep
    assert not any(w == "after" for w, _, _ in fleet.events()), fleet.events()


# -- the database itself --------------------------------------------------------------------------


def test_an_unreachable_database_before_a_deploy_is_exit_2_naming_the_host(fleet: Fleet) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://shipyard:hunter2hunter2@127.0.0.1:{port}/shipyard"
    r = fleet.runner(url).run("deploy", "web", "1.0", "-e", "prod")
    assert r.returncode == 2, _out(r)
    assert "cannot connect to the history store" in r.stderr
    assert "127.0.0.1" in r.stderr
    assert "hunter2hunter2" not in _out(r)
    assert "Traceback" not in _out(r)
    assert not fleet.events()


def test_the_database_going_down_during_a_deploy_stops_it_and_it_is_recorded_so(
    fleet: Fleet, pg: Any, store_url: str
) -> None:
    proxy = Relay(pg.port)
    try:
        url = store_url.replace(f":{pg.port}/", f":{proxy.port}/")
        holder = fleet.runner(url).start("deploy", "web", "1.0", "-e", "prod", "--var", "sleep=4")
        wait_for(lambda: fleet.started("1.0"), timeout=30, what="the holder's step to start")
        proxy.cut(refuse=True)
        time.sleep(1.5)  # down for longer than a heartbeat: the lock's session ended with it
        proxy.restore()
        rc, out = done(holder)
        assert rc == 1, out
        assert "succeeded" not in out.splitlines()[-1], out
        assert "the lock was lost" in out, out
    finally:
        proxy.close()
    dep = fleet.runner().json("show", "1")
    assert dep["status"] == "interrupted", dep
    assert not any(w == "after" for w, _, _ in fleet.events()), fleet.events()


def test_a_deploy_that_cannot_record_its_end_never_reports_success(
    fleet: Fleet, pg: Any, store_url: str
) -> None:
    proxy = Relay(pg.port)
    try:
        url = store_url.replace(f":{pg.port}/", f":{proxy.port}/")
        runner = fleet.runner(url)
        runner.env["SHIPYARD_STORE_RETRY"] = "2"
        holder = runner.start("deploy", "web", "1.0", "-e", "prod", "--var", "sleep=2")
        wait_for(lambda: fleet.started("1.0"), timeout=30, what="the holder's step to start")
        proxy.cut(refuse=True)  # and it stays down
        rc, out = done(holder)
    finally:
        proxy.close()
    assert rc not in (0, 3), out
    assert "history store" in out, out
    assert "deployment #1 succeeded" not in out, out
    assert "Traceback" not in out, out
    # What the store says afterwards is true: the deployment did not finish as far as it knows.
    dep = fleet.runner().json("show", "1")
    assert dep["status"] in ("running", "interrupted"), dep
    assert dep["status"] != "succeeded"


def test_five_first_runs_at_once_against_an_empty_database_all_succeed(
    fleet: Fleet, pg: Any
) -> None:
    url = pg.create_database(f"first_{uuid.uuid4().hex[:8]}")
    procs = [fleet.runner(url).start("deploy", "web", "1.0", "-e", f"env{i}") for i in range(5)]
    for p in procs:
        rc, out = done(p)
        assert rc == 0, out
    assert len(fleet.runner(url).json("history")) == 5


def test_a_transaction_pooler_is_refused(fleet: Fleet, pg: Any, tmp_path: Path) -> None:
    bouncer = _pgbouncer(pg)
    try:
        url = pg.url(port_override=bouncer.port)
        r = fleet.runner(url).run("deploy", "web", "1.0", "-e", "prod")
    finally:
        bouncer.stop()
    assert r.returncode == 2, _out(r)
    assert "transaction-mode pooler" in r.stderr, _out(r)
    assert not fleet.events()


class _Bouncer:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, root: Path) -> None:
        self.proc, self.port, self.root = proc, port, root

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _pgbouncer(pg: Any) -> _Bouncer:
    import shutil
    import tempfile

    import pg_cluster

    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    root = Path(tempfile.mkdtemp(prefix="shipyard-bouncer-"))
    os.chmod(root, 0o755)
    port = pg_cluster.free_port()
    (root / "users.txt").write_text('"shipyard" "unused"\n')
    (root / "bouncer.ini").write_text(textwrap.dedent(f"""
        [databases]
        shipyard = host={pg.sockets} port={pg.port} dbname=shipyard user=shipyard
        [pgbouncer]
        listen_addr = 127.0.0.1
        listen_port = {port}
        unix_socket_dir =
        auth_type = trust
        auth_file = {root}/users.txt
        pool_mode = transaction
        default_pool_size = 4
        ignore_startup_parameters = options,extra_float_digits
        logfile = {root}/bouncer.log
        pidfile = {root}/bouncer.pid
        """))  # fmt: skip
    for p in root.iterdir():
        pg_cluster._chown(p)
    pg_cluster._chown(root)
    proc = subprocess.Popen(pg_cluster._as_owner([exe, str(root / "bouncer.ini")]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, timeout=30, what="pgbouncer to listen")
    return _Bouncer(proc, port, root)


# -- a runner whose network vanishes ----------------------------------------------------------


class Namespaces:
    """Two network namespaces made by the test: the database's, and a runner's, joined by a
    veth pair (10.201.N.1 and 10.201.N.2). Nothing outside them is touched."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.db, self.runner = f"sy-db-{tag}", f"sy-run-{tag}"
        self.net = int(tag[:2], 16)
        self.db_ip, self.runner_ip = f"10.201.{self.net}.1", f"10.201.{self.net}.2"
        self.made: list[str] = []
        for ns in (self.db, self.runner):
            self._ip("netns", "add", ns)
            self.made.append(ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", self.db, "link", "add", "vdb", "type", "veth", "peer", "name", "vrun",
                 "netns", self.runner)  # fmt: skip
        self._ip("-n", self.db, "addr", "add", f"{self.db_ip}/30", "dev", "vdb")
        self._ip("-n", self.runner, "addr", "add", f"{self.runner_ip}/30", "dev", "vrun")
        self._ip("-n", self.db, "link", "set", "vdb", "up")
        self._ip("-n", self.runner, "link", "set", "vrun", "up")

    @staticmethod
    def _ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def cut(self) -> None:
        """The runner's network vanishes: its end of the link goes down, silently for the
        database (no reset reaches it; only its keepalives can tell)."""
        self._ip("-n", self.runner, "link", "set", "vrun", "down")

    def remove(self) -> None:
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    if os.geteuid() != 0:
        pytest.fail("this test makes network namespaces: run it as root (CI does)")
    ns = Namespaces()
    try:
        yield ns
    finally:
        ns.remove()


def test_a_runner_whose_network_vanishes_loses_the_lock_and_the_next_proceeds(
    fleet: Fleet, namespaces: Namespaces
) -> None:
    import shutil

    import pg_cluster

    server = pg_cluster.start(netns=namespaces.db, listen=f"127.0.0.1,{namespaces.db_ip}")
    try:
        over_the_link = server.url().replace("127.0.0.1", namespaces.db_ip)
        # The other runner reaches the same server through its unix socket.
        local = f"postgresql://shipyard@/shipyard?host={server.sockets}&port={server.port}"
        far = fleet.runner(over_the_link)
        argv = ["ip", "netns", "exec", namespaces.runner, str(SHIPYARD), "deploy", "web", "1.0",
                "-e", "prod", "--var", "sleep=120"]  # fmt: skip
        holder = subprocess.Popen(argv, cwd=far.dir, env=far.env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        wait_for(lambda: fleet.started("1.0"), timeout=60, what="the far runner's step to start")
        namespaces.cut()
        cut_at = time.time()
        near = fleet.runner(local)
        nxt = near.run("deploy", "web", "2.0", "-e", "prod", "--wait-lock", "60", timeout=120)
        assert nxt.returncode == 0, _out(nxt)
        started = next(ts for w, v, ts in fleet.events() if w == "start" and v == "2.0")
        assert started - cut_at < 30, started - cut_at
        first = near.json("show", "1")
        assert first["status"] == "interrupted", first
        assert "session ended" in first["error"], first
        # The far runner found out too: it stopped, and said why (it cannot record it).
        rc, out = done(holder, timeout=120)
        assert rc != 0, out
        assert "the lock was lost" in out, out
        assert not any(w == "end" and v == "1.0" for w, v, _ in fleet.events())
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


# -- what a deployment costs the database ------------------------------------------------------

LOUD = textwrap.dedent(
    """
    import shipyard as sy


    def shout(n):
        for i in range(int(n)):
            print(f"line {i}")


    @sy.pipeline(rollback="manual")
    def loud(d):
        n = d.vars["lines"]
        return [sy.stage(f"s{k}", *[sy.python(shout, n, name=f"p{k}{j}") for j in range(3)])
                for k in range(3)]
    """
)


def _commits(pg: Any, db: str) -> int:
    """Transactions committed in database ``db`` so far, once the count has settled (a closed
    session reports its own when it ends)."""
    last = None
    while True:
        now = int(pg.psql(f"SELECT xact_commit FROM pg_stat_database WHERE datname='{db}'"))
        if now == last:
            return now
        last = now
        time.sleep(0.5)


def test_commits_grow_with_stages_and_steps_not_with_log_lines(
    fleet: Fleet, pg: Any, tmp_path: Path
) -> None:
    counts = {}
    for lines in (10, 1500):
        db = f"commits_{lines}_{uuid.uuid4().hex[:6]}"
        url = pg.create_database(db)
        r = fleet.runner(url)
        r.env["SHIPYARD_HEARTBEAT"] = "600"  # no heartbeat in these short runs: commits only
        (r.dir / "pipelines.py").write_text(LOUD)
        assert r.run("store", "migrate", url).returncode == 0
        before = _commits(pg, db)
        out = r.run("deploy", "loud", "1", "-e", "x", "--var", f"lines={lines}")
        assert out.returncode == 0, _out(out)
        # The deploy's own commits only: the psql of _commits is one more, counted alike.
        counts[lines] = _commits(pg, db) - before
        shown = r.run("logs", "1")
        assert shown.stdout.count("line ") == 9 * lines
    # 13,500 lines more cost a few commits more (the time-based flushes of a longer run, at
    # most two a second), not one per line, nor one per batch of lines.
    assert counts[1500] <= counts[10] + 20, counts
    # 3 stages of 3 steps: a few transactions each (every autocommit read counts, heartbeats
    # too), nowhere near one per line.
    assert counts[10] <= 60, counts
