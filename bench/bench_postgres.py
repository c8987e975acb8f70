"""Figure 11: the PostgreSQL store, on a cluster this run starts (initdb + pg_ctl, loopback).

- 11a: ``--help``, ``list`` and ``plan`` with a ``postgresql://`` store import no psycopg module
  (counted in the process itself);
- 11b: ``shipyard --help`` with a PostgreSQL store set, beside the same without: unchanged;
- 11c: ``rollback_target`` at 1,000,000 PostgreSQL deployments, in process: <= 3x the same
  indexed queries run with psycopg directly;
- 11d: ``shipyard history -n 20`` at 1,000,000 PostgreSQL deployments, whole process: <= 150 ms
  (the floor: a Python script that connects with psycopg and prints the same 20 rows);
- 11e: the marginal cost of a no-op step on PostgreSQL: <= 2x the same figure on SQLite,
  measured in the same run;
- 11f: lock hand-over between two runners, from the holder's last step ending to the waiter's
  first step starting: <= 100 ms.

The 1M-deployment data is bench_history's generator (the same rows as figure 7), loaded with
COPY into a schema Shipyard created, then ANALYZEd (as any DBA's autovacuum would).
"""

from __future__ import annotations

import atexit
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import bench_history
from _common import ROOT
from _common import Options
from _common import child_env
from _common import figure
from _common import interleaved
from _common import median
from _common import python
from _common import run_process
from _common import shipyard_exe
from _common import spread
from _common import tmpdir
from _common import walls_ms
from bench_steps import LARGE
from bench_steps import SMALL
from bench_steps import _marginal
from bench_steps import steps_pipelines

_CLUSTER: list[Any] = []


def cluster() -> Any:
    """This run's cluster (tests/pg_cluster.py), started on first use.

    :func:`postgres` stops it when its figures are taken: left running, the autovacuum of its
    million-row tables would compete for the CPU with the benchmarks after it (seen: figure 16a
    at 1.21x in a full run against 1.13x alone). At exit, whatever is left is stopped too.
    """
    if not _CLUSTER:
        sys.path.insert(0, str(ROOT / "tests"))
        import pg_cluster

        _CLUSTER.append(pg_cluster.start())
        atexit.register(stop_cluster)
    return _CLUSTER[0]


def stop_cluster() -> None:
    """Stop this run's cluster and remove its files, if it was started."""
    import shutil

    while _CLUSTER:
        c = _CLUSTER.pop()
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)


def _schema_url(c: Any, name: str) -> str:
    c.psql(f"DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name} AUTHORIZATION shipyard")
    return str(c.url(schema=name))


def _load_1m(url: str) -> float:
    """Create Shipyard's schema at ``url`` and COPY the 1M deployments in; returns seconds."""
    import psycopg
    from shipyard.sdk import open_store

    open_store(url).close()  # Shipyard's own schema, indexes and metadata
    cols = ", ".join(f'"{c}"' for c in bench_history.COLUMNS)
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.cursor() as cur, cur.copy(f"COPY deployments ({cols}) FROM STDIN") as cp:
            for row in bench_history._rows(bench_history.ROWS):
                cp.write_row(row)
        conn.execute("SELECT setval(pg_get_serial_sequence('deployments', 'id'), "
                     "(SELECT max(id) FROM deployments))")  # fmt: skip
        conn.execute("ANALYZE deployments")
    return time.perf_counter() - t0


