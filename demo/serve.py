"""Start, stop or restart the demo app from releases/current (used by pipelines.py).

The app runs detached in its own session, so it keeps serving after the deployment ends; its
pid is kept in releases/app.pid and its output in releases/app.log.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RELEASES = Path(__file__).resolve().parent.parent / "releases"
PIDFILE = RELEASES / "app.pid"


def stop() -> None:
    try:
        pid = int(PIDFILE.read_text())
    except (OSError, ValueError):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        PIDFILE.unlink(missing_ok=True)
        return
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.05)
    else:
        os.killpg(pid, signal.SIGKILL)
    PIDFILE.unlink(missing_ok=True)
    print(f"stopped the app (pid {pid})")


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie waiting for its parent to reap it counts as gone."""
    try:
        os.killpg(pid, 0)
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except ProcessLookupError:
        return False
    except OSError:
        return True


def _taken(port: str) -> str | None:
    """Why 127.0.0.1:``port`` cannot be listened on, or None."""
    with socket.socket() as s:
        # As the app binds: a connection of the old app's still closing (TIME_WAIT) is fine.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def start(port: str) -> None:
    app = RELEASES / "current" / "app.py"
    if not app.exists():
        sys.exit(f"no release at {app}; build one first")
    problem = _taken(port)
    if problem:  # our own app was stopped above: another program holds the port
        sys.exit(
            f"127.0.0.1:{port} cannot be used ({problem}): another program listens there. "
            "Pick a free port for the demo, e.g.: shipyard deploy demo 1.0.0 -e local "
            "--var port=8766"
        )
    with open(os.devnull, "rb") as devnull, open(RELEASES / "app.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(app)],
            stdin=devnull, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "PORT": port},
        )  # fmt: skip
    PIDFILE.write_text(str(proc.pid))
    version = (RELEASES / "current" / "VERSION").read_text().strip()
    print(f"started version {version} on http://127.0.0.1:{port}/ (pid {proc.pid})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["start", "stop", "restart"])
    parser.add_argument("--port", default="8765")
    args = parser.parse_args()
    if args.action in ("stop", "restart"):
        stop()
    if args.action in ("start", "restart"):
        start(args.port)


if __name__ == "__main__":
    main()
