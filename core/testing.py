"""The ``shipyarder`` fixture: run and assert on your own pipelines with a temporary history.

This pytest plugin is enabled automatically once Shipyard is installed (entry point ``pytest11``).
It is modelled on pytest's ``pytester``: every test gets an isolated project directory (the
current directory for the duration of the test), a clean environment, a history database of its
own, and helpers to write files, run the ``shipyard`` command and look at what happened::

    import shipyard as sy

    def test_release_stage_runs_after_build(shipyarder):
        shipyarder.makepipelines('''
            import shipyard as sy

            @sy.pipeline(environments=["staging"])
            def web(d):
                return [
                    sy.stage("build", sy.command("make", "wheel")),
                    sy.stage("release", sy.command("./release.sh", d.version)),
                ]
        ''')
        # No real processes: every command step "succeeds" and is recorded.
        ran = shipyarder.fake_executor("command", lambda step, context: sy.StepResult())

        result = shipyarder.run("deploy", "web", "1.4.2", "-e", "staging")

        assert result.exit_code == 0
        result.fnmatch_lines(["[[]1/2] build", "*ok*make wheel*", "[[]2/2] release"])
        result.assert_outcomes(succeeded=2)
        assert [step.name for step in ran.calls] == ["make wheel", "./release.sh 1.4.2"]
        finished = result.hooks.getcalls("shipyard_step_finished")
        assert [call.event.result.status for call in finished] == ["succeeded", "succeeded"]

What the fixture sets up, and why:

- a temporary directory that is the current directory (and on ``sys.path``, so modules written
  with :meth:`Shipyarder.makeplugin` import);
- an environment without any ``SHIPYARD_*`` variable of the caller, ``HOME`` inside the temporary
  directory, ``SHIPYARD_DISABLE_PLUGIN_AUTOLOAD=1`` (plugins installed in the test environment do
  not leak in; load them with ``-p``), ``NO_COLOR=1``, ``SHIPYARD_RETRY_BACKOFF`` of
  :data:`RETRY_BACKOFF` seconds (retries do not slow tests down) and ``SHIPYARD_HISTORY`` pointing
  at :attr:`Shipyarder.history_path`;
- at teardown: commands still running from :meth:`Shipyarder.popen` get SIGTERM (they stop their
  steps) and then SIGKILL; deployments still running in managers are cancelled and the managers
  closed; modules imported from the temporary directory are forgotten, so two tests never share
  a pipelines module; the process-wide table of secrets to mask is restored.

How the hook recorder and fake executors reach the command: :meth:`Shipyarder.run` registers
them as ordinary plugins through ``-p``, exactly like a user's plugin module. The recorder is a
module object named ``shipyarder`` placed in ``sys.modules`` for the duration of the run; plugin
objects passed with ``run(..., plugins=[obj])`` are placed there too, under names of their own
(Python allows any object in ``sys.modules``, and ``-p NAME`` imports by name). Nothing in
Shipyard's core knows about testing, so a run under the fixture loads plugins, validates hooks
(a misspelt hook still fails), and lists them in ``shipyard plugins``, exactly as in production.
Every :meth:`~Shipyarder.run` is a fresh command: a new session, plugin manager and recorder.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import traceback
import types
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

import pytest

from ._store import CI_VARIABLES

if TYPE_CHECKING:
    from ._manager import DeploymentManager
    from ._pipeline import Stage
    from ._pipeline import Step
    from ._reports import StepResult
    from ._runner import StepContext

    #: A fake executor's handler: ``handler(step, context)`` returns a StepResult (or None for
    #: success), or an awaitable of one; raising :class:`shipyard.StepFailed` fails the step.
    _Handler = Callable[[Step, StepContext], "StepResult | Awaitable[StepResult | None] | None"]

__all__ = [
    "RETRY_BACKOFF",
    "DeploymentResult",
    "FakeExecutor",
    "HookRecorder",
    "ParsedCall",
    "RunResult",
    "Shipyarder",
    "shipyarder",
]

#: Base seconds of the exponential retry backoff inside the fixture (``SHIPYARD_RETRY_BACKOFF``).
RETRY_BACKOFF: Final = "0.01"

#: Step statuses counted by ``assert_outcomes``.
_OUTCOMES: Final = ("succeeded", "failed", "skipped", "cancelled", "interrupted")

#: The name under which the recorder plugin is registered (``-p shipyarder``).
_RECORDER_NAME: Final = "shipyarder"

_counter = itertools.count(1)


# -------------------------------------------------------------------------------------------------
# Hook recorder
# -------------------------------------------------------------------------------------------------


class ParsedCall:
    """One recorded hook call: its keyword arguments as attributes (``call.event``, ``call.step``).

    :ivar _name: the hook's name.
    """

    def __init__(self, name: str, kwargs: Mapping[str, Any]) -> None:
        self.__dict__.update(kwargs)
        self._name = name

    def __repr__(self) -> str:
        args = {k: v for k, v in self.__dict__.items() if k != "_name"}
        return f"<ParsedCall {self._name!r}(**{args!r})>"

    if TYPE_CHECKING:
        # The attributes are the hook's arguments: ``event``, ``step``, ``config``...
        def __getattr__(self, key: str) -> Any: ...


class HookRecorder:
    """Records every hook call of one command's plugin manager, in order (like pytest's).

    Installed through ``shipyard_addhooks`` with pluggy's hook-call monitoring, so it sees the
    configure and collection hooks, every deployment event (``shipyard_step_finished``, ...) and
    every call of the executor hook ``shipyard_step_call``. Calls made from worker threads (a
    ``python`` step logging) are recorded too.
    """

    def __init__(self) -> None:
        #: Every recorded call, oldest first.
        self.calls: list[ParsedCall] = []
        self._lock = threading.Lock()

    def _before(self, hook_name: str, hook_impls: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        with self._lock:
            self.calls.append(ParsedCall(hook_name, kwargs))

    def _after(
        self, outcome: Any, hook_name: str, hook_impls: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> None:
        pass

    def getcalls(self, names: str | Iterable[str]) -> list[ParsedCall]:
        """The calls of the hooks ``names`` (a list, or one string of space-separated names).

        :returns: the matching calls in the order they happened.
        """
        if isinstance(names, str):
            names = names.split()
        wanted = set(names)
        with self._lock:
            return [c for c in self.calls if c._name in wanted]

    def getcall(self, name: str) -> ParsedCall:
        """The only call of hook ``name``.

        :raises AssertionError: the hook was called zero or several times.
        """
        calls = self.getcalls(name)
        assert len(calls) == 1, f"{name} was called {len(calls)} times, not once: {calls!r}"
        return calls[0]

    def names(self) -> list[str]:
        """The names of the called hooks, in call order (with repetitions)."""
        with self._lock:
            return [c._name for c in self.calls]

    def events(self, name: str) -> list[Any]:
        """The ``event`` argument of every call of the event hook ``name``."""
        return [c.event for c in self.getcalls(name)]

    def clear(self) -> None:
        """Forget the recorded calls."""
        with self._lock:
            self.calls.clear()

    def __repr__(self) -> str:
        return f"<HookRecorder {len(self.calls)} calls>"


class _NoRecorder(HookRecorder):
    """Stands in for the recorder of commands run in another process."""

    def getcalls(self, names: str | Iterable[str]) -> list[ParsedCall]:
        raise AssertionError(
            "hooks are recorded only for commands run in-process with shipyarder.run(); "
            "this result comes from a subprocess (spawn)"
        )


# -------------------------------------------------------------------------------------------------
# Fake executors
# -------------------------------------------------------------------------------------------------


class FakeExecutor:
    """Runs every step of one ``kind`` through a handler instead of the real step type.

    Created by :meth:`Shipyarder.fake_executor`; registered as a ``tryfirst`` implementation of
    ``shipyard_step_call``, so it replaces the real executor (no Docker, no cluster, no process)
    while the runner, retries, timeouts, history and hooks stay real.
    """

    def __init__(self, kind: str, handler: _Handler | None = None) -> None:
        #: The step type this executor takes over (``Step.kind``).
        self.kind = kind
        self.handler = handler
        #: Every step it ran, one entry per attempt, in order.
        self.calls: list[Step] = []
        self._lock = threading.Lock()

    async def __call__(self, step: Step, context: StepContext) -> StepResult:
        with self._lock:
            self.calls.append(step)
        value: Any = None
        if self.handler is not None:
            value = self.handler(step, context)
            if inspect.isawaitable(value):
                value = await value
        if value is None:
            from ._reports import StepResult

            value = StepResult()
        result: StepResult = value
        return result

    def __repr__(self) -> str:
        return f"<FakeExecutor {self.kind!r} {len(self.calls)} calls>"


def _recorder_plugin(
    name: str, recorder: HookRecorder, fakes: Mapping[str, FakeExecutor]
) -> types.ModuleType:
    """The plugin module registered with ``-p`` for one command: recorder and fake executors."""
    from . import hookspecs
    from ._plugins import hookimpl

    module = types.ModuleType(name, "shipyard.testing: hook recorder and fake executors")

    @hookimpl
    def shipyard_addhooks(pluginmanager: Any) -> None:
        pluginmanager.add_hookcall_monitoring(recorder._before, recorder._after)

    @hookimpl(tryfirst=True)
    def shipyard_step_call(step: Step, context: StepContext) -> Awaitable[StepResult] | None:
        fake = fakes.get(step.kind)
        return None if fake is None else fake(step, context)

    module.shipyard_addhooks = shipyard_addhooks  # type: ignore[attr-defined]
    module.shipyard_step_call = shipyard_step_call  # type: ignore[attr-defined]
    # The event bus skips hooks nobody implements; implement every event hook (doing nothing)
    # so that the monitoring above sees each event.
    for hookname, spec in vars(hookspecs).items():
        if not hookname.startswith("shipyard_") or not callable(spec):
            continue
        if list(inspect.signature(spec).parameters) == ["event"]:
            setattr(module, hookname, hookimpl(_make_noop(hookname)))
    return module


def _make_noop(hookname: str) -> Callable[[Any], None]:
    def impl(event: Any) -> None:
        pass

    impl.__name__ = impl.__qualname__ = hookname
    return impl


# -------------------------------------------------------------------------------------------------
# Results
# -------------------------------------------------------------------------------------------------


def _count_outcomes(doc: Mapping[str, Any]) -> tuple[dict[str, int], int, list[str]]:
    counts = dict.fromkeys(_OUTCOMES, 0)
    warnings = 0
    rows = []
    for stage in doc.get("stages", []):
        for step in stage["steps"]:
            counts[step["status"]] = counts.get(step["status"], 0) + 1
            warnings += bool(step.get("warning"))
            error = f"  ({step['error']})" if step.get("error") else ""
            rows.append(f"  {stage['name']} / {step['name']}: {step['status']}{error}")
    return counts, warnings, rows


def _assert_outcomes(
    doc: Mapping[str, Any] | None,
    expected: dict[str, int],
    warnings: int | None,
) -> None:
    __tracebackhide__ = True
    if doc is None:
        raise AssertionError("no deployment was recorded, so there are no outcomes to check")
    counts, warned, rows = _count_outcomes(doc)
    obtained = {k: counts.get(k, 0) for k in expected}
    extra = {k: v for k, v in counts.items() if k not in expected and v}
    if extra:
        obtained.update(extra)
        expected = {**expected, **dict.fromkeys(extra, 0)}
    message = (
        f"step outcomes of deployment #{doc['id']} ({doc['status']}) differ:\n"
        f"  expected {expected}\n  obtained {obtained}\nsteps:\n" + "\n".join(rows)
    )
    assert obtained == expected, message
    if warnings is not None:
        assert warned == warnings, f"expected {warnings} warning(s), got {warned}\n{message}"


def _read_history(history: str) -> list[dict[str, Any]]:
    """Every deployment document (with stages) in ``history``, newest first."""
    if "://" not in history and not Path(history).exists():
        return []
    from ._manager import DeploymentManager

    manager = DeploymentManager(history=history)
    try:
        return [manager.show(d["id"]) for d in manager.history(limit=1_000_000)]
    finally:
        manager.session.close()


def _max_deployment_id(history: str) -> int:
    """The highest deployment id in ``history``, read without side effects (0 if none)."""
    path = history[len("sqlite://") :] if history.startswith("sqlite://") else history
    if "://" in path or not Path(path).is_file():
        return 0
    import sqlite3

    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    try:
        row = conn.execute("SELECT max(id) FROM deployments").fetchone()
    except sqlite3.Error:
        return 0
    finally:
        conn.close()
    return int(row[0] or 0)


class RunResult:
    """What one ``shipyard`` command did: exit code, output, history and recorded hooks.

    Returned by :meth:`Shipyarder.run` (in-process) and :meth:`Shipyarder.spawn` (subprocess).
    """

    def __init__(
        self,
        *,
        args: Sequence[str],
        exit_code: int,
        stdout: str,
        stderr: str,
        output: str,
        history: str,
        before: int,
        hooks: HookRecorder,
        exception: BaseException | None = None,
    ) -> None:
        #: The command-line arguments (without the fixture's ``-p`` options).
        self.args = list(args)
        #: The exit code (0 succeeded, 1 failed or cancelled, 2 usage, 3 locked, 130 interrupted).
        self.exit_code = exit_code
        #: Standard output.
        self.stdout = stdout
        #: Standard error; for an in-process run that crashed, it ends with the traceback.
        self.stderr = stderr
        #: Standard output and error interleaved as a terminal shows them.
        self.output = output
        #: An unexpected exception of an in-process run (the real command would print its
        #: traceback and exit 1), else None.
        self.exception = exception
        #: The history store the command used.
        self.history_path = history
        self._before = before
        self._hooks = hooks
        self._history: list[dict[str, Any]] | None = None

    # -- output -----------------------------------------------------------------------------------

    def _lines(self, stream: str) -> list[str]:
        if stream not in ("output", "stdout", "stderr"):
            raise ValueError(f"stream must be 'output', 'stdout' or 'stderr', not {stream!r}")
        text: str = getattr(self, stream)
        return text.splitlines()

    def fnmatch_lines(
        self, patterns: Sequence[str], *, stream: str = "output", consecutive: bool = False
    ) -> None:
        """Assert that lines matching ``patterns`` (fnmatch-style) appear, in this order.

        Exactly pytest's ``LineMatcher.fnmatch_lines``: ``*`` matches anything, ``?`` one
        character, ``[[]`` a literal ``[``. The failure message shows each pattern, the lines it
        was tried against and the whole output.

        :param stream: ``"output"`` (stdout and stderr interleaved), ``"stdout"`` or ``"stderr"``.
        :param consecutive: the matching lines must follow each other.
        """
        __tracebackhide__ = True
        pytest.LineMatcher(self._lines(stream)).fnmatch_lines(patterns, consecutive=consecutive)

    def re_match_lines(
        self, patterns: Sequence[str], *, stream: str = "output", consecutive: bool = False
    ) -> None:
        """Like :meth:`fnmatch_lines` with regular expressions (``re.match`` on each line)."""
        __tracebackhide__ = True
        pytest.LineMatcher(self._lines(stream)).re_match_lines(patterns, consecutive=consecutive)

    def no_fnmatch_line(self, pattern: str, *, stream: str = "output") -> None:
        """Assert that no line matches ``pattern``."""
        __tracebackhide__ = True
        pytest.LineMatcher(self._lines(stream)).no_fnmatch_line(pattern)

    def json(self) -> Any:
        """Standard output parsed as JSON (for ``--json`` commands)."""
        __tracebackhide__ = True
        try:
            return json.loads(self.stdout)
        except ValueError as exc:
            raise AssertionError(f"stdout is not JSON ({exc}):\n{self.stdout}") from None

    # -- history ----------------------------------------------------------------------------------

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every deployment in the history (``show --json`` documents), newest first.

        Read on first access and then kept: later commands do not change it.
        """
        if self._history is None:
            self._history = _read_history(self.history_path)
        return self._history

    @property
    def deployment(self) -> dict[str, Any] | None:
        """The first deployment this command recorded (the one it was asked to run, not its
        automatic rollback); the latest of the history if it recorded none; None if empty."""
        new = [d for d in self.history if d["id"] > self._before]
        if new:
            return min(new, key=lambda d: d["id"])
        return self.history[0] if self.history else None

    def assert_outcomes(
        self,
        succeeded: int = 0,
        failed: int = 0,
        skipped: int = 0,
        cancelled: int = 0,
        interrupted: int = 0,
        *,
        warnings: int | None = None,
    ) -> None:
        """Assert how many STEPS of :attr:`deployment` ended with each status.

        Like pytest's ``assert_outcomes``, a status not given must not occur. Failed steps of
        ``continue_on_failure`` stages count as ``failed``; ``warnings`` (when given) checks how
        many steps are such warnings.
        """
        __tracebackhide__ = True
        expected = {"succeeded": succeeded, "failed": failed, "skipped": skipped,
                    "cancelled": cancelled, "interrupted": interrupted}  # fmt: skip
        _assert_outcomes(self.deployment, expected, warnings)

    @property
    def hooks(self) -> HookRecorder:
        """The hook calls of this command (in-process runs only)."""
        return self._hooks

    def __repr__(self) -> str:
        tail = "\n".join(self.output.splitlines()[-40:])
        return (
            f"<RunResult shipyard {' '.join(self.args)!s} exit_code={self.exit_code}>\n"
            f"--- output (last 40 lines) ---\n{tail}\n---"
        )


class DeploymentResult:
    """A deployment run with :meth:`Shipyarder.deploy` through :class:`shipyard.DeploymentManager`."""

    def __init__(self, document: dict[str, Any], hooks: HookRecorder, history: str) -> None:
        #: The deployment's document, as ``shipyard show ID --json`` prints it.
        self.document = document
        #: The hook calls of the manager that ran it.
        self.hooks = hooks
        self.history_path = history

    @property
    def id(self) -> int:
        """The deployment's id."""
        deployment_id: int = self.document["id"]
        return deployment_id

    @property
    def status(self) -> str:
        """Its final status."""
        status: str = self.document["status"]
        return status

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every deployment in the history now, newest first."""
        return _read_history(self.history_path)

    def assert_outcomes(
        self,
        succeeded: int = 0,
        failed: int = 0,
        skipped: int = 0,
        cancelled: int = 0,
        interrupted: int = 0,
        *,
        warnings: int | None = None,
    ) -> None:
        """Assert how many steps ended with each status (see :meth:`RunResult.assert_outcomes`)."""
        __tracebackhide__ = True
        expected = {"succeeded": succeeded, "failed": failed, "skipped": skipped,
                    "cancelled": cancelled, "interrupted": interrupted}  # fmt: skip
        _assert_outcomes(self.document, expected, warnings)

    def __repr__(self) -> str:
        return f"<DeploymentResult #{self.id} {self.status}>"


# -------------------------------------------------------------------------------------------------
# The fixture object
# -------------------------------------------------------------------------------------------------


class Shipyarder:
    """An isolated Shipyard project in a temporary directory; see the module docstring."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        #: The project directory (the current directory during the test).
        self.path = path
        #: The history database every command of the test uses unless told otherwise.
        self.history_path = path / ".shipyard" / "history.db"
        self.monkeypatch = monkeypatch
        self._fakes: dict[str, FakeExecutor] = {}
        self._modules: list[str] = []
        self._managers: list[DeploymentManager] = []
        self._popens: list[subprocess.Popen[bytes]] = []

        home = path / "home"
        home.mkdir()
        for name in list(os.environ):
            if name.startswith("SHIPYARD_") or name == "FORCE_COLOR":
                monkeypatch.delenv(name)
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("SHIPYARD_DISABLE_PLUGIN_AUTOLOAD", "1")
        monkeypatch.setenv("NO_COLOR", "1")
        monkeypatch.setenv("SHIPYARD_RETRY_BACKOFF", RETRY_BACKOFF)
        # A test's deployments are not a CI job's: no CI-native output, no job summary, no
        # warning that the test's history file dies with the runner.
        for var in (*CI_VARIABLES, "GITHUB_STEP_SUMMARY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("SHIPYARD_HISTORY", str(self.history_path))
        monkeypatch.chdir(path)
        # Saves sys.path and restores it whole at teardown (pipelines files add their folder).
        monkeypatch.syspath_prepend(str(path))
        # Secrets resolved in one test must not mask text in the next one: the masking table is
        # process-wide by design (a value once resolved stays masked), so restore it at teardown.
        from . import _secrets

        monkeypatch.setattr(_secrets, "_values", set(_secrets._values))
        monkeypatch.setattr(_secrets, "_state", _secrets._state)

    def __repr__(self) -> str:
        return f"<Shipyarder {self.path}>"

    # -- files ------------------------------------------------------------------------------------

    def makefile(self, name: str | os.PathLike[str], src: str | bytes = "") -> Path:
        """Write the file ``name`` (relative to :attr:`path`; folders are created).

        Text is dedented and a leading newline dropped, so it can be written as an indented
        triple-quoted string; bytes are written as they are.

        :returns: the file's path.
        """
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            path.write_bytes(src)
        else:
            path.write_text(textwrap.dedent(src).lstrip("\n"), encoding="utf-8")
        import importlib

        importlib.invalidate_caches()
        return path

    def makepipelines(self, src: str) -> Path:
        """Write ``pipelines.py`` (dedented); see :meth:`makefile`."""
        return self.makefile("pipelines.py", src)

    def makeplugin(self, name: str, src: str) -> Path:
        """Write the plugin module ``name`` (``<name>.py``, importable) to load with ``-p name``.

        A module of that name imported earlier in the test is forgotten, so the new source is
        the one loaded by the next command.
        """
        if not name.isidentifier():
            raise ValueError(f"plugin module name must be an identifier, got {name!r}")
        sys.modules.pop(name, None)
        return self.makefile(f"{name}.py", src)

    def copy(
        self, source: str | os.PathLike[str], name: str | os.PathLike[str] | None = None
    ) -> Path:
        """Copy the file or directory ``source`` into the project (as ``name``, else its name)."""
        source = Path(source)
        target = self.path / (name if name is not None else source.name)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        import importlib

        importlib.invalidate_caches()
        return target

    # -- plugins ----------------------------------------------------------------------------------

    def fake_executor(self, kind: str, handler: _Handler | None = None) -> FakeExecutor:
        """Run the steps of type ``kind`` through ``handler(step, context)`` in later commands.

        The handler returns a :class:`shipyard.StepResult` (None means succeeded) or an
        awaitable of one, may log with ``context.log(text)``, and may raise
        :class:`shipyard.StepFailed` (or call :func:`shipyard.fail`) to fail the step. The step
        type itself must still be provided by a loaded plugin (built-in or ``-p``); only its
        execution is replaced. Applies to :meth:`run`, :meth:`deploy`, :meth:`plan` and
        :meth:`manager`, not to :meth:`spawn` (another process).

        :returns: the executor, whose ``calls`` lists the steps it ran.
        """
        fake = FakeExecutor(kind, handler)
        self._fakes[kind] = fake
        return fake

    def _install(self, base: str, plugin: Any) -> str:
        """Put ``plugin`` in ``sys.modules`` under a free name derived from ``base``."""
        name = base
        while name in sys.modules:
            name = f"{base}_{next(_counter)}"
        sys.modules[name] = plugin
        self._modules.append(name)
        return name

    def _uninstall(self, names: Iterable[str]) -> None:
        for name in list(names):
            if name in self._modules:
                sys.modules.pop(name, None)
                self._modules.remove(name)

    def _plugin_names(self, recorder: HookRecorder, plugins: Sequence[Any]) -> list[str]:
        """Install the recorder plugin and ``plugins``; return the names to pass with ``-p``."""
        name = _RECORDER_NAME
        while name in sys.modules:
            name = f"{_RECORDER_NAME}_{next(_counter)}"
        names = [self._install(name, _recorder_plugin(name, recorder, self._fakes))]
        for obj in plugins:
            if isinstance(obj, str):
                names.append(obj)
                continue
            base = getattr(obj, "__name__", None) or type(obj).__name__
            names.append(self._install(f"shipyarder_{str(base).lower()}", obj))
        return names

    # -- running ----------------------------------------------------------------------------------

    def _history_for(self, args: Sequence[str]) -> str:
        """The history store a command with ``args`` uses (as the CLI resolves it)."""
        import click

        from ._cli import cli
        from ._config import Config
        from ._exceptions import ShipyardError

        file = history = None
        try:
            with cli.make_context("shipyard", list(args), resilient_parsing=True) as ctx:
                file, history = ctx.params.get("file"), ctx.params.get("history")
        except (click.ClickException, click.exceptions.Exit):
            pass
        try:
            return Config.resolve(file=file, history=history).history
        except ShipyardError:
            return str(self.history_path)

    def run(
        self,
        *args: str | os.PathLike[str],
        plugins: Sequence[Any] = (),
        input: str | bytes | None = None,
        env: Mapping[str, str | None] | None = None,
    ) -> RunResult:
        """Run ``shipyard *args`` in this process (click's ``CliRunner``) and return the result.

        Each call is a fresh command (session, plugin manager, recorder). The fixture's hook
        recorder and fake executors are registered as the plugin ``shipyarder`` with ``-p``.

        :param plugins: extra plugin objects (modules, class instances) to register, each
            through ``-p`` like a plugin module; a string is passed as ``-p STRING``.
        :param input: standard input.
        :param env: environment variables to set (None: unset) for this command only.
        """
        from click.testing import CliRunner

        from ._cli import cli

        argv = [os.fspath(a) for a in args]
        recorder = HookRecorder()
        names = self._plugin_names(recorder, plugins)
        full = [x for n in names for x in ("-p", n)] + argv
        with self.monkeypatch.context() as mp:
            for key, value in (env or {}).items():
                if value is None:
                    mp.delenv(key, raising=False)
                else:
                    mp.setenv(key, value)
            history = self._history_for(argv)
            before = _max_deployment_id(history)
            # The real command sees its own arguments in sys.argv (recorded, used by --detach).
            mp.setattr(sys, "argv", ["shipyard", *argv])
            try:
                runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click < 8.2
            except TypeError:
                runner = CliRunner()
            try:
                result = runner.invoke(cli, full, input=input, prog_name="shipyard")
            finally:
                self._uninstall(names)
        stdout = result.stdout
        stderr = result.stderr
        output_bytes = getattr(result, "output_bytes", None)
        output = (
            output_bytes.decode("utf-8", "replace") if output_bytes is not None else stdout + stderr
        )
        exception = result.exception
        if exception is not None and not isinstance(exception, SystemExit):
            assert result.exc_info is not None
            text = "".join(traceback.format_exception(*result.exc_info))
            stderr += text
            output += text
        else:
            exception = None
        return RunResult(
            args=argv, exit_code=result.exit_code, stdout=stdout, stderr=stderr, output=output,
            history=history, before=before, hooks=recorder, exception=exception,
        )  # fmt: skip

    def spawn(
        self,
        *args: str | os.PathLike[str],
        env: Mapping[str, str | None] | None = None,
        input: bytes | None = None,
        timeout: float = 300,
    ) -> RunResult:
        """Run ``python -m shipyard *args`` as a real subprocess in the project directory.

        For what needs a real process: signals, the console script, imports of a fresh
        interpreter. Fake executors and the hook recorder do not apply (``hooks`` raises).

        :param env: environment variables to set (None: unset) for this command only.
        :param timeout: a safety net against a hung command, not a performance limit.
        """
        argv = [os.fspath(a) for a in args]
        history = self._history_for(argv)
        before = _max_deployment_id(history)
        proc = self.popen(*argv, env=env, stdin=subprocess.PIPE if input is not None else None)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            err += f"\n[shipyarder: killed after the safety timeout of {timeout:g}s]".encode()
        stdout = out.decode("utf-8", "replace")
        stderr = err.decode("utf-8", "replace")
        return RunResult(
            args=argv, exit_code=proc.returncode, stdout=stdout, stderr=stderr,
            output=stdout + stderr, history=history, before=before, hooks=_NoRecorder(),
        )  # fmt: skip

    def _environ(self, env: Mapping[str, str | None] | None) -> dict[str, str]:
        environ = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        return environ

    def popen(
        self,
        *args: str | os.PathLike[str],
        env: Mapping[str, str | None] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[bytes]:
        """Start ``python -m shipyard *args`` in the background (its own process group).

        stdout and stderr are pipes unless given. Whatever is still running at teardown is killed
        with its whole process group.
        """
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(
            [sys.executable, "-m", "shipyard", *[os.fspath(a) for a in args]],
            cwd=self.path, env=self._environ(env), start_new_session=True, **kwargs,
        )  # fmt: skip
        self._popens.append(proc)
        return proc

    # -- the Python API ---------------------------------------------------------------------------

    def manager(
        self, *, plugins: Sequence[Any] = (), recorder: HookRecorder | None = None
    ) -> DeploymentManager:
        """A :class:`shipyard.DeploymentManager` for the project, with the fake executors.

        Closed (background deployments awaited) at teardown.

        :param plugins: extra plugin objects or module names.
        :param recorder: record the manager's hook calls here.
        """
        from ._manager import DeploymentManager

        names = self._plugin_names(recorder or HookRecorder(), plugins)
        manager = DeploymentManager(
            pipelines=self.path / "pipelines.py", history=self.history_path, plugins=names
        )
        self._managers.append(manager)
        return manager

    def plan(
        self,
        pipeline: str,
        version: str,
        environment: str,
        vars: Mapping[str, str] | None = None,
        *,
        plugins: Sequence[Any] = (),
    ) -> list[Stage]:
        """The stages ``deploy`` would run (:meth:`shipyard.DeploymentManager.plan`)."""
        manager = self.manager(plugins=plugins)
        return manager.plan(pipeline, version, environment, vars)

    def deploy(
        self,
        pipeline: str,
        version: str,
        environment: str,
        *,
        vars: Mapping[str, str] | None = None,
        rollback: bool = True,
        notify: Sequence[str] = (),
        plugins: Sequence[Any] = (),
    ) -> DeploymentResult:
        """Deploy through :class:`shipyard.DeploymentManager` and wait until it ends.

        :returns: the deployment's document and the hook calls (an automatic rollback, if one
            ran, is the next deployment in ``history``).
        """
        recorder = HookRecorder()
        manager = self.manager(plugins=plugins, recorder=recorder)
        dep_id = manager.deploy(
            pipeline, version, environment, vars=vars, rollback=rollback, notify=notify
        )
        document = manager.wait(dep_id)
        return DeploymentResult(document, recorder, str(self.history_path))

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every deployment in :attr:`history_path` now (documents with stages), newest first."""
        return _read_history(str(self.history_path))

    # -- teardown ---------------------------------------------------------------------------------

    def _finalize(self) -> None:
        for proc in self._popens:
            if proc.poll() is None:
                _kill_group(proc)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            proc.wait()
        for manager in self._managers:
            # A test that failed half-way may leave a deployment running: stop it rather than
            # wait for it (close() waits for background deployments).
            from ._reports import Status

            try:
                running = [
                    d["id"]
                    for d in manager.history(limit=1000)
                    if not Status(d["status"]).is_finished
                ]
                for dep_id in running:
                    manager.cancel(dep_id, "the test ended (shipyard.testing teardown)")
            except Exception:  # teardown is best effort; the test's own error matters more
                pass
            manager.close()
        self._uninstall(list(self._modules))
        root = str(self.path)
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if isinstance(file, str) and file.startswith(root + os.sep):
                del sys.modules[name]


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop a ``shipyard`` process and what it started.

    SIGTERM first: the command cancels its deployment and stops its steps' process groups (each
    step runs in a session of its own, out of reach of a signal to the command's group); then
    SIGKILL to the command's group if it is still there after ``grace`` seconds.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
        return
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


@pytest.fixture
def shipyarder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shipyarder]:
    """An isolated Shipyard project: see :class:`shipyard.testing.Shipyarder`."""
    project = Shipyarder(tmp_path, monkeypatch)
    yield project
    project._finalize()
