"""Prefect's side of figures 4, 5 and 6: one flow of N tasks of one kind.

    python bench/peers/prefect_flow.py python|true N     # N tasks, one after the other
    python bench/peers/prefect_flow.py sleep N           # N tasks at once (thread pool)

The Prefect equivalent of ``bench_steps.steps_pipelines(kind, n)``: ``python``, a task that does
nothing (figure 4); ``true``, a task running ``subprocess.run(["true"])`` with its output
captured like Shipyard's and the floor's (figure 5); ``sleep``, N tasks running ``sleep 1``
submitted to a ``ThreadPoolTaskRunner(max_workers=N)`` (figure 6). The flow is called as a
script, the way a Prefect user runs one locally: with no API URL set, Prefect starts its
temporary local API server (SQLite under ``PREFECT_HOME``) and records the flow run and its
task runs there. bench_peers.py sets the environment (offline, no telemetry).
"""

from __future__ import annotations

import subprocess
import sys

from prefect import flow
from prefect import task
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner


@task
def noop() -> None:
    """Does nothing: the step whose cost is pure orchestration."""


@task
def run_true() -> int:
    return subprocess.run(["true"], capture_output=True, check=True).returncode


@task
def sleep_1() -> int:
    return subprocess.run(["sleep", "1"], check=True).returncode


@flow
def steps(kind: str, n: int) -> None:
    """N tasks of ``kind``, one after the other."""
    step = {"python": noop, "true": run_true}[kind]
    for _ in range(n):
        step()


@flow(task_runner=ThreadPoolTaskRunner(max_workers=50))
def parallel(n: int) -> None:
    """N ``sleep 1`` tasks at once."""
    futures = [sleep_1.submit() for _ in range(n)]
    wait(futures)
    for future in futures:
        future.result()  # raises if a task failed


def main() -> None:
    kind, n = sys.argv[1], int(sys.argv[2])
    if kind == "sleep":
        parallel(n)
    else:
        steps(kind, n)


if __name__ == "__main__":
    main()
