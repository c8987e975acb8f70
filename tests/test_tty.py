"""The live view of running steps on a terminal, and its plain fallback (issue #19, item 5).

``shipyard deploy`` runs inside a real tmux pane (a pseudo-terminal with a screen), and the test
reads the screen with ``tmux capture-pane`` while the steps run and after the command ended; the
fallbacks run on a raw pseudo-terminal (``os.openpty``) with CI variables, and on a pipe.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from polling import wait_for
from shipyard._console import _SPINNER
from shipyard._console import sanitize
from shipyard._store import CI_VARIABLES

PIPELINES = """
import shipyard as sy


@sy.pipeline()
def web(d: sy.Deployment):
    return [
        sy.stage("build", sy.command("true", name="compile")),
        sy.stage(
            "verify",
            sy.command("sh", "-c", "echo preparing left; sleep 3", name="left"),
            sy.command("sh", "-c", "echo warming right; sleep 3", name="right"),
            parallel=True,
        ),
    ]
"""


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SHIPYARD_", "OTEL_")) and k not in CI_VARIABLES
        and k not in ("NO_COLOR", "FORCE_COLOR", "GITHUB_STEP_SUMMARY", "TMUX")
    }  # fmt: skip
    env.update(SHIPYARD_DISABLE_PLUGIN_AUTOLOAD="1", SHIPYARD_HISTORY=str(tmp / "history.db"))
    env.update(extra)
    return env


@pytest.fixture
def project(tmp_path):
    (tmp_path / "pipelines.py").write_text(PIPELINES)
    return tmp_path


class Pane:
    """A tmux server of our own (its socket in the test's folder) with one 100x30 pane."""

    def __init__(self, tmp: Path, command: str, env: dict[str, str]) -> None:
        tmux = shutil.which("tmux")
        assert tmux is not None, "tmux is needed for the terminal tests (apt install tmux)"
        self.base = [tmux, "-S", str(tmp / "tmux.sock"), "-f", "/dev/null"]
        subprocess.run(
            [*self.base, "new-session", "-d", "-x", "100", "-y", "30", "-s", "t",
             f"{command}; echo '[exit '$?']'; sleep 120"],
            cwd=tmp, env=env, check=True, timeout=30,
        )  # fmt: skip

    def screen(self) -> list[str]:
        out = subprocess.run(
            [*self.base, "capture-pane", "-p", "-t", "t"],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        return [line.rstrip() for line in out.stdout.splitlines()]

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30)


def _live_lines(screen: list[str]) -> list[str]:
    return [ln for ln in screen if ln.strip()[:1] in _SPINNER and ln.strip()]


def test_live_view_of_parallel_steps_on_a_terminal(project):
    deploy = shlex.join([sys.executable, "-m", "shipyard", "deploy", "web", "1", "-e", "x"])
    pane = Pane(project, deploy, _env(project))
    try:
        # While the parallel stage runs: a line per running step, side by side, with the
        # spinner, the elapsed time and the step's last output line.
        def both_running() -> list[str] | None:
            lines = _live_lines(pane.screen())
            return lines if len(lines) == 2 else None

        lines = wait_for(both_running, timeout=30, what="two live lines")
        assert any(" left " in ln for ln in lines)
        assert any(" right " in ln for ln in lines)
        # Its last output line, once written, and the elapsed time, redrawn as it grows.
        wait_for(
            lambda: any("preparing left" in ln for ln in _live_lines(pane.screen()))
            and any("warming right" in ln for ln in _live_lines(pane.screen())),
            timeout=10, what="the last output lines in the view",
        )  # fmt: skip
        first = _live_lines(pane.screen())
        wait_for(lambda: _live_lines(pane.screen()) not in ([], first), timeout=10,
                 what="a redraw")  # fmt: skip

        # The view stays under the progress lines, which scroll as without it.
        def screen_with_view() -> list[str] | None:
            screen = pane.screen()
            return screen if _live_lines(screen) else None

        screen = wait_for(screen_with_view, timeout=10, what="the view")
        assert screen.index("[2/2] verify (parallel)") < screen.index(_live_lines(screen)[0])

        final = wait_for(
            lambda: (s := pane.screen()) and any(ln.startswith("[exit ") for ln in s) and s,
            timeout=60, what="the end of the command",
        )  # fmt: skip
    finally:
        pane.close()
    assert "[exit 0]" in final
    assert _live_lines(final) == []  # erased at the end: only the plain lines remain
    text = "\n".join(final)
    for expected in ("deploying web 1 to x", "[1/2] build", "ok        compile",
                     "ok        left", "ok        right", "succeeded in"):  # fmt: skip
        assert expected in text, text
    assert text.count("ok        left") == 1


def _read_all(fd: int, proc: subprocess.Popen[bytes]) -> bytes:
    import select

    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other end closed (Linux: EIO)
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


@pytest.mark.parametrize("ci", ["CI", "GITHUB_ACTIONS"])
def test_no_live_view_in_a_ci_log_even_on_a_terminal(project, ci):
    primary, secondary = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shipyard", "deploy", "web", "1", "-e", "x"],
            cwd=project, env=_env(project, **{ci: "true"}, TERM="xterm"),
            stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary,
        )  # fmt: skip
        os.close(secondary)
        data = _read_all(primary, proc)
        assert proc.wait(60) == 0, data
    finally:
        os.close(primary)
    text = data.decode("utf-8", "replace")
    assert "\x1b[J" not in text  # no view drawn, nor erased
    assert "ok        left" in sanitize(text)
    assert not any(ch in text for ch in _SPINNER)


def test_plain_lines_when_not_a_terminal(project):
    argv = [sys.executable, "-m", "shipyard", "deploy", "web", "1", "-e", "x"]
    proc = subprocess.run(argv, cwd=project, env=_env(project), capture_output=True, timeout=60)
    assert proc.returncode == 0
    out = proc.stdout.decode()
    assert "\x1b" not in out
    assert not any(ch in out for ch in _SPINNER)
    lines = [ln for ln in out.splitlines() if not ln.startswith("deployment #")]
    assert lines[:4] == ["deploying web 1 to x (deployment #1)", "[1/2] build",
                         lines[2], "[2/2] verify (parallel)"]  # fmt: skip
    assert lines[2].startswith("  ok        compile  (")
