"""Figure 9: a ``docker.run`` step of ``true`` costs at most 1.5x ``docker run --rm`` by the CLI.

Measured: one ``docker.run("shipyard-test/busybox", ["true"], network="none")`` step run by the
real runner in this process (a one-step deployment: events, output streaming, its own engine
client, create, start, logs, wait, remove), wall time from the deployment's start to its end.
Floor: the same container by the Docker CLI, ``docker run --rm --network none
shipyard-test/busybox true``, wall time of the whole process. Both interleaved in one run, after
warm-ups; medians reported. Needs the engine and images of ``.ci/docker-up.sh``.

    python bench/bench_docker.py [--runs N]
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Options  # bench/ is not a package: run.py and __main__ put it on sys.path
from _common import figure
from _common import median
from _common import spread

IMAGE = "shipyard-test/busybox:latest"


def _cli() -> list[str]:
    docker = shutil.which("docker")
    if docker is None:
        raise RuntimeError("the docker CLI is not on PATH; run bash .ci/docker-up.sh")
    return [docker, "run", "--rm", "--network", "none", IMAGE, "true"]


def _cli_once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


class _StepRunner:
    """Runs one-step deployments of ``docker.run(IMAGE, ["true"])`` with the real runner."""

    def __init__(self) -> None:
        import shipyard as sy
        from shipyard._events import EventBus
        from shipyard._pipeline import Deployment
        from shipyard._pipeline import Stage
        from shipyard._plugins import ShipyardPluginManager
        from shipyard._reports import Status
        from shipyard._runner import Runner

        pm = ShipyardPluginManager()
        pm.load(autoload=False)
        pm.finish_loading()
        self.runner = Runner(pluginmanager=pm, bus=EventBus([], pm))
        self.stages = [
            Stage("run", [sy.docker.run(IMAGE, ["true"], labels={"shipyard.bench": "1"})])
        ]
        self.deployment = Deployment(1, "bench", "1", "bench")
        self.ok = Status.SUCCEEDED

    def once(self) -> float:
        start = time.perf_counter()
        status, error = asyncio.run(self.runner.run(self.deployment, self.stages))
        took = time.perf_counter() - start
        if status is not self.ok:
            raise RuntimeError(f"docker.run failed: {error}")
        return took


def measure(runs: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall milliseconds of each side, ``runs`` times, interleaved with a rotating first."""
    argv = _cli()
    step = _StepRunner()
    sides = {"docker.run": step.once, "docker CLI": lambda: _cli_once(argv)}
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for i in range(runs):
        for name in names[i % 2 :] + names[: i % 2]:
            out[name].append(sides[name]() * 1000)
    return out


def run(opts: Options | None = None) -> dict[str, Any]:
    """Figure 9, measured beside its floor in one run."""
    runs = max((opts or Options()).runs, 10)
    ms = measure(runs)
    return {
        "figures": [
            figure(
                "9",
                'docker.run("…/busybox", ["true"]) step, in process, container removed',
                measured=median(ms["docker.run"]),
                unit="ms",
                floor=median(ms["docker CLI"]),
                floor_label="docker run --rm --network none shipyard-test/busybox true (CLI)",
                max_ratio=1.5,
                details={
                    **{k: spread(v) for k, v in ms.items()},
                    "docker_host": os.environ.get("DOCKER_HOST") or "default socket",
                },
            )
        ]
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    fig = run(Options(runs=args.runs))["figures"][0]
    print(
        f"figure {fig['id']}: {fig['figure']}\n"
        f"  measured {fig['measured']:.1f} ms, floor {fig['floor']:.1f} ms "
        f"({fig['floor_label']}), ratio {fig['ratio']:.2f}x, target {fig['target']}: "
        f"{'PASS' if fig['pass'] else 'FAIL'}"
    )
    for side, s in fig["details"].items():
        if isinstance(s, dict):
            print(
                f"  {side}: min {s['min']:.1f} median {s['median']:.1f} max {s['max']:.1f} ms "
                f"(n={s['n']})"
            )
