"""Figures 17a and 17b: how fast a failing canary backs out, and what a weight change costs.

17a. A ``docker.service`` canary of ``shipyard-test/web:v2`` beside ``:v1``, behind a real nginx
(its own prefix in a temporary folder), at 50% with an analysis measuring every ``interval`` =
1 s. At a moment unrelated to the measurement schedule the metric crosses its failure threshold
(``sy.python_metric`` reading a value the benchmark flips). Measured: from the flip to the start
of the last request that nginx still sent to v2 (a thread sends requests one after another on
fresh connections the whole time), the worst of the runs. Target: at most interval + 1 s.

17b. Two loopback HTTP servers behind a real nginx; ``sy.route`` steps move the weights between
them (10, 30, 50, 70, 90, 100, 50, 0 percent, repeatedly) while threads keep up a steady load of
at least 200 requests/s on fresh connections. Measured: requests that did not get a 200 from
one of the two. Target: zero.

Needs the engine and images of ``.ci/docker-up.sh`` (17a) and nginx.

    python bench/bench_canary.py [--runs N]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Options  # bench/ is not a package: run.py and __main__ put it on sys.path
from _common import figure

_TESTS = Path(__file__).resolve().parent.parent / "tests"
INTERVAL = 1.0
#: Percents of the second backend in 17b's weight changes, in order.
MOVES = (10, 30, 50, 70, 90, 100, 50, 0)
MIN_RATE = 200.0


def _tests_on_path() -> None:
    if str(_TESTS) not in sys.path:
        sys.path.insert(0, str(_TESTS))


class _Load:
    """Requests through nginx from threads, on fresh connections: (start, answer) each."""

    def __init__(self, url: str, threads: int) -> None:
        from docker_fixtures import http_get

        self.get: Callable[..., Any] = http_get
        self.url = url
        self.results: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop) for _ in range(threads)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                answer: Any = self.get(self.url, timeout=5)
            except Exception as exc:
                answer = f"{type(exc).__name__}: {exc}"
            self.results.append((start, answer))

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def back_out(runs: int) -> dict[str, Any]:
    """17a: seconds from the threshold crossing to the last request served by the canary."""
    _tests_on_path()
    import secrets

    import shipyard as sy
    from docker_fixtures import WEB
    from docker_fixtures import Target
    from docker_fixtures import free_ports
    from docker_fixtures import start_nginx
    from docker_fixtures import stop_nginx
    from docker_fixtures import test_containers
    from shipyard import Status

    target = Target(pipeline=f"bench{secrets.token_hex(3)}")
    slots = free_ports(2)
    value = [0.0]
    seconds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-canary-") as tmp:
        nginx = start_nginx(Path(tmp), target.service, slots[0])

        def service(version: str, strategy: Any = None) -> Any:
            return sy.docker.service(
                target.service, image=f"{WEB}:{version}", slots=slots, router=nginx.router(),
                labels=target.labels, drain=0, stop_timeout=1, strategy=strategy,
                health_check=sy.health_check("/healthz", timeout=10, interval=0.1),
            )  # fmt: skip

        try:
            out = target.run(service("v1"), version="v1")
            if out.status is not Status.SUCCEEDED:
                raise RuntimeError(f"deploying v1 failed: {out.error}")
            url = f"http://127.0.0.1:{nginx.port}/"
            for i in range(runs):
                value[0] = 0.0
                check = sy.analysis(sy.metric(
                    "errors", sy.python_metric(lambda: value[0]), failure=sy.above(0.5),
                    interval=INTERVAL, count=1000,
                ))  # fmt: skip
                step = service("v2", sy.canary(steps=[50, 100], analysis=check))
                flipped: list[float] = []

                phase = 0.35 + (i * 0.37) % INTERVAL

                async def deploy(step: Any = step, flipped: list[float] = flipped,
                                 phase: float = phase) -> Any:  # fmt: skip
                    run = asyncio.ensure_future(target.arun(step, version="v2"))
                    # Wait until the canary serves, then flip at a phase that varies per run.
                    while nginx.upstream_file.read_text().count("weight=") != 2:
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(phase)
                    value[0] = 1.0
                    flipped.append(time.monotonic())
                    return await run

                with _Load(url, threads=1) as load:
                    out = asyncio.run(deploy())
                    time.sleep(0.3)
                if out.status is not Status.FAILED:
                    raise RuntimeError(f"the canary did not fail: {out.status} {out.error}")
                canary = [t for t, a in load.results if a == (200, "version v2")]
                if not canary:
                    raise RuntimeError("nginx never sent a request to the canary")
                seconds.append(max(canary) - flipped[0])
        finally:
            stop_nginx(nginx)
            for c in test_containers(_client(), **target.labels):
                c.remove(force=True)
    return {"worst_s": round(max(seconds), 3), "runs_s": [round(s, 3) for s in seconds]}


def _client() -> Any:
    import docker

    return docker.from_env(timeout=30)


def weight_changes(rounds: int) -> dict[str, Any]:
    """17b: failed requests while the weights move under steady load."""
    _tests_on_path()
    import shipyard as sy
    from docker_fixtures import Target
    from docker_fixtures import start_nginx
    from docker_fixtures import stop_nginx
    from http_servers import LoopbackServer
    from http_servers import Reply
    from http_servers import always
    from shipyard import Status

    servers = [LoopbackServer(always(Reply(200, name))).start() for name in ("a", "b")]
    try:
        with tempfile.TemporaryDirectory(prefix="bench-canary-") as tmp:
            nginx = start_nginx(Path(tmp), "web", servers[0].port)
            try:
                router = nginx.router()
                a, b = servers[0].port, servers[1].port
                url = f"http://127.0.0.1:{nginx.port}/"
                with _Load(url, threads=4) as load:
                    time.sleep(0.5)
                    start = time.monotonic()
                    changes = 0
                    for _ in range(rounds):
                        for percent in MOVES:
                            step = sy.route(router, "web", {a: 100 - percent, b: percent})
                            out = Target(service="web").run(step)
                            if out.status is not Status.SUCCEEDED:
                                raise RuntimeError(f"a weight change failed: {out.error}")
                            changes += 1
                    took = time.monotonic() - start
                    time.sleep(0.3)
            finally:
                stop_nginx(nginx)
    finally:
        for s in servers:
            s.stop()
    during = [(t, ans) for t, ans in load.results if start <= t <= start + took]
    failed = [ans for _, ans in load.results if ans not in ((200, "a"), (200, "b"))]
    rate = len(during) / took
    if rate < MIN_RATE:
        raise RuntimeError(f"the load was {rate:.0f} requests/s, below {MIN_RATE:g}: no figure")
    return {
        "failed": len(failed),
        "requests": len(load.results),
        "requests_per_s": round(rate, 1),
        "weight_changes": changes,
        "ms_per_change": round(1000 * took / changes, 1),
        "examples": [str(f) for f in failed[:5]],
    }


def run(opts: Options | None = None) -> dict[str, Any]:
    """Figure 17: a failing canary backs out within interval + 1 s; weight changes fail nothing."""
    runs = max(min((opts or Options()).runs, 10), 3)
    back = back_out(runs)
    moves = weight_changes(max(runs // 2, 2))
    return {
        "figures": [
            figure(
                "17a",
                "canary: threshold crossed -> all traffic back on the old version (interval 1 s)",
                measured=back["worst_s"],
                unit="s",
                max_value=INTERVAL + 1.0,
                details=back,
            ),
            figure(
                "17b",
                f"requests failed during weight changes (>= {MIN_RATE:g} requests/s)",
                measured=moves["failed"],
                unit="requests",
                max_value=0,
                details=moves,
            ),
        ]
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    for fig in run(Options(runs=args.runs))["figures"]:
        print(
            f"figure {fig['id']}: {fig['figure']}\n  measured {fig['measured']:g} {fig['unit']}, "
            f"target {fig['target']}: {'PASS' if fig['pass'] else 'FAIL'}\n  {fig['details']}"
        )
