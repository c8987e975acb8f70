"""The ``command`` step: run a program, stream its output, fail on a non-zero exit.

No shell unless ``shell=True``. Each command runs in its own process group (a new session), so a
timeout or a cancel stops everything it started: SIGTERM to the group, a grace period, SIGKILL.
"""

from __future__ import annotations

import os
import shlex
import signal
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any

from shipyard._exceptions import StepFailed
from shipyard._output import MAX_LINE as MAX_LINE  # re-exported: tests and plugins use it
from shipyard._output import TAIL_LINES
from shipyard._output import LineSplitter
from shipyard._pipeline import Step
from shipyard._pipeline import reject_unknown_options
from shipyard._plugins import hookimpl
from shipyard._reports import StepResult

if TYPE_CHECKING:
    import asyncio

    from shipyard._plugins import StepTypeRegistry
    from shipyard._runner import StepContext

_CHUNK = 64 * 1024


class CommandStep(Step):
    """Run ``program`` with ``args``; a non-zero exit fails the step."""

    kind = "command"

    def __init__(
        self,
        program: str,
        *args: Any,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, Any] | None = None,
        shell: bool = False,
        name: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        **unknown: Any,
    ) -> None:
        reject_unknown_options(self, unknown)
        if not isinstance(program, (str, os.PathLike)) or not str(program):
            raise _definition_error(
                f"command step: the program must be a non-empty string, got {program!r}"
            )
        self.program = os.fspath(program)
        self.args = [
            a if isinstance(a, str) else os.fspath(a) if isinstance(a, os.PathLike) else str(a)
            for a in args
        ]
        self.cwd = cwd
        self.env = dict(env or {})
        self.shell = shell
        super().__init__(name=name, timeout=timeout, retries=retries)

    def default_name(self) -> str:
        text = " ".join([self.program, *self.args])
        return text if len(text) <= 60 else text[:57] + "..."

    def describe(self) -> str:
        argv = shlex.join([self.program, *self.args])
        extra = []
        if self.shell:
            extra.append("shell=True")
        if self.cwd:
            extra.append(f"cwd={os.fspath(self.cwd)}")
        if self.env:
            extra.append("env=" + ",".join(f"{k}={v}" for k, v in self.env.items()))
        return argv + (f"  ({'; '.join(extra)})" if extra else "")

    def options(self) -> dict[str, Any]:
        return {"program": self.program, "args": self.args, "cwd": self.cwd and os.fspath(self.cwd),
                "env": self.env, "shell": self.shell}  # fmt: skip

    async def run(self, context: StepContext) -> StepResult:
        import asyncio

        argv = [str(a) for a in context.resolve([self.program, *self.args])]
        env = context.environ(self.env)
        cwd = context.rootdir / self.cwd if self.cwd else context.rootdir
        try:
            if self.shell:
                proc = await asyncio.create_subprocess_shell(
                    shlex.join(argv) if self.args else argv[0],
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, cwd=cwd, env=env, start_new_session=True,
                )  # fmt: skip
            else:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, cwd=cwd, env=env, start_new_session=True,
                )  # fmt: skip
        except FileNotFoundError as exc:
            missing = cwd if not cwd.is_dir() else self.program
            raise StepFailed(
                f"cannot run {self.program!r}: {missing} not found "
                f"({exc.strerror}); check the program name, PATH and cwd"
            ) from None
        except PermissionError:
            raise StepFailed(
                f"cannot run {self.program!r}: permission denied; is it executable?"
            ) from None
        context.track_process(proc.pid)
        out_tail: deque[str] = deque(maxlen=TAIL_LINES)
        err_tail: deque[str] = deque(maxlen=TAIL_LINES)
        assert proc.stdout is not None
        assert proc.stderr is not None
        readers = [
            asyncio.ensure_future(pump(proc.stdout, "stdout", context, out_tail)),
            asyncio.ensure_future(pump(proc.stderr, "stderr", context, err_tail)),
        ]
        try:
            rc = await proc.wait()
            # A background child may keep our pipes open: read what is there, then stop.
            _, pending = await asyncio.wait(readers, timeout=2.0)
            for t in pending:
                t.cancel()
        except asyncio.CancelledError:
            await terminate(proc, context.grace)
            for t in readers:
                t.cancel()
            raise
        if rc != 0:
            tail = list(err_tail) or list(out_tail)
            how = f"exited with {rc}" if rc > 0 else f"was killed by {_signame(-rc)}"
            message = f"{self.program} {how}"
            if tail:
                message += "; last output:\n" + "\n".join(f"  {line}" for line in tail[-10:])
            raise StepFailed(message, step_exit_code=rc, output=tail)
        return StepResult(exit_code=0)


def _definition_error(message: str) -> Exception:
    from shipyard._exceptions import PipelineDefinitionError

    return PipelineDefinitionError(message)


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


async def pump(
    stream: asyncio.StreamReader, name: str, context: StepContext, tail: deque[str]
) -> None:
    """Read ``stream`` to the end in bounded chunks, logging complete lines as they arrive.

    Bytes that are not UTF-8 become U+FFFD; a line longer than :data:`MAX_LINE` is split.
    """
    splitter = LineSplitter()
    while True:
        chunk = await stream.read(_CHUNK)
        if not chunk:
            break
        lines = splitter.feed(chunk)
        if lines:
            context.log_lines(lines, name)
            tail.extend(lines[-TAIL_LINES:])
    lines = splitter.finish()
    if lines:
        context.log_lines(lines, name)
        tail.extend(lines[-TAIL_LINES:])


async def terminate(proc: asyncio.subprocess.Process, grace: float) -> None:
    """Stop ``proc``'s whole process group: SIGTERM, up to ``grace`` seconds, then SIGKILL."""
    import asyncio

    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while loop.time() < deadline:
        if proc.returncode is not None and not _group_alive(pgid):
            return
        await asyncio.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await proc.wait()


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies waiting to be reaped do not)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return bool(live_group_members(pgid)) if os.path.isdir("/proc/self") else True


def live_group_members(pgid: int) -> list[int]:
    """Pids of the non-zombie processes of group ``pgid`` (Linux ``/proc``)."""
    from shipyard._proc import group_members

    return group_members(pgid)


command = CommandStep


@hookimpl
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    registry.add(CommandStep)
