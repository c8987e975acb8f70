"""Shipyard's demo: a real deployment on this machine, with nothing to install.

    shipyard deploy demo 1.0.0 -e local
    shipyard deploy demo 1.0.1 -e local
    shipyard history

Each version is built into releases/<version>, the `current` symlink is switched atomically, the
app is (re)started on 127.0.0.1 and checked. `--var port=N` picks the port (default 8765);
`--var break=1` ships a release that fails its check, to watch the automatic rollback.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from pathlib import Path

import shipyard as sy

HERE = Path(__file__).parent
RELEASES = HERE / "releases"


def switch_current(version: str) -> None:
    """Point releases/current at releases/<version> atomically (rename over the old link)."""
    tmp = RELEASES / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version)
    os.replace(tmp, RELEASES / "current")


def check_answers(url: str, version: str, deadline: float = 10.0) -> None:
    """Fail unless the app at `url` answers with its version before the deadline."""
    end = time.monotonic() + deadline
    last = "no answer"
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                body = resp.read().decode()
            if f"version {version}" in body:
                return
            last = f"it answered {body.strip()!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 'version {version}' within {deadline:g}s: {last}")


@sy.pipeline(environments=["local"], rollback="auto")
def demo(d: sy.Deployment):
    """Build a tiny web app release, switch `current`, restart it and check it answers."""
    port = d.vars.get("port", "8765")
    url = f"http://127.0.0.1:{port}/"
    build_args = ["--broken"] if d.vars.get("break") == "1" else []
    return [
        sy.stage(
            "build",
            sy.command(
                sys.executable, "demo/build.py", d.version, *build_args, name="build release"
            ),
        ),
        sy.stage(
            "release",
            sy.python(switch_current, d.version, name="switch current"),
            sy.command(
                sys.executable, "demo/serve.py", "restart", "--port", port, name="restart app"
            ),
        ),
        sy.stage(
            "verify",
            sy.python(check_answers, url, d.version, name="app answers"),
        ),
    ]