_RETURNED = bench_history.RETURNED.replace(" user,", ' "user",')
RAW_GET = f"SELECT {_RETURNED} FROM deployments WHERE id=%s"
RAW_ROLLBACK = (
    f"SELECT {_RETURNED} FROM deployments d "
    "WHERE d.pipeline=%s AND d.environment=%s AND d.status='succeeded' AND d.started_at<%s "
    "AND d.version<>%s AND NOT EXISTS (SELECT 1 FROM deployments r WHERE r.rollback_of=d.id) "
    "ORDER BY d.started_at DESC LIMIT 1"
)
RAW_LIST = (
    f"SELECT {_RETURNED} FROM deployments ORDER BY started_at DESC NULLS LAST, id DESC LIMIT 20"
)
_FLOOR_CLI = (
    "import sys, psycopg\n"
    "with psycopg.connect(sys.argv[1]) as db:\n"
    "    for row in db.execute(sys.argv[2]):\n"
    "        print(*row)\n"
)
_COUNT_PSYCOPG = (
    "import sys\nfrom shipyard._cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    "print(sum(m.split('.')[0] in ('psycopg', 'psycopg_binary', 'psycopg_c') "
    "for m in sys.modules), file=sys.stderr)\n"
)


def postgres(opts: Options) -> dict[str, Any]:
    """Figure 11: the PostgreSQL store at 1M deployments, its steps and its lock hand-over."""
    try:
        return _postgres(opts, cluster())
    finally:
        stop_cluster()


def _postgres(opts: Options, c: Any) -> dict[str, Any]:
    figures: list[dict[str, Any]] = []
    exe = shipyard_exe()
    with tmpdir("pg") as tmp_s:
        tmp = Path(tmp_s)
        small_url = _schema_url(c, "bench_small")
        (tmp / "pipelines.py").write_text(steps_pipelines("python", 1))
        env_pg = child_env(SHIPYARD_STORE=small_url)
        run_process([exe, "deploy", "steps", "1", "-e", "bench"], cwd=tmp, env=env_pg)

        counts = {}
        for args in (["--help"], ["list"], ["plan", "steps", "1", "-e", "bench"]):
            out = subprocess.run([python(), "-c", _COUNT_PSYCOPG, *args], cwd=tmp, env=env_pg,
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
            counts[" ".join(args)] = int(out.stderr.strip().splitlines()[-1])
        figures.append(figure(
            "11a", "psycopg modules imported by --help, list, plan (postgresql:// store)",
            measured=float(sum(counts.values())), unit="modules", max_value=0.0,
            details=counts,
        ))  # fmt: skip

        runs = interleaved(
            {
                "pg": lambda: run_process([exe, "--help"], cwd=tmp, env=env_pg),
                "sqlite": lambda: run_process([exe, "--help"], cwd=tmp),
            },
            runs=max(opts.runs, 15),
        )
        helps = {k: walls_ms(v) for k, v in runs.items()}
        figures.append(figure(
            "11b", "shipyard --help with a postgresql:// store set (whole process)",
            measured=median(helps["pg"]), unit="ms", floor=median(helps["sqlite"]),
            floor_label="the same with the default SQLite store", max_ratio=1.1,
            details={k: spread(v) for k, v in helps.items()},
        ))  # fmt: skip

        figures += _history_1m(c, exe, tmp, opts)
        figures.append(_noop_steps(c, exe, tmp, opts))
        figures.append(_handover(c, exe, tmp, opts))
    return {"figures": figures}


def _history_1m(c: Any, exe: str, tmp: Path, opts: Options) -> list[dict[str, Any]]:
    import psycopg
    from shipyard.sdk import open_store

    url = _schema_url(c, "bench_1m")
    load_s = _load_1m(url)
    store = open_store(url, create=False)
    raw = psycopg.connect(url, autocommit=True)
    try:
        pipeline, environment = bench_history.PIPELINES[7], "production"
        x = store.latest(pipeline, environment)
        target = store.rollback_target(x["id"])

        def raw_rollback() -> Any:
            row = raw.execute(RAW_GET, (x["id"],)).fetchone()
            return raw.execute(RAW_ROLLBACK, (row[1], row[3], row[5], row[2])).fetchone()

        assert raw_rollback()[0] == target["id"], "the floor must find the same deployment"
        rb_sy, rb_raw = bench_history._time_pair(lambda: store.rollback_target(x["id"]),
                                                 raw_rollback, n=300, warmup=30)  # fmt: skip
        plan = [r[0] for r in raw.execute(
            "EXPLAIN " + RAW_ROLLBACK, (pipeline, environment, x["started_at"], "?"))]  # fmt: skip
    finally:
        store.close()
        raw.close()
    env = child_env(SHIPYARD_STORE=url)
    runs = interleaved(
        {
            "shipyard": lambda: run_process([exe, "history", "-n", "20"], cwd=tmp, env=env),
            "floor": lambda: run_process(
                [python(), "-c", _FLOOR_CLI, url, RAW_LIST], cwd=tmp, env=env
            ),
        },
        runs=max(opts.runs, 15),
        warmup=3,
    )
    cli = {k: walls_ms(v) for k, v in runs.items()}
    return [
        figure(
            "11c", "rollback_target() at 1M PostgreSQL deployments (in process)",
            measured=median(rb_sy), unit="us", floor=median(rb_raw),
            floor_label="same 2 indexed queries, psycopg directly", max_ratio=3.0,
            details={"shipyard_us": spread(rb_sy), "raw_us": spread(rb_raw), "plan": plan,
                     "deployment": x["id"], "target": target["id"],
                     "load_seconds": round(load_s, 1)},
        ),
        figure(
            "11d", "shipyard history -n 20 at 1M PostgreSQL deployments (whole process)",
            measured=median(cli["shipyard"]), unit="ms", floor=median(cli["floor"]),
            floor_label="python: import psycopg, connect, query, print 20 rows",
            max_value=150.0, details={k: spread(v) for k, v in cli.items()},
        ),
    ]  # fmt: skip


def _noop_steps(c: Any, exe: str, tmp: Path, opts: Options) -> dict[str, Any]:
    commands = {}
    for n in (SMALL, LARGE):
        f = tmp / f"pipelines_{n}.py"
        f.write_text(steps_pipelines("python", n))
        url = _schema_url(c, f"bench_steps_{n}")
        for store, where in (("pg", url), ("sqlite", str(tmp / f"steps_{n}.db"))):
            argv = [exe, "-f", str(f), "--store", where, "deploy", "steps", "1.0.0", "-e", "b"]
            commands[f"{store}{n}"] = lambda argv=argv: run_process(argv, cwd=tmp)
    runs = interleaved(commands, runs=opts.runs, warmup=1)
    ms = {k: walls_ms(v) for k, v in runs.items()}
    return figure(
        "11e", "no-op python step on PostgreSQL, marginal per step (history included)",
        measured=_marginal(ms, "pg"), unit="ms/step", floor=_marginal(ms, "sqlite"),
        floor_label="the same on the SQLite store, this run", max_ratio=2.0,
        details={k: spread(v) for k, v in ms.items()},
    )  # fmt: skip


_HANDOVER = textwrap.dedent(
    '''
    import time

    import shipyard as sy


    def mark(path, seconds):
        if path.endswith(".start"):
            with open(path, "w") as f:
                f.write(repr(time.time()))
        time.sleep(float(seconds))
        if path.endswith(".end"):
            with open(path, "w") as f:
                f.write(repr(time.time()))


    @sy.pipeline()
    def hand(d):
        """One step: write when it starts (the waiter) or ends (the holder)."""
        return [sy.stage("go", sy.python(mark, d.vars["mark"], d.vars["sleep"], name="mark"))]
    '''
)


def _handover(c: Any, exe: str, tmp: Path, opts: Options) -> dict[str, Any]:
    url = _schema_url(c, "bench_handover")
    folder = tmp / "handover"
    folder.mkdir()
    (folder / "pipelines.py").write_text(_HANDOVER)
    env = child_env(SHIPYARD_STORE=url)
    gaps = []
    for i in range(max(opts.runs, 10)):
        end, start = folder / f"{i}.end", folder / f"{i}.start"
        holder = subprocess.Popen(
            [exe, "deploy", "hand", f"a{i}", "-e", "x", "--var", f"mark={end}",
             "--var", "sleep=1.0"],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)  # the holder runs its step; the waiter starts and queues
        waiter = subprocess.Popen(
            [exe, "deploy", "hand", f"b{i}", "-e", "x", "--wait-lock", "60", "--var",
             f"mark={start}", "--var", "sleep=0"],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if holder.wait(timeout=120) != 0 or waiter.wait(timeout=120) != 0:
            raise RuntimeError("a hand-over deployment failed")
        gaps.append((float(start.read_text()) - float(end.read_text())) * 1000)
    return figure(
        "11f", "lock hand-over between two runners on PostgreSQL (holder's last step ends -> "
        "waiter's first step starts)", measured=median(gaps), unit="ms", max_value=100.0,
        details=spread(gaps),
    )  # fmt: skip
