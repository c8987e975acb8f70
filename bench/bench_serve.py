"""The dashboard's figures (issue 18), each against a real ``shipyard serve`` process:

- the overview (``/api/overview``, what the overview page draws) at 1,000,000 deployments
  (a copy of bench_history's cached file, written to before each request so that the server
  reads it again): <= 100 ms; ``/metrics`` (a scan of every deployment) in the details;
- a log line reaches a Server-Sent Events client <= 300 ms after the step printed it (the step
  prints its own time; a step printing every 200 ms);
- the server idles under 1% of a core with 10 live streams open and nothing running.

Run alone: ``python bench/bench_serve.py`` (prints the figures as JSON).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))

import bench_history
from _common import figure
from _common import shipyard_exe
from _common import tmpdir


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    env["SHIPYARD_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env.update(extra)
    return env


def _serve(cwd: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([shipyard_exe(), "serve", "--port", "0"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("shipyard serve did not start")
    return proc, line.split()[2].rstrip("/")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _touch(db: Path, n: int) -> None:
    """A committed write to the history (an audit row), so that the server reads it again."""
    with sqlite3.connect(db) as c:
        c.execute("INSERT INTO audit (ts, action, user, reason) VALUES (?, 'bench', 'bench', ?)",
                  (time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()), f"write {n}"))  # fmt: skip
    c.close()


def overview_1m() -> dict[str, Any]:
    bench_history.ensure()
    with tmpdir("serve-1m") as d:
        # A copy: each request follows a write (the dashboard caches its reads until the store
        # changes, so without one every request after the first would be a cache hit).
        db = Path(d, "history.db")
        shutil.copyfile(bench_history.DB, db)
        proc, url = _serve(d, _env(SHIPYARD_HISTORY=str(db)))
        try:
            with httpx.Client(timeout=60) as c:
                t0 = time.perf_counter()
                cells = len(c.get(url + "/api/overview").json()["cells"])
                first = (time.perf_counter() - t0) * 1000
                walls, metrics, cached = [], [], []
                for n in range(30):
                    _touch(db, n)
                    time.sleep(0.5)  # > IDLE_POLL: the server has seen the write
                    t0 = time.perf_counter()
                    c.get(url + "/api/overview").raise_for_status()
                    walls.append((time.perf_counter() - t0) * 1000)
                    t0 = time.perf_counter()
                    c.get(url + "/api/overview").raise_for_status()
                    cached.append((time.perf_counter() - t0) * 1000)
                    if n % 5 == 0:  # /metrics scans every deployment: a few samples
                        t0 = time.perf_counter()
                        c.get(url + "/metrics").raise_for_status()
                        metrics.append((time.perf_counter() - t0) * 1000)
        finally:
            proc.terminate()
            proc.wait(10)
    return figure("15a", "overview at 1M deployments", measured=statistics.median(walls),
                  unit="ms", max_value=100,
                  details={"first_ms": first, "cells": cells, "max_ms": max(walls),
                           "cached_median_ms": statistics.median(cached),
                           "metrics_median_ms": statistics.median(metrics),
                           "metrics_max_ms": max(metrics)})  # fmt: skip


PIPELINES = textwrap.dedent(
    """
    import shipyard as sy

    TICK = "import time\\nfor i in range(40):\\n    print(repr(time.time()), flush=True)\\n    time.sleep(0.2)"

    @sy.pipeline
    def tick(d):
        return [sy.stage("tick", sy.command("python3", "-c", TICK, name="tick"))]

    @sy.pipeline
    def gate(d):
        return [sy.stage("approve", sy.approval(timeout="1h")),
                sy.stage("after", sy.command("true"))]
    """
)


def live_and_idle() -> list[dict[str, Any]]:
    with tmpdir("serve-live") as d:
        Path(d, "pipelines.py").write_text(PIPELINES)
        env = _env()
        proc, url = _serve(d, env)
        try:
            deploy = subprocess.Popen([shipyard_exe(), "deploy", "tick", "1", "-e", "prod"],
                                      cwd=d, env=env, stdout=subprocess.DEVNULL)  # fmt: skip
            lags = []
            with httpx.Client(timeout=60) as c:
                while not c.get(url + "/api/history").json()["deployments"]:
                    time.sleep(0.05)
                with c.stream("GET", url + "/api/deployments/1/events") as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and '"line"' in line:
                            text = json.loads(line[6:])["line"]
                            try:
                                lags.append((time.time() - float(text)) * 1000)
                            except ValueError:
                                pass
                        if line.startswith("event: end"):
                            break
            deploy.wait(60)
            subprocess.run([shipyard_exe(), "deploy", "gate", "1", "-e", "prod"], cwd=d, env=env,
                           stdout=subprocess.DEVNULL, check=False)  # fmt: skip
            clients = [httpx.Client(timeout=60) for _ in range(10)]
            streams = [c.stream("GET", url + "/api/deployments/2/events") for c in clients]
            for s in streams:
                next(s.__enter__().iter_lines())
            time.sleep(2)
            cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
            time.sleep(20)
            idle = (_cpu_s(proc.pid) - cpu0) / (time.monotonic() - t0) * 100
            for s, c in zip(streams, clients, strict=True):
                s.__exit__(None, None, None)
                c.close()
        finally:
            proc.terminate()
            proc.wait(10)
    return [
        figure("15b", "log line to SSE client", measured=statistics.median(lags), unit="ms",
               max_value=300, details={"max_ms": max(lags), "lines": len(lags)}),
        figure("15c", "idle CPU, 10 live streams", measured=idle, unit="% of a core",
               max_value=1, strict=True),
    ]  # fmt: skip


def run() -> list[dict[str, Any]]:
    return [overview_1m(), *live_and_idle()]


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
