"""The terminal reporter: progress of a deployment, fed by the event stream."""

from __future__ import annotations

import os
import re
import sys
import time
from collections import deque
from typing import IO
from typing import TYPE_CHECKING
from typing import Any

from ._events import Event
from ._reports import Status

if TYPE_CHECKING:
    from ._ci import CiFormat

_COLORS = {
    Status.SUCCEEDED: "32",
    Status.FAILED: "31",
    Status.CANCELLED: "33",
    Status.INTERRUPTED: "33",
    Status.SKIPPED: "90",
    "warning": "33",
    "bold": "1",
    "dim": "2",
}


#: Escape sequences: CSI (colours, cursor moves), OSC (titles, links, clipboard) and the
#: two-character ones.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?")
#: Control characters but tab (a line has no newline): NUL, bell, backspace, carriage return...
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def sanitize(text: str) -> str:
    """``text`` without escape sequences and control characters (tabs stay): what a file or a
    CI log should get of a step's output, whose colours and cursor moves mean nothing there."""
    if "\x1b" in text:
        text = _ESCAPES.sub("", text)
    return _CONTROLS.sub("", text)


def use_color(stream: IO[str], mode: str = "auto") -> bool:
    """Colour on a terminal (``auto``), never with ``NO_COLOR``, always with ``FORCE_COLOR``;
    ``mode`` (``--color``) ``always`` or ``never`` decides alone."""
    if mode != "auto":
        return mode == "always"
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


def fmt_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


class ConsoleReporter:
    """Prints stage i/N, output lines, each step's result and duration, and the failing error.

    With ``ci`` (:func:`shipyard._ci.detect`), each stage is folded the CI's way and failed
    steps are annotated (issue #19); without, the output is plain lines.
    """

    def __init__(
        self, stream: IO[str] | None = None, *, color: bool | None = None, show_output: bool = True,
        ci: CiFormat | None = None, live: bool | None = None,
    ) -> None:  # fmt: skip
        self.stream = stream or sys.stdout
        #: Colours on; and the steps' output passed as it is (else :func:`sanitize`-d).
        self.color = use_color(self.stream) if color is None else color
        self.show_output = show_output
        #: How the CI in use folds stages and shows failures (None: plain output).
        self.ci = ci
        self._started: dict[Any, float] = {}
        self._parallel = False
        #: With ``ci``: the last output lines of each running step, the fold open now, the
        #: annotations shown once it is closed, and whether a step's failure (not a warning)
        #: was annotated in this deployment.
        self._tails: dict[Any, deque[str]] = {}
        self._folded = False
        self._annotations: list[str] = []
        self._annotated = False
        #: On a terminal (not a CI log): a live view of the running steps under the lines.
        self.live: LiveView | None = LiveView(self.stream, self.color) if (
            live if live is not None else ci is None and is_interactive(self.stream)
        ) else None  # fmt: skip

    def _c(self, text: str, key: Any) -> str:
        if not self.color or key not in _COLORS:
            return text
        return f"\x1b[{_COLORS[key]}m{text}\x1b[0m"

    def write(self, text: str) -> None:
        if self.live is not None:
            self.live.write(text)
            return
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # a closed terminal must not fail a deployment
            pass

    def write_unmasked(self, lines: list[str]) -> None:
        """Write ``lines`` past the CLI's secret masking (GitHub's ``::add-mask::`` lines)."""
        from ._ci import unmasked

        try:
            stream = unmasked(self.stream)
            stream.write("".join(line + "\n" for line in lines))
            stream.flush()
        except (BrokenPipeError, ValueError):
            pass

    def close(self) -> None:
        """End the CI fold still open (a deployment stopped inside a stage)."""
        if self.live is not None:
            self.live.stop()
        if self.ci is None:
            return
        if self._folded:
            self._folded = False
            self.write(self.ci.close_stage())
        for line in self._annotations:
            self.write(line)
        self._annotations.clear()

    def handle(self, event: Event) -> None:
        e: Any = event
        d = event.deployment
        name = event.hook
        if self.live is not None:
            self.live.handle(e, name)
        if name == "shipyard_step_output":
            if self.show_output:
                prefix = f"{e.step.name} | " if self._parallel else ""
                dim = self._c("    │ ", "dim")
                for ln in e.lines:
                    text = ln.text if self.color else sanitize(ln.text)
                    self.write(f"{dim}{prefix}{text}")
            if self.ci is not None:
                tail = self._tails.get((e.stage_index, e.index))
                if tail is None:
                    from ._ci import TAIL_LINES

                    tail = self._tails[(e.stage_index, e.index)] = deque(maxlen=TAIL_LINES)
                tail.extend(sanitize(ln.text) for ln in e.lines)
        elif name == "shipyard_step_started":
            self._started[(e.stage_index, e.index)] = time.monotonic()
        elif name == "shipyard_step_finished":
            start = self._started.pop((e.stage_index, e.index), time.monotonic())
            r = e.result
            label = "ok" if r.status is Status.SUCCEEDED else str(r.status)
            key: Any = r.status
            if r.warning:
                label, key = "warning", "warning"
            line = f"  {self._c(f'{label:<9}', key)} {e.step.name}  ({fmt_duration(time.monotonic() - start)})"
            if r.attempts > 1:
                line += f" after {r.attempts} attempts"
            self.write(line)
            if r.error and r.status is not Status.SUCCEEDED:
                for err_line in r.error.splitlines():
                    self.write("            " + err_line)
            if self.ci is not None:
                tail = self._tails.pop((e.stage_index, e.index), None)
                if r.status is Status.FAILED:
                    from ._ci import failure_message

                    self._annotated |= not r.warning
                    self._annotations += self.ci.annotation(
                        f"step {e.step.name!r} of stage {e.stage.name!r} failed",
                        failure_message(r.error, tail or ()), warning=r.warning,
                    )  # fmt: skip
        elif name == "shipyard_stage_started":
            self._parallel = e.stage.parallel
            extra = []
            if e.stage.parallel:
                extra.append("parallel")
            if e.stage.continue_on_failure:
                extra.append("continue on failure")
            suffix = f" ({', '.join(extra)})" if extra else ""
            if self.ci is not None:
                self.close()
                self._folded = True
                title = f"[{e.index + 1}/{e.total}] {e.stage.name}{suffix}"
                self.write(self.ci.open_stage(d.id, e.index, e.stage.name, title))
            else:
                self.write(self._c(f"[{e.index + 1}/{e.total}] {e.stage.name}", "bold") + suffix)
        elif name == "shipyard_stage_finished":
            self.close()
        elif name == "shipyard_deployment_started":
            self._t0 = time.monotonic()
            if self.ci is not None:
                # Before anything of this deployment is written (issue #19).
                self.write_unmasked(self.ci.preamble())
                self._annotated = False
            rb = f", rolling back #{d.rollback_of}" if d.rollback_of else ""
            self.write(
                f"deploying {d.pipeline} {d.version} to {d.environment} (deployment #{d.id}{rb})"
            )
            if e.start_stage:
                self.write(f"resuming at stage {e.start_stage + 1}: {e.stages[e.start_stage].name}")
        elif name == "shipyard_rollback_started":
            self.write(self._c(f"rolling back to version {e.target}: {e.reason}", "warning"))
        elif name == "shipyard_deployment_finished":
            if self.ci is not None:
                self.close()
                if e.status is not Status.SUCCEEDED and not self._annotated:
                    # Stopped with no failed step to show (cancelled, interrupted, ...).
                    self._annotations += self.ci.annotation(
                        f"deployment #{d.id} {e.status}", e.error or str(e.status)
                    )
                    self.close()
            took = time.monotonic() - getattr(self, "_t0", time.monotonic())
            status = self._c(str(e.status), e.status)
            self.write(f"deployment #{d.id} {status} in {fmt_duration(took)}")
            if e.error:
                self.write(f"  {e.error}")


