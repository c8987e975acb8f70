"""Optional: time whole commands with hyperfine instead of the built-in interleaved timer.

``python bench/run.py --hyperfine`` uses it for the start-up figures when ``hyperfine`` is on
PATH (Debian: ``apt install hyperfine``). hyperfine runs all runs of one command, then the next;
the built-in timer interleaves them, which is fairer on a busy machine, so it stays the default.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from _common import child_env
from _common import tmpdir


def available() -> bool:
    return shutil.which("hyperfine") is not None


def times(
    commands: dict[str, Sequence[str]],
    *,
    runs: int,
    warmup: int = 2,
    cwd: str | None = None,
) -> dict[str, list[float]]:
    """Wall times in seconds of each command (no intermediate shell: ``-N``)."""
    exe = shutil.which("hyperfine")
    if exe is None:
        raise RuntimeError("hyperfine is not installed")
    with tmpdir("hyperfine") as tmp:
        out = Path(tmp) / "hyperfine.json"
        argv = [
            exe,
            "-N",
            "--style",
            "none",
            "--warmup",
            str(warmup),
            "--runs",
            str(runs),
            "--export-json",
            str(out),
        ]
        for name, cmd in commands.items():
            argv += ["--command-name", name, shlex.join(cmd)]
        subprocess.run(argv, cwd=cwd, env=child_env(), check=True, stdout=subprocess.DEVNULL)
        data = json.loads(out.read_text())
    return {r["command"]: list(r["times"]) for r in data["results"]}
