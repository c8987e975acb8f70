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

from shipyard.sdk import MAX_LINE as MAX_LINE  # re-exported: tests use it
from shipyard.sdk import TAIL_LINES
from shipyard.sdk import LineSplitter
from shipyard.sdk import Step
from shipyard.sdk import StepFailed
from shipyard.sdk import StepResult
from shipyard.sdk import hookimpl
from shipyard.sdk import reject_unknown_options

if TYPE_CHECKING:
    import asyncio
    import subprocess

    from shipyard.sdk import StepContext
    from shipyard.sdk import StepTypeRegistry

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

    async def run(self, context: StepContext) -> StepResult:
        import subprocess

        argv = [str(a) for a in context.resolve([self.program, *self.args])]
        env = context.environb(self.env)
        cwd = context.rootdir / self.cwd if self.cwd else context.rootdir
        try:
            # Popen, not asyncio's subprocess transports: spawning happens on the loop's thread
            # either way, and the transports' machinery cost twice the process itself.
            proc = subprocess.Popen(
                (shlex.join(argv) if self.args else argv[0]) if self.shell else argv,
                shell=self.shell, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True,
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
        watch = ProcessWatch(proc, context)
        try:
            rc = await watch.wait()
        except BaseException:
            await terminate(proc.pid, watch, context.grace)
            raise
        finally:
            watch.close()
        if rc != 0:
            tail = list(watch.tails["stderr"]) or list(watch.tails["stdout"])
            how = f"exited with {rc}" if rc > 0 else f"was killed by {_signame(-rc)}"
            message = f"{self.program} {how}"
            if tail:
                message += "; last output:\n" + "\n".join(f"  {line}" for line in tail[-10:])
            raise StepFailed(message, step_exit_code=rc, output=tail)
        return StepResult(exit_code=0)


class ProcessWatch:
    """Streams a child's stdout and stderr into the log and notices its exit, on the event loop.

    The pipes are read when the loop says they are readable (bounded chunks, complete lines
    logged at once); the exit is seen through a pidfd where the kernel has them, else by a
    thread waiting for the process.
    """

    #: After the process exits, how long to keep reading pipes a background child may hold open.
    DRAIN = 2.0

    def __init__(self, proc: subprocess.Popen[bytes], context: StepContext) -> None:
        import asyncio

        self.proc = proc
        self.context = context
        self.loop = asyncio.get_running_loop()
        self.tails: dict[str, deque[str]] = {
            "stdout": deque(maxlen=TAIL_LINES), "stderr": deque(maxlen=TAIL_LINES),
        }  # fmt: skip
        self.exited: asyncio.Future[int] = self.loop.create_future()
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._readers = [
            PipeReader(proc.stdout.fileno(), "stdout", context, self.tails["stdout"]),
            PipeReader(proc.stderr.fileno(), "stderr", context, self.tails["stderr"]),
        ]
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # no pidfds here: a thread waits instead
            self.loop.run_in_executor(None, proc.wait).add_done_callback(self._thread_saw_exit)
        else:
            self.loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        assert self._pidfd is not None
        self.loop.remove_reader(self._pidfd)
        rc = self.proc.wait()  # it has exited: this only reaps it
        if not self.exited.done():
            self.exited.set_result(rc)

    def _thread_saw_exit(self, fut: Any) -> None:
        if not self.exited.done() and not fut.cancelled() and fut.exception() is None:
            self.exited.set_result(fut.result())

    async def wait(self) -> int:
        """The exit code, once the process exited and its output was read."""
        import asyncio

        rc = await self.exited
        # A background child may keep our pipes open: read what is there, then stop.
        pending = [r.eof for r in self._readers if not r.eof.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.DRAIN)
        return rc

    def close(self) -> None:
        """Stop watching: unregister from the loop and close the pipes."""
        for reader in self._readers:
            reader.close()
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        if self.proc.poll() is None:
            # Stopped but not reaped yet (or still dying after SIGKILL): reap it off the loop,
            # so that it leaves no zombie behind.
            import threading

            threading.Thread(target=self.proc.wait, name="shipyard-reap", daemon=True).start()


def _definition_error(message: str) -> Exception:
    from shipyard.sdk import PipelineDefinitionError

    return PipelineDefinitionError(message)


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


class PipeReader:
    """Logs what arrives on a non-blocking pipe, line by line, as the event loop sees it readable.

    Bounded chunks of :data:`_CHUNK` bytes; bytes that are not UTF-8 become U+FFFD and a line
    longer than :data:`MAX_LINE` is split (:class:`~shipyard.sdk.LineSplitter`). ``eof`` is
    done once the writer closed its end.
    """

    def __init__(self, fd: int, name: str, context: Any, tail: deque[str]) -> None:
        import asyncio

        self.fd = fd
        self.name = name
        self.context = context
        self.tail = tail
        self.loop = asyncio.get_running_loop()
        self.splitter = LineSplitter()
        self.eof: asyncio.Future[None] = self.loop.create_future()
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        lines = self.splitter.feed(data) if data else self.splitter.finish()
        if lines:
            self.context.log_lines(lines, self.name)
            self.tail.extend(lines[-TAIL_LINES:])
        if not data:
            self.close()
            if not self.eof.done():
                self.eof.set_result(None)

    def close(self) -> None:
        """Stop watching the pipe (the caller closes it)."""
        self.loop.remove_reader(self.fd)


async def terminate(pgid: int, watch: ProcessWatch, grace: float) -> None:
    """Stop process group ``pgid``: SIGTERM, up to ``grace`` seconds, then SIGKILL."""
    import asyncio

    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while loop.time() < deadline:
        if watch.exited.done() and not _group_alive(pgid):
            return
        await asyncio.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await asyncio.wait([watch.exited], timeout=grace)


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
    from shipyard.sdk import group_members

    return group_members(pgid)


command = CommandStep


@hookimpl
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    registry.add(CommandStep)
