"""doit's side of the peer benchmarks: one task group, ``steps``, of N sub-tasks of one kind.

    doit -f bench/peers/dodo.py --db-file DB --verbosity 0 kind=python|true|sleep n=N [-n 50]

The doit equivalent of ``bench_steps.steps_pipelines(kind, n)``: ``python``, a no-op Python
callable (figure 4); ``true``, the ``true`` program (figure 5); ``sleep``, ``sleep 1`` (figure 6,
run with ``-n 50``). No task has a file dependency or a target, so doit runs every one of them
every time, and records each in its dependency file (``--db-file``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from doit import get_var

KIND = get_var("kind", "python")
N = int(get_var("n", "1"))

#: doit reads its settings from here; the command line given by bench_peers.py overrides them.
DOIT_CONFIG = {"verbosity": 0}


def noop() -> None:
    """Does nothing: the step whose cost is pure orchestration."""


ACTIONS: dict[str, list[Any]] = {
    "python": [noop],
    "true": [["true"]],
    "sleep": [["sleep", "1"]],
}


def task_steps() -> Iterator[dict[str, Any]]:
    """One group of N sub-tasks of KIND."""
    actions = ACTIONS[KIND]
    for i in range(N):
        yield {"name": f"{KIND} {i}", "actions": actions}