def is_interactive(stream: IO[str], environ: Any = None) -> bool:
    """Whether ``stream`` is a person's terminal: a TTY, not ``TERM=dumb``, and no CI variable
    set (a CI log may be a pseudo-terminal, and a live view there is noise)."""
    from ._store import CI_VARIABLES

    env = os.environ if environ is None else environ
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()) or env.get("TERM") == "dumb":
        return False
    return not any(env.get(v) not in (None, "", "0", "false") for v in CI_VARIABLES)


_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class LiveView:
    """The running steps, one line each (spinner, name, elapsed time, last output line), drawn
    under the progress lines of a terminal and redrawn ten times a second (issue #19).

    Every line the reporter writes goes through :meth:`write`: the view is erased, the line
    written, the view drawn again below it, so the lines scroll as without a view and the view
    stays at the bottom. Its lines are cut to the terminal's width, so that none wraps.
    """

    #: Seconds between redraws.
    INTERVAL = 0.1

    def __init__(self, stream: IO[str], color: bool) -> None:
        import threading

        self.stream = stream
        self.color = color
        #: Running steps by (stage index, step index): [name, start (monotonic), last line].
        self.running: dict[Any, list[Any]] = {}
        self._drawn = 0
        self._frame = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def handle(self, e: Any, name: str) -> None:
        if name == "shipyard_step_started":
            with self._lock:
                self.running[(e.stage_index, e.index)] = [e.step.name, time.monotonic(), ""]
            self._start()
        elif name == "shipyard_step_output":
            entry = self.running.get((e.stage_index, e.index))
            if entry is not None:
                for ln in reversed(e.lines):
                    text = sanitize(ln.text).strip()
                    if text:
                        entry[2] = text
                        break
        elif name == "shipyard_step_finished":
            with self._lock:
                self.running.pop((e.stage_index, e.index), None)

    def _start(self) -> None:
        import threading

        if self._thread is None:
            self._wake.clear()
            self._thread = threading.Thread(target=self._tick, name="shipyard-live", daemon=True)
            self._thread.start()

    def _tick(self) -> None:
        while not self._wake.wait(self.INTERVAL):
            with self._lock:
                self._frame += 1
                self._emit(self._erase() + self._draw())

    def stop(self) -> None:
        """Stop redrawing and erase the view (the deployment, or its stage, ended)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._wake.set()
            thread.join()
        with self._lock:
            self._emit(self._erase())

    def write(self, text: str) -> None:
        with self._lock:
            self._emit(self._erase() + text + "\n" + self._draw())

    def _erase(self) -> str:
        n, self._drawn = self._drawn, 0
        # Up to the view's first line, then clear to the end of the screen.
        return f"\r\x1b[{n}A\x1b[J" if n else ""

    def _draw(self) -> str:
        if not self.running:
            return ""
        width = self._width()
        now = time.monotonic()
        spin = _SPINNER[self._frame % len(_SPINNER)]
        lines = []
        for step, started, last in list(self.running.values()):
            head = f"  {spin} {step}  {fmt_duration(now - started)}"
            room = width - len(head) - 4
            tail = f"  {last[:room]}" if last and room > 8 else ""
            line = (head + tail)[: width - 1]
            lines.append(f"\x1b[2m{line}\x1b[0m" if self.color else line)
        self._drawn = len(lines)
        return "".join(line + "\n" for line in lines)

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            import shutil

            return shutil.get_terminal_size().columns

    def _emit(self, text: str) -> None:
        if not text:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # a closed terminal must not fail a deployment
            pass
