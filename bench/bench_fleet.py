"""Fleet figure (#16): ``true`` on 20 hosts with ``batch=20``, against a plain asyncssh loop.

Starts the tests' real sshd fleet (tests/sshd_fleet.py: one sshd, host key and user per host, on
loopback; needs root), then times, interleaved, whole processes:

- ``shipyard deploy`` of a pipeline with one ``sy.ssh("true", hosts=<20 hosts>, batch=20)`` step
  (history in a temporary folder);
- the floor: ``python`` running a plain asyncssh loop that connects to the 20 hosts concurrently
  (same keys, same known_hosts), runs ``true`` on each and closes.

Both include the interpreter's start and asyncssh's import. Target: median ratio at most 1.2.

    python bench/bench_fleet.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOSTS = 20
TARGET = 1.2

_FLOOR = """
import asyncio, sys
import asyncssh

async def one(spec, key, kh):
    user, rest = spec.split("@")
    addr, port = rest.split(":")
    async with asyncssh.connect(addr, port=int(port), username=user, client_keys=[key],
                                known_hosts=kh, agent_path=None) as conn:
        r = await conn.run("true", check=True)
        return r.exit_status

async def main():
    key, kh, *specs = sys.argv[1:]
    codes = await asyncio.gather(*(one(s, key, kh) for s in specs))
    assert codes == [0] * len(specs)

asyncio.run(main())
"""


def _timed(argv: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - started) * 1000


def run(runs: int = 7) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "tests"))
    import sshd_fleet

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fleet = sshd_fleet.start_fleet(root / "fleet", worker=40, size=HOSTS)
        try:
            specs = [h.spec for h in fleet.hosts]
            project = root / "project"
            project.mkdir()
            (project / "pipelines.py").write_text(
                "import shipyard as sy\n"
                f"FLEET = sy.hosts('fleet', {specs!r})\n"
                "@sy.pipeline()\n"
                "def bench(d):\n"
                "    return [sy.stage('run', sy.ssh('true', hosts=FLEET, batch=20,"
                f" known_hosts={str(fleet.known_hosts)!r},"
                f" client_keys=[{str(fleet.client_key)!r}]))]\n"
            )
            floor_script = root / "floor.py"
            floor_script.write_text(_FLOOR)
            exe = str(Path(sys.executable).parent / "shipyard")
            history = str(root / "history.db")
            floor_argv = [
                sys.executable, str(floor_script), str(fleet.client_key),
                str(fleet.known_hosts), *specs,
            ]  # fmt: skip
            ours, floor = [], []
            _timed(floor_argv, project)  # warm-up: page cache, the history file
            _timed([exe, "--history", history, "deploy", "bench", "0", "-e", "bench"], project)
            for i in range(runs):
                floor.append(_timed(floor_argv, project))
                ours.append(
                    _timed(
                        [exe, "--history", history, "deploy", "bench", f"{i + 1}", "-e", "bench"],
                        project,
                    )
                )
        finally:
            sshd_fleet.stop_fleet(fleet.hosts)
    ratio = statistics.median(ours) / statistics.median(floor)
    return {
        "hosts": HOSTS,
        "runs": runs,
        "shipyard_median_ms": round(statistics.median(ours), 1),
        "floor_median_ms": round(statistics.median(floor), 1),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    out = run(parser.parse_args().runs)
    print(json.dumps(out, indent=1))
    return 0 if out["ratio"] <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
