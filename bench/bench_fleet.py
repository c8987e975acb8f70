"""Fleet figures (#16), on the tests' real sshd fleet (tests/sshd_fleet.py: one sshd, host key and
user per host, each on its own loopback address; needs root).

- **16a** ``shipyard deploy`` of one ``sy.ssh("true", hosts=<20 hosts>, batch=20)`` step, whole
  process, against the floor: ``python`` running a plain asyncssh loop that connects to the 20
  hosts concurrently (same keys, same known_hosts), runs ``true`` on each and closes. Both
  include the interpreter's start and asyncssh's import. Target: at most 1.2x.
- **16b** the marginal cost of a further step on already-connected hosts: a pipeline of
  ``STEPS`` such steps against one of a single step, the difference divided by ``STEPS - 1``
  (the median of the differences of runs paired by round); the floor is the same difference
  for the asyncssh loop doing ``STEPS`` rounds of ``exec true`` on its open connections instead
  of one: the client's own exec round trip on 20 hosts, starting the program as Shipyard's
  command does (it must: a signal sent over the channel has to reach the program, not a shell).
  Target: at most 1.2x. The details also give the round trip of a bare ``true``, a builtin of
  the login shell that starts no process at all.
- **16c** the peak RSS (``VmHWM``) of ``shipyard deploy`` of one ``sy.ssh("true")`` step on 100
  hosts with ``batch=100`` (100 sshd on 100 loopback addresses). Target: under 150 MB.

Runs are interleaved (rotating who goes first) and medians reported (bench/_common.py).

    python bench/bench_fleet.py [--runs N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from _common import Options
from _common import figure
from _common import interleaved
from _common import median
from _common import python
from _common import run_process
from _common import shipyard_exe
from _common import tmpdir
from _common import walls_ms

ROOT = Path(__file__).resolve().parents[1]
HOSTS = 20
STEPS = 11
BIG = 100
TARGET = 1.2
RSS_LIMIT_MB = 150

_FLOOR = """
import asyncio, sys
import asyncssh

async def main():
    command, rounds, key, kh, *specs = sys.argv[1:]

    async def connect(spec):
        user, rest = spec.split("@")
        addr, port = rest.split(":")
        return await asyncssh.connect(addr, port=int(port), username=user, client_keys=[key],
                                      known_hosts=kh, agent_path=None)

    conns = await asyncio.gather(*(connect(s) for s in specs))
    for _ in range(int(rounds)):
        results = await asyncio.gather(*(c.run(command, check=True) for c in conns))
        assert [r.exit_status for r in results] == [0] * len(conns)
    for c in conns:
        c.close()
    await asyncio.gather(*(c.wait_closed() for c in conns))

