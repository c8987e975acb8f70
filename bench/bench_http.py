"""Benchmarks of the HTTP parts: health-check detection latency, cost per probe, and what a
hanging webhook costs a deployment. Every limit's floor is measured in the same run.

``run() -> dict`` returns (times in the unit their key says):

Detection latency (a service turns healthy at a random moment while a check probes it):

``detect_interval_s``
    the check's ``interval``.
``detect_trials``
    how many times the service turned healthy.
``detect_mean_ms`` / ``detect_worst_ms``
    from the moment it turned healthy to the moment ``probe_until_healthy`` returned.
``detect_mean_limit_ms`` / ``detect_worst_limit_ms``
    ``interval/2 + 5 ms`` and ``interval + 10 ms``.

Cost per probe (a check that needs many attempts against a loopback server, the real code path:
one httpx client per check, tenacity, one log line per attempt):

``probe_ms``
    milliseconds per attempt of ``probe_until_healthy``, the pauses between attempts left out
    (median of rounds).
``urllib_ms``
    the floor: one plain ``urllib.request.urlopen`` of the same server (median of rounds).
``probe_ratio`` / ``probe_ratio_limit``
    the median over rounds of (probe / urllib), and 2.0.
``probe_cpu_ms`` / ``urllib_cpu_ms`` / ``probe_cpu_ratio``
    the same in CPU time of this process (for information; the service runs in another).
``fresh_httpx_get_ms`` / ``fresh_httpx_get_ratio``
    for comparison, what a fresh ``httpx.get`` per probe costs (not what the check does).

A hanging webhook (a receiver that accepts and never answers):

``deploy_plain_s``
    a small deployment without sinks, through the CLI in-process (median of rounds).
``deploy_hanging_sink_s``
    the same deployment with a webhook to the hanging receiver (median of rounds).
``hanging_sink_overhead_s`` / ``hanging_sink_timeout_s``
    their difference, and its limit: the sink's ``timeout``.

``ok``
    whether every figure is within its limit; ``failures`` lists the ones that are not.

Run alone: ``python bench/bench_http.py``.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

_TESTS = Path(__file__).resolve().parent.parent / "tests"

#: The interval of the detection-latency checks (seconds).
INTERVAL = 0.1
#: How many times the service turns healthy.
TRIALS = 40
#: Attempts per round of the cost measurement.
PROBES = 300
ROUNDS = 5
#: The hanging sink's timeout (seconds).
SINK_TIMEOUT = 1.0


def _servers() -> Any:
    if str(_TESTS) not in sys.path:
        sys.path.insert(0, str(_TESTS))
    import http_servers

    return http_servers


class _Controlled:
    """The service of the benchmarks, steered through ``/_control/...`` requests.

    ``/_control/healthy-at/T``: 503 until ``time.monotonic()`` reaches T (CLOCK_MONOTONIC is
    system-wide on Linux, so the bench process can say when), then 200.
    ``/_control/unhealthy/N``: 503 for the next N requests, then 200.
    """

    def __init__(self) -> None:
        import threading

        self.healthy_at = float("-inf")
        self.unhealthy_left = 0
        self.lock = threading.Lock()

    def __call__(self, req: Any) -> Any:
        from http_servers import Reply

        if req.path.startswith("/_control/"):
            _, _, command, arg = req.path.split("/", 3)
            with self.lock:
                if command == "healthy-at":
                    self.healthy_at, self.unhealthy_left = float(arg), 0
                elif command == "unhealthy":
                    self.healthy_at, self.unhealthy_left = float("-inf"), int(arg)
            return Reply(200, "done")
        with self.lock:
            if self.unhealthy_left > 0:
                self.unhealthy_left -= 1
                return Reply(503, "not yet")
            healthy = time.monotonic() >= self.healthy_at
        return Reply(200, "ok") if healthy else Reply(503, "not yet")


def _serve() -> None:
    """``bench_http.py --serve``: run the controlled service until stdin closes."""
    hs = _servers()
    with hs.LoopbackServer(_Controlled()) as server:
        print(server.port, flush=True)
        sys.stdin.read()


class _Service:
    """The controlled service in a process of its own, as a real service would be: the server's
    threads do not compete with the client for this interpreter's GIL."""

    def __enter__(self) -> _Service:
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.base = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"
        return self

    def control(self, command: str) -> None:
        with urllib.request.urlopen(f"{self.base}/_control/{command}") as r:
            r.read()

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(30)
        self.proc.stdout.close()


def detection_latency(interval: float = INTERVAL, trials: int = TRIALS) -> dict[str, Any]:
    import shipyard as sy
    from shipyard.sdk import probe_until_healthy

    latencies = []
    rng = random.Random(42)
    with _Service() as service:
        spec = sy.health_check(service.base + "/healthz", timeout=30, interval=interval)
        asyncio.run(probe_until_healthy(spec))  # warm up: the first check imports httpx
        for _ in range(trials):
            # Long enough for the backoff to reach the interval, then a random phase.
            healthy_at = time.monotonic() + 0.4 + rng.uniform(0, 2 * interval)
            service.control(f"healthy-at/{healthy_at!r}")
            asyncio.run(probe_until_healthy(spec))
            latencies.append(time.monotonic() - healthy_at)
    mean_ms = statistics.mean(latencies) * 1000
    worst_ms = max(latencies) * 1000
    return {
        "detect_interval_s": interval,
        "detect_trials": trials,
        "detect_mean_ms": round(mean_ms, 2),
        "detect_worst_ms": round(worst_ms, 2),
        "detect_mean_limit_ms": round(interval / 2 * 1000 + 5, 2),
        "detect_worst_limit_ms": round(interval * 1000 + 10, 2),
    }


