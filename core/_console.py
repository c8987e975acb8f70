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
        ci: CiFormat | None = None,
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

    def _c(self, text: str, key: Any) -> str:
        if not self.color or key not in _COLORS:
            return text
        return f"\x1b[{_COLORS[key]}m{text}\x1b[0m"

    def write(self, text: str) -> None:
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
