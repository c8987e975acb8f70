"""The peers measured beside Shipyard (``run.py --peers DIR``, ``nox -s bench-peers``).

Each peer lives in its own virtualenv under DIR, created and filled on first use:

- **doit** (``peers/dodo.py``): a task runner that records every task in its dependency file;
  the closest thing to "steps with a record" with no server at all.
- **Prefect 3** (``peers/prefect_flow.py``): a flow of tasks, each recorded as a task run by
  Prefect's temporary local API server (SQLite under ``PREFECT_HOME``), as when a user runs a
  flow as a script with no server configured.

The scenarios are Shipyard's own (figures 4, 5, 6 and 7): N no-op Python steps, N ``true``
commands, 50 parallel ``sleep 1``, and listing the last 20 runs from the peer's history.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from _common import BENCH
from _common import child_env

#: What each peer's virtualenv gets (pinned to a major version: the scenarios use its API).
REQUIREMENTS = {
    "doit": ["doit>=0.36,<0.38"],
    "prefect": ["prefect>=3,<4"],
}


@dataclass(frozen=True)
class Peer:
    name: str
    python: str
    version: str

    def steps_argv(self, kind: str, n: int, state: Path) -> list[str]:
        """``n`` steps of ``kind`` (``python``, ``true`` or, ``n`` at once, ``sleep``)."""
        if self.name == "doit":
            argv = [self.python, "-m", "doit", "-f", str(BENCH / "peers" / "dodo.py"),
                    "--db-file", str(state / "doit.db"), "--verbosity", "0"]  # fmt: skip
            if kind == "sleep":
                argv += ["-n", str(n), "-P", "thread"]
            return [*argv, f"kind={kind}", f"n={n}"]
        return [self.python, str(BENCH / "peers" / "prefect_flow.py"), kind, str(n)]

    def history_argv(self) -> list[str] | None:
        """The peer's command listing its last 20 runs; None: it keeps no history of runs."""
        if self.name == "prefect":
            return [self.python, "-m", "prefect", "flow-run", "ls", "--limit", "20"]
        return None  # doit keeps each task's last state, not a history of runs

    def env(self, state: Path) -> dict[str, str]:
        """The environment of each run: offline, no telemetry, state under ``state``."""
        # Nothing of the caller's may point a peer at a real server or account.
        env = {k: v for k, v in child_env().items() if not k.startswith("PREFECT_")}
        if self.name == "prefect":
            env |= {
                "PREFECT_HOME": str(state / "prefect"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DO_NOT_TRACK": "1",
                "PREFECT_LOGGING_LEVEL": "WARNING",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
            }
        return env


def ensure(root: Path) -> list[Peer]:
    """The peers' virtualenvs under ``root``, created and installed when missing."""
    peers = []
    for name, requirements in REQUIREMENTS.items():
        venv = root / name
        py = venv / "bin" / "python"
        marker = venv / ".installed"
        if not marker.exists() or marker.read_text() != repr(requirements):
            print(f"  installing {name} into {venv} ...", flush=True)
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run(
                [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                 *requirements],
                check=True,
            )  # fmt: skip
            marker.write_text(repr(requirements))
        version = subprocess.run(
            [str(py), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        peers.append(Peer(name, str(py), version))
    return peers