async def _no_pause(_seconds: float) -> None:
    await asyncio.sleep(0)


def probe_cost(probes: int = PROBES, rounds: int = ROUNDS) -> dict[str, Any]:
    import httpx
    import shipyard as sy
    from shipyard.sdk import probe_until_healthy

    probe_ms: list[float] = []
    urllib_ms: list[float] = []
    probe_cpu: list[float] = []
    urllib_cpu: list[float] = []
    with _Service() as service:
        url = service.base + "/healthz"
        spec = sy.health_check(url, timeout=60, interval=1e-6)
        for _ in range(probes // 10):  # warm up
            with urllib.request.urlopen(url) as r:
                r.read()
        for _ in range(rounds):
            # Unhealthy for probes-1 attempts, then healthy: one check, `probes` attempts.
            service.control(f"unhealthy/{probes - 1}")
            start, cpu = time.perf_counter(), time.process_time()
            # The pauses between attempts are the backoff, not the cost: skip them.
            report = asyncio.run(probe_until_healthy(spec, sleep=_no_pause))
            probe_ms.append((time.perf_counter() - start) / report.attempts * 1000)
            probe_cpu.append((time.process_time() - cpu) / report.attempts * 1000)
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(probes):
                with urllib.request.urlopen(url) as r:
                    r.read()
            urllib_ms.append((time.perf_counter() - start) / probes * 1000)
            urllib_cpu.append((time.process_time() - cpu) / probes * 1000)
        fresh = 20
        start = time.perf_counter()
        for _ in range(fresh):
            httpx.get(url)
        fresh_ms = (time.perf_counter() - start) / fresh * 1000
    p, u = statistics.median(probe_ms), statistics.median(urllib_ms)
    # Rounds interleave both measurements, so the ratio of each round compares like with like
    # (the machine's load changes from round to round).
    ratio = statistics.median(a / b for a, b in zip(probe_ms, urllib_ms, strict=True))
    cpu_ratio = statistics.median(a / b for a, b in zip(probe_cpu, urllib_cpu, strict=True))
    return {
        "probe_ms": round(p, 3),
        "urllib_ms": round(u, 3),
        "probe_ratio": round(ratio, 2),
        "probe_ratio_limit": 2.0,
        "probe_cpu_ms": round(statistics.median(probe_cpu), 3),
        "urllib_cpu_ms": round(statistics.median(urllib_cpu), 3),
        "probe_cpu_ratio": round(cpu_ratio, 2),
        "fresh_httpx_get_ms": round(fresh_ms, 2),
        "fresh_httpx_get_ratio": round(fresh_ms / u, 1),
    }


_PIPELINES = """
import shipyard as sy

SINKS = {sinks}

@sy.pipeline(notify=SINKS)
def web(d):
    return [
        sy.stage("build", sy.wait(0.05), sy.python(print, "built")),
        sy.stage("release", sy.wait(0.05)),
        sy.stage("verify", sy.python(print, "ok")),
    ]
"""


def _deploy_seconds(folder: Path, sinks: str, version: str) -> float:
    from click.testing import CliRunner
    from shipyard._cli import cli

    path = folder / f"pipelines_{version}.py"
    path.write_text(textwrap.dedent(_PIPELINES.format(sinks=sinks)))
    args = ["-f", str(path), "--history", str(folder / "history.db")]
    args += ["deploy", "web", version, "-e", "bench"]
    start = time.perf_counter()
    result = CliRunner().invoke(cli, args)
    took = time.perf_counter() - start
    if result.exit_code != 0:
        raise RuntimeError(f"bench deployment failed ({result.exit_code}):\n{result.output}")
    return took


def hanging_sink(rounds: int = 3, timeout: float = SINK_TIMEOUT) -> dict[str, Any]:
    hs = _servers()
    plain: list[float] = []
    hanging: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, hs.LoopbackServer(hs.always(hs.HANG)) as receiver:
        folder = Path(tmp)
        sink = (
            f"[sy.webhook({receiver.url('/hook')!r}, timeout={timeout}, request_timeout=0.3, "
            "backoff=0.05)]"
        )
        for i in range(rounds):
            plain.append(_deploy_seconds(folder, "[]", f"p{i}"))
            hanging.append(_deploy_seconds(folder, sink, f"h{i}"))
    p, h = statistics.median(plain), statistics.median(hanging)
    return {
        "deploy_plain_s": round(p, 3),
        "deploy_hanging_sink_s": round(h, 3),
        "hanging_sink_overhead_s": round(h - p, 3),
        "hanging_sink_timeout_s": timeout,
    }


def run() -> dict[str, Any]:
    """Measure every figure (about a minute); see the module docstring for the keys."""
    out: dict[str, Any] = {}
    out.update(detection_latency())
    out.update(probe_cost())
    out.update(hanging_sink())
    failures = []
    if out["detect_mean_ms"] > out["detect_mean_limit_ms"]:
        failures.append("detect_mean_ms")
    if out["detect_worst_ms"] > out["detect_worst_limit_ms"]:
        failures.append("detect_worst_ms")
    if out["probe_ratio"] > out["probe_ratio_limit"]:
        failures.append("probe_ratio")
    if out["hanging_sink_overhead_s"] > out["hanging_sink_timeout_s"]:
        failures.append("hanging_sink_overhead_s")
    out["failures"] = failures
    out["ok"] = not failures
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        _serve()
    else:
        import json

        print(json.dumps(run(), indent=2))