asyncio.run(main())
"""


def _pipelines(fleet: Any, steps: int, batch: int) -> str:
    specs = [h.spec for h in fleet.hosts]
    step = (
        f"sy.ssh('true', hosts=FLEET, batch={batch}, known_hosts={str(fleet.known_hosts)!r}, "
        f"client_keys=[{str(fleet.client_key)!r}])"
    )
    return (
        "import shipyard as sy\n"
        f"FLEET = sy.hosts('fleet', {specs!r})\n"
        "@sy.pipeline()\n"
        "def bench(d):\n"
        f"    return [sy.stage('run', {', '.join([step] * steps)})]\n"
    )


def _fleet(root: Path, worker: int, size: int) -> Any:
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    import sshd_fleet

    return sshd_fleet.start_fleet(root / "fleet", worker=worker, size=size)


def _stop(fleet: Any) -> None:
    import sshd_fleet

    sshd_fleet.stop_fleet(fleet.hosts)


def timings(runs: int = 7) -> dict[str, Any]:
    """Figures 16a and 16b: whole processes, shipyard against the plain asyncssh loop."""
    with tmpdir("fleet") as t:
        root = Path(t)
        fleet = _fleet(root, worker=40, size=HOSTS)
        try:
            project = root / "project"
            project.mkdir()
            for n in (1, STEPS):
                (project / f"pipelines{n}.py").write_text(_pipelines(fleet, n, HOSTS))
            (root / "floor.py").write_text(_FLOOR)
            exe, versions = shipyard_exe(), itertools.count()
            specs = [h.spec for h in fleet.hosts]
            keys = [str(fleet.client_key), str(fleet.known_hosts)]

            def ours(n: int) -> Any:
                argv = [exe, "-f", f"pipelines{n}.py", "--history", str(root / f"h{n}.db"),
                        "deploy", "bench", f"1.{next(versions)}", "-e", "bench"]  # fmt: skip
                return lambda: run_process(argv, cwd=project)

            def floor(n: int, command: str = "true") -> Any:
                argv = [python(), str(root / "floor.py"), command, str(n), *keys, *specs]
                return lambda: run_process(argv, cwd=project)

            commands = {
                "shipyard1": ours(1), "floor1": floor(1),
                f"shipyard{STEPS}": ours(STEPS), f"floor{STEPS}": floor(STEPS),
                # Not the floor, a detail: the same rounds running `true` as a process (the
                # login shell execs /usr/bin/true, as Shipyard's command does) rather than as
                # the shell's builtin.
                "exec1": floor(1, "exec true"), f"exec{STEPS}": floor(STEPS, "exec true"),
            }  # fmt: skip
            ms = {k: walls_ms(v) for k, v in interleaved(commands, runs=runs).items()}
        finally:
            _stop(fleet)
    med = {k: median(v) for k, v in ms.items()}

    def marginal(name: str) -> float:
        # Paired by round (the runs of a round are seconds apart): a busy moment of the
        # machine hits both runs of a pair rather than one median only.
        pairs = zip(ms[f"{name}{STEPS}"], ms[f"{name}1"], strict=True)
        return median([many - one for many, one in pairs]) / (STEPS - 1)

    step, round_trip = marginal("shipyard"), marginal("floor")
    exec_round_trip = marginal("exec")
    return {
        "hosts": HOSTS,
        "runs": runs,
        "shipyard_median_ms": round(med["shipyard1"], 1),
        "floor_median_ms": round(med["floor1"], 1),
        "ratio": round(med["shipyard1"] / med["floor1"], 3),
        "steps": STEPS,
        f"shipyard_{STEPS}_steps_median_ms": round(med[f"shipyard{STEPS}"], 1),
        f"floor_{STEPS}_rounds_median_ms": round(med[f"floor{STEPS}"], 1),
        "marginal_step_ms": round(step, 2),
        "marginal_round_trip_ms": round(round_trip, 2),
        "marginal_ratio": round(step / round_trip, 3),
        "marginal_exec_program_round_trip_ms": round(exec_round_trip, 2),
        "marginal_ratio_to_exec_program": round(step / exec_round_trip, 3),
        "target_ratio": TARGET,
    }


def peak_rss(runs: int = 3) -> dict[str, Any]:
    """Figure 16c: peak RSS of a deployment to 100 hosts at once."""
    with tmpdir("fleet100") as t:
        root = Path(t)
        fleet = _fleet(root, worker=42, size=BIG)
        try:
            project = root / "project"
            project.mkdir()
            (project / "pipelines.py").write_text(_pipelines(fleet, 1, BIG))
            hwm = []
            for i in range(runs + 1):
                argv = [shipyard_exe(), "--history", str(root / "h.db"), "deploy", "bench",
                        f"1.{i}", "-e", "bench"]  # fmt: skip
                r = run_process(argv, cwd=project, poll_hwm=True)
                if i:  # the first run warms the page cache and creates the history
                    hwm.append(r.hwm_kib or 0)
        finally:
            _stop(fleet)
    return {"hosts": BIG, "runs": runs, "peak_rss_mb": round(max(hwm) / 1024, 1),
            "limit_mb": RSS_LIMIT_MB}  # fmt: skip


def figures(opts: Options) -> list[dict[str, Any]]:
    """The rows of bench/run.py's table for figure 16."""
    t = timings(opts.runs)
    m = peak_rss()
    return [
        figure("16a", f"ssh('true') on {HOSTS} hosts, batch={HOSTS}, whole process",
               measured=t["shipyard_median_ms"], unit="ms", floor=t["floor_median_ms"],
               floor_label="plain asyncssh loop", max_ratio=TARGET, details=t),
        figure("16b", f"a further ssh('true') step on {HOSTS} connected hosts",
               measured=t["marginal_step_ms"], unit="ms",
               floor=t["marginal_exec_program_round_trip_ms"],
               floor_label="asyncssh exec of `exec true` on the same hosts", max_ratio=TARGET,
               details={k: v for k, v in t.items() if k.startswith("marginal")}),
        figure("16c", f"peak RSS, ssh('true') on {BIG} hosts, batch={BIG}",
               measured=m["peak_rss_mb"], unit="MB", max_value=RSS_LIMIT_MB, strict=True,
               details=m),
    ]  # fmt: skip


def run(runs: int = 7) -> dict[str, Any]:
    """Figure 16a alone (what bench/run.py's ``fleet`` calls today)."""
    return timings(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    rows = figures(Options(runs=parser.parse_args().runs))
    print(json.dumps(rows, indent=1))
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
