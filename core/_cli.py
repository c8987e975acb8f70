"""The ``shipyard`` command line: a thin click layer over the application layer.

Each command parses its arguments, calls :class:`~shipyard._service.DeploymentService` (or runs
a request it built through :func:`~shipyard._deploy.execute`) and renders the answer; the rules
live there, not here.

Only click is imported at start-up; every command imports what it needs, so ``--help`` and
``--version`` stay fast and ``list``/``plan`` never import asyncio, sqlite-utils or HTTP clients.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING
from typing import Any
from typing import NoReturn

import click

from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._deploy import DeployRequest
    from ._deploy import Outcome
    from ._pipeline import Stage
    from ._pipeline import Step
    from ._service import DeploymentService
    from ._session import Session


# -- plumbing --------------------------------------------------------------------------------------


class _Group(click.Group):
    """Shows Shipyard errors once, with their exit codes; loads plugin commands on demand."""

    #: The arguments of the running invocation (recorded in the audit, reused by --detach).
    argv: list[str] = []

    def main(self, args: Any = None, *a: Any, **kw: Any) -> Any:
        _Group.argv = list(args) if args is not None else sys.argv[1:]
        return super().main(args, *a, **kw)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None and not ctx.resilient_parsing:
            plugins, problems = self._plugin_commands(ctx)
            cmd = plugins.get_command(ctx, cmd_name)
            if cmd is None and problems:
                raise click.UsageError(f"No such command {cmd_name!r}; " + "; ".join(problems), ctx)
            for problem in problems if cmd is not None else ():
                click.echo(f"shipyard: warning: {problem}", err=True)
        return cmd

    @staticmethod
    def _plugin_commands(ctx: click.Context) -> tuple[click.Group, list[str]]:
        """The plugins' commands, on a group of this invocation's own (never on ``cli``, which
        outlives it), and what went wrong adding them."""
        found = ctx.meta.get("shipyard.plugin_commands")
        if found is None:
            from ._exceptions import ShipyardError
            from ._secrets import mask

            # click resolves the subcommand before the group's callback sets ctx.obj.
            state = ctx.obj or _State(
                file=ctx.params.get("file"), history=ctx.params.get("history"),
                plugins=list(ctx.params.get("plugins") or ()), verbose=0,
                color=ctx.params.get("color") or "auto",
            )  # fmt: skip
            group = click.Group("plugin commands")
            try:
                problems = state.session.pm.add_commands(group)
            except ShipyardError as exc:  # the pipelines file or a plugin cannot be loaded
                problems = [f"plugins could not be loaded: {exc}"]
            found = ctx.meta["shipyard.plugin_commands"] = (group, [mask(p) for p in problems])
        return found

    def invoke(self, ctx: click.Context) -> Any:
        from ._exceptions import ShipyardError

        try:
            return super().invoke(ctx)
        except ShipyardError as exc:
            _fail(exc, ctx)
        except KeyboardInterrupt:
            from ._exceptions import ExitCode

            click.echo("interrupted", err=True)
            ctx.exit(ExitCode.INTERRUPTED)


def _fail(exc: Exception, ctx: click.Context) -> NoReturn:
    from ._exceptions import ExitCode
    from ._exceptions import PipelineFileError
    from ._secrets import mask

    state: _State | None = ctx.obj
    verbose = state.verbose if state else 0
    show = getattr(exc, "show", None)
    text = show() if show else str(exc)
    click.echo(mask(text), err=True)
    if verbose:
        cause = exc.__cause__ or exc.__context__
        if isinstance(exc, PipelineFileError) and exc.cause is not None:
            cause = exc.cause
        if cause is not None:
            click.echo(mask(_user_traceback(cause)), err=True)
    ctx.exit(getattr(exc, "exit_code", ExitCode.USAGE_ERROR))


def _user_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` without importlib's and Shipyard's own frames."""
    import traceback

    # By module, not by path: an editable install keeps shipyard.plugins in plugins/, and a
    # user's own folder may well be called core/ or shipyard/.
    frames = traceback.StackSummary.extract(
        (frame, lineno)
        for frame, lineno in traceback.walk_tb(exc.__traceback__)
        if str(frame.f_globals.get("__name__", "")).partition(".")[0]
        not in ("shipyard", "importlib")
    )
    lines = ["Traceback (most recent call last, Shipyard's frames hidden):\n"]
    lines += frames.format()
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines).rstrip()


class _State:
    def __init__(self, **options: Any) -> None:
        self.options = options
        self.verbose: int = options["verbose"]
        self._session: Session | None = None
        self._service: DeploymentService | None = None

    @property
    def session(self) -> Session:
        if self._session is None:
            from ._config import Config
            from ._session import Session

            o = self.options
            self._session = Session(
                Config.resolve(
                    file=o["file"],
                    history=o["history"],
                    plugins=o["plugins"],
                    secret_files=o.get("secret_files", ()),
                    verbose=self.verbose,
                )
            )
        return self._session

    @property
    def service(self) -> DeploymentService:
        if self._service is None:
            from ._service import DeploymentService

            self._service = DeploymentService(self.session)
        return self._service

    def close(self) -> None:
        if self._service is not None:
            self._service.close()
        if self._session is not None:
            self._session.close()


pass_state = click.make_pass_decorator(_State)


def _parse_vars(values: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` pairs; the value may contain ``=``; a later key wins."""
    out: dict[str, str] = {}
    for raw in values:
        key, sep, value = raw.partition("=")
        key = key.strip()
        if (
            not sep
            or not key
            or not (key[0].isalpha() or key[0] == "_")
            or not all(c.isalnum() or c in "_.-" for c in key)
        ):
            raise click.BadParameter(
                f"{raw!r}: expected KEY=VALUE with KEY made of letters, digits, '_', '.', '-'",
                param_hint="--var",
            )
        out[key] = value
    return out


def _echo_json(data: Any) -> None:
    import json

    from ._secrets import mask_any

    click.echo(json.dumps(mask_any(data), indent=2, sort_keys=False))


def _table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


def _when(ts: str | None) -> str:
    return (ts or "-").replace("T", " ")[:19]


def _duration(doc: Mapping[str, Any]) -> str:
    from ._console import fmt_duration
    from ._reports import parse_ts
    from ._reports import utcnow

    if not doc.get("started_at"):
        return "-"
    end = doc.get("finished_at") or utcnow()
    return fmt_duration(parse_ts(end) - parse_ts(doc["started_at"]))


env_option = click.option("-e", "--env", "environment", required=True, help="Target environment.")
yes_option = click.option(
    "--yes", is_flag=True, envvar="SHIPYARD_YES",
    help="Confirm a deployment to a protected environment (or SHIPYARD_YES=1).",
)  # fmt: skip
ci_option = click.option(
    "--ci", type=click.Choice(["github", "gitlab", "none"]), default=None,
    help="CI-native output: folded stages, failure annotations, a summary [default: detected "
    "from GITHUB_ACTIONS=true or GITLAB_CI=true; none: plain output].",
)  # fmt: skip


# -- the group ---------------------------------------------------------------------------------


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-f", "--file", "file", metavar="PATH", envvar="SHIPYARD_FILE",
    help="Pipelines file [default: ./pipelines.py; env SHIPYARD_FILE].",
)  # fmt: skip
@click.option(
    "--history", "--store", "history", metavar="PATH|URL",
    envvar=["SHIPYARD_STORE", "SHIPYARD_HISTORY"],
    help="History store: a path, sqlite:///PATH or postgresql://... [default: "
    ".shipyard/history.db beside the pipelines file; env SHIPYARD_STORE].",
)  # fmt: skip
@click.option(
    "-p", "--plugin", "plugins", multiple=True, metavar="MODULE",
    help="Load a plugin module; -p no:NAME disables one. Repeatable.",
)  # fmt: skip
@click.option("-v", "--verbose", count=True, help="More detail; tracebacks of pipeline errors.")
@click.option("--debug", is_flag=True, help="Same as -v.")
@click.option(
    "--color", type=click.Choice(["auto", "always", "never"]), default="auto",
    show_default=True,
    help="Colours, and steps' output as it is; else escapes and control characters removed.",
)  # fmt: skip
@click.version_option(
    __version__, "--version", prog_name="shipyard", message="%(prog)s %(version)s"
)
@click.pass_context
def cli(
    ctx: click.Context,
    file: str | None,
    history: str | None,
    plugins: tuple[str, ...],
    verbose: int,
    debug: bool,
    color: str,
) -> None:
    """Deploy pipelines written in Python.

    Pipelines live in pipelines.py as @shipyard.pipeline functions. Every deployment, stage,
    step and log line is recorded in the history, which drives status, logs and rollback.

    Exit codes: 0 succeeded; 1 the deployment failed or was cancelled; 2 usage, pipelines-file or
    not-found error; 3 the environment is locked; 130 interrupted.
    """
    ctx.obj = _State(
        file=file, history=history, plugins=list(plugins), verbose=verbose + int(debug),
        color=color,
    )  # fmt: skip
    if color != "auto":
        ctx.color = color == "always"  # click.echo strips or keeps ANSI codes by this too
    from ._secrets import masked_stdio

    # Secrets are masked also in what steps and plugins print themselves (not only in reports).
    ctx.with_resource(masked_stdio())
    ctx.call_on_close(ctx.obj.close)


# -- list & plan -----------------------------------------------------------------------------------


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def list_cmd(state: _State, as_json: bool) -> None:
    """List pipelines, their environments and stages."""
    from ._exceptions import PipelineDefinitionError
    from ._pipeline import Deployment

    pipelines = state.session.load()
    rows: list[dict[str, Any]] = []
    for p in pipelines.values():
        env = (p.environments or ["*"])[0]
        try:
            built = p.build(Deployment(0, p.name, "<version>", env))
        except PipelineDefinitionError:
            built = []
        # The hosts (or other targets) its steps act on, each once, in order.
        targets = list(dict.fromkeys(t for s in built for step in s.steps for t in step.targets()))
        rows.append(
            {"name": p.name, "description": p.description.split("\n")[0],
             "environments": p.environments, "rollback": p.rollback,
             "stages": [s.name for s in built], "targets": targets}
        )  # fmt: skip
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo(f"no pipelines in {state.session.config.pipelines_file}")
        return
    for r in rows:
        envs = ", ".join(r["environments"]) if r["environments"] else "any environment"
        click.echo(f"{r['name']}  [{envs}]  rollback={r['rollback']}")
        if r["description"]:
            click.echo(f"    {r['description']}")
        click.echo(
            f"    stages: {' -> '.join(r['stages']) or '(could not be built without a version)'}"
        )
        for target in r["targets"]:
            click.echo(f"    hosts {target}")


@cli.command()
@click.argument("pipeline")
@click.argument("version")
@env_option
@click.option("--var", "vars_", multiple=True, metavar="K=V", help="A variable for the pipeline.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def plan(state: _State, pipeline: str, version: str, environment: str, vars_: tuple[str, ...],
         as_json: bool) -> None:  # fmt: skip
    """Show the resolved stages and steps of a deployment; change nothing.

    Exits 2 when a step cannot be rendered (a manifest with an unknown variable, say): deploy
    would fail on it.
    """
    from ._exceptions import PipelineDefinitionError
    from ._exceptions import UsageError
    from ._secrets import mask

    given = _parse_vars(vars_)
    pipe, d, stages = state.service.plan(pipeline, version, environment, given)
    from ._environments import provenance

    env = state.service.environment(pipeline, environment)
    origin = provenance(env, given)
    rootdir = state.session.config.rootdir  # steps' relative paths (e.g. manifests) start here
    problems: list[str] = []

    def details(stage: Stage, step: Step) -> list[str]:
        try:
            return step.plan_details(d, rootdir)
        except PipelineDefinitionError as exc:
            problems.append(mask(f"stage {stage.name!r}, step {step.name!r}: {exc}"))
            return [str(exc)]

    def done() -> None:
        if problems:
            n = len(problems)
            raise UsageError(
                f"{n} step{'s' if n > 1 else ''} of the plan cannot be rendered (deploy would "
                "fail): " + "; ".join(problems)
            )

    if as_json:
        _echo_json(
            {
                "pipeline": pipe.name, "version": version, "environment": environment,
                "vars": [{"name": k, "value": mask(v), "from": origin.get(k, "--var")}
                         for k, v in d.vars.items()],
                "environment_settings": None if env is None else {
                    "source": env.source, "secrets": list(env.secrets),
                    "requires": list(env.requires), "lock": env.lock,
                    "protected": env.protected,
                },
                "stages": [
                    {"name": s.name, "parallel": s.parallel,
                     "continue_on_failure": s.continue_on_failure,
                     "steps": [_plan_step(st, details(s, st)) for st in s.steps]}
                    for s in stages
                ],
            }
        )  # fmt: skip
        return done()
    click.echo(f"plan: {pipe.name} {version} -> {environment}")
    if env is not None:
        rules = [f"requires {', '.join(env.requires)} first"] if env.requires else []
        rules += [f"secrets {', '.join(env.secrets)}"] if env.secrets else []
        rules += ["protected (--yes)"] if env.protected else []
        click.echo(f"environment {env.name} ({env.source})" + (
            ": " + "; ".join(rules) if rules else ""))  # fmt: skip
    for k, v in d.vars.items():
        click.echo(mask(f"var {k}={v}  ({origin.get(k, '--var')})"))
    for i, s in enumerate(stages, 1):
        flags = [
            f
            for f, on in (("parallel", s.parallel), ("continue on failure", s.continue_on_failure))
            if on
        ]
        click.echo(f"[{i}/{len(stages)}] {s.name}" + (f" ({', '.join(flags)})" if flags else ""))
        for st in s.steps:
            opts = []
            if st.timeout:
                opts.append(f"timeout {st.timeout:g}s")
            if st.retries:
                opts.append(f"retries {st.retries}")
            extra = f"  [{', '.join(opts)}]" if opts else ""
            click.echo(mask(f"  - {st.kind}: {st.describe()}{extra}"))
            for line in details(s, st):
                click.echo(mask(f"      {line}"))
    done()


def _plan_step(step: Step, details: list[str]) -> dict[str, Any]:
    """One step of ``plan --json``; ``details`` are the extra lines, e.g. rendered objects."""
    return {"name": step.name, "kind": step.kind, "description": step.describe(),
            "timeout": step.timeout, "retries": step.retries, "details": details}  # fmt: skip


# -- deploy, rollback, retry -----------------------------------------------------------------------


def _run(
    state: _State, req: DeployRequest, *, as_json: bool, ci: str | None = None,
    junit: str | None = None, report_json: str | None = None,
) -> NoReturn:  # fmt: skip
    """Run a deployment in this process with signal handling; exit with its code.

    ``ci``: ``--ci`` (None: detected); ``junit``, ``report_json``: report files to write once
    the deployment has ended (issue #19).
    """
    from ._ci import detect
    from ._ci import finish
    from ._console import ConsoleReporter
    from ._console import use_color
    from ._exceptions import ShipyardError

    session = state.session
    session.load()
    stream = sys.stderr if as_json else sys.stdout
    reporter = ConsoleReporter(
        stream, color=use_color(stream, state.options["color"]), ci=detect(ci)
    )
    reports: dict[str, Any] = {"ci": reporter.ci, "write": reporter.write, "junit": junit,
                               "report_json": report_json}  # fmt: skip
    began: list[int] = []
    try:
        if as_json:
            # stdout carries the one JSON document: whatever steps print goes to stderr.
            import contextlib

            with contextlib.redirect_stdout(sys.stderr):
                outcome = _execute(session, req, reporter=reporter, on_begin=began.append)
        else:
            outcome = _execute(session, req, reporter=reporter, on_begin=began.append)
    except ShipyardError:
        # Recorded as failed before any step ran (build error, missing secret): still one document.
        reporter.close()
        if began:
            finish(state.service, began[0], **reports)
        if as_json and began:
            _echo_json(state.service.document(began[0]))
        raise
    reporter.close()
    if as_json:
        doc = state.service.document(outcome.id)
        if outcome.rollback is not None:
            doc["rollback"] = state.service.document(outcome.rollback.id, stages=False)
        _echo_json(doc)
    if outcome.rollback is not None:
        rb = outcome.rollback
        reporter.write(
            f"automatic rollback #{rb.id} {rb.status}; deployment #{outcome.id} stays failed"
        )
    rollback_id = outcome.rollback.id if outcome.rollback is not None else None
    finish(state.service, outcome.id, rollback_id=rollback_id, **reports)
    if outcome.status == "awaiting_approval":
        _say_awaiting(state, outcome.id, reporter.write)
        if state.options.get("wait_approval"):
            sys.exit(
                _follow_gate(state, outcome.id, state.options["wait_approval"], reporter.write)
            )
        if state.options.get("exit_zero_when_awaiting"):
            sys.exit(0)
    sys.exit(outcome.exit_code)


def _follow_gate(state: _State, dep_id: int, seconds: float, write: Any) -> int:
    """``deploy --wait-approval``: stay until the gate is decided and what follows has run
    (the approver's process runs it), up to ``seconds``; the exit code of how it ended.
    Ctrl-C stops the waiting, never the gate: it keeps waiting for its decision."""
    import time

    from ._exceptions import ExitCode

    deadline = time.monotonic() + seconds
    last = None
    try:
        while time.monotonic() < deadline:
            status = state.service.status(dep_id)
            if status != last and status != "awaiting_approval":
                write(f"deployment #{dep_id} is {status}")
            last = status
            if status not in ("awaiting_approval", "running", "pending"):
                return int(ExitCode.OK if status == "succeeded" else ExitCode.FAILED)
            time.sleep(0.5)
    except KeyboardInterrupt:
        write(f"stopped waiting; deployment #{dep_id} still awaits its approval")
        return int(ExitCode.INTERRUPTED)
    write(f"deployment #{dep_id} still awaits approval after {seconds:g}s")
    return int(ExitCode.AWAITING_APPROVAL)


def _say_awaiting(state: _State, dep_id: int, write: Any) -> None:
    """What a deployment stopped at a gate waits for, and how to decide it."""
    gate = state.service.document(dep_id, stages=False).get("gate") or {}
    who = ", ".join(gate.get("approvers") or []) or "anyone"
    write(
        f"deployment #{dep_id} awaits approval at stage {gate.get('stage')!r} "
        f"({gate.get('required', 1)} of {who}; expires {gate.get('expires_at')}, then "
        f"{gate.get('on_timeout')}); nothing runs meanwhile"
    )
    if gate.get("instructions"):
        write(f"  {gate['instructions']}")
    choices = f" --choice {'|'.join(gate['options'])}" if gate.get("options") else ""
    write(f"  approve: shipyard approve {dep_id}{choices}")
    write(f"  reject:  shipyard reject {dep_id} --comment TEXT")


def _execute(session: Session, req: DeployRequest, **kwargs: Any) -> Outcome:
    """Run ``execute`` on a new event loop; SIGINT and SIGTERM cancel the deployment."""
    import asyncio
    import signal

    from ._deploy import RunControl
    from ._deploy import execute

    control = RunControl()

    async def main() -> Outcome:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, control.on_signal, sig.name)
        return await execute(session, req, control=control, **kwargs)

    # Not asyncio.run(): its clean-up waits without limit for every task and for the threads of
    # the default executor, so one stuck task or a sync python step still running after its
    # timeout would keep `deploy` from ever exiting. Give them two seconds, then go.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=2.0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _detach(state: _State, argv: list[str]) -> NoReturn:
    """Re-run ``deploy`` in a new session that outlives us; print its id once it is recorded."""
    import subprocess

    r, w = os.pipe()
    cmd = [sys.executable, "-m", "shipyard", *argv, "--report-fd", str(w)]
    from ._store import scheme_of

    url = state.session.config.history
    # Beside a history file; a server store has no folder of its own: here.
    log_dir = os.path.dirname(url.removeprefix("sqlite://")) if scheme_of(url) == "sqlite" else "."
    os.makedirs(log_dir, mode=0o700, exist_ok=True)
    with (
        open(os.devnull, "rb") as devnull,
        open(os.path.join(log_dir, "detached.log"), "ab") as log,
    ):
        os.chmod(log.name, 0o600)
        subprocess.Popen(
            cmd, stdin=devnull, stdout=log, stderr=log, pass_fds=(w,), start_new_session=True,
            cwd=os.getcwd(),
        )  # fmt: skip
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read().decode()
    from ._exceptions import ExitCode

    if data.startswith("ID "):
        click.echo(data[3:].strip())
        sys.exit(ExitCode.OK)
    code, _, message = data.partition(" ")
    click.echo(
        message.strip() or "the detached deployment did not start; see detached.log", err=True
    )
    sys.exit(int(code) if code.isdigit() else ExitCode.USAGE_ERROR)


@cli.command()
@click.argument("pipeline")
@click.argument("version")
@env_option
@click.option("--var", "vars_", multiple=True, metavar="K=V", help="A variable for the pipeline.")
@click.option("--detach", is_flag=True, help="Print the id and run in the background.")
@click.option("--no-rollback", is_flag=True, help="No automatic rollback for this run.")
@click.option(
    "--wait-lock", type=float, default=0.0, metavar="SECONDS", help="Wait for a held lock."
)
@click.option("--notify", multiple=True, metavar="URL|NAME:VALUE", help="Add a notification sink.")
@click.option(
    "--secret-file",
    "secret_files",
    multiple=True,
    metavar="PATH",
    help="dotenv file of secrets (mode 0600).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the finished deployment as JSON.")
@ci_option
@click.option(
    "--junit", metavar="PATH",
    help="Write a JUnit XML report (a testsuite per stage, a testcase per step) when it ends.",
)  # fmt: skip
@click.option(
    "--report-json", metavar="PATH",
    help="Write the JSON document of --json to PATH when it ends.",
)  # fmt: skip
@click.option(
    "--exit-zero-when-awaiting", is_flag=True,
    help="Exit 0, not 4, when the deployment stops at an approval gate.",
)  # fmt: skip
@click.option(
    "--wait-approval", type=float, default=None, metavar="SECONDS",
    help="At an approval gate, stay until it is decided and the rest has run (elsewhere).",
)  # fmt: skip
@click.option(
    "--supersede", is_flag=True,
    help="Give up a deployment awaiting approval that holds the lock (recorded superseded).",
)  # fmt: skip
@yes_option
@click.option("--report-fd", type=int, hidden=True)
@pass_state
def deploy(state: _State, pipeline: str, version: str, environment: str, vars_: tuple[str, ...],
           detach: bool, no_rollback: bool, wait_lock: float, notify: tuple[str, ...],
           secret_files: tuple[str, ...], as_json: bool, ci: str | None, junit: str | None,
           report_json: str | None, exit_zero_when_awaiting: bool,
           wait_approval: float | None, supersede: bool, yes: bool,
           report_fd: int | None) -> None:  # fmt: skip
    """Deploy VERSION of PIPELINE to an environment.

    Exits 4 when it stops at an approval gate: `shipyard approve ID` resumes it later, from any
    process that reaches the store."""
    from ._deploy import DeployRequest

    state.options["secret_files"] = secret_files
    state.options["exit_zero_when_awaiting"] = exit_zero_when_awaiting
    state.options["wait_approval"] = wait_approval
    variables = _parse_vars(vars_)
    if detach:
        argv = list(_Group.argv)
        argv.remove("--detach")
        state.session.load()  # report pipelines-file errors here, not in the background
        _detach(state, argv)
    req = DeployRequest(
        pipeline=pipeline, version=version, environment=environment, vars=variables,
        auto_rollback=not no_rollback, wait_lock=wait_lock, notify=list(notify),
        args=list(_Group.argv), yes=yes,
    )  # fmt: skip
    if report_fd is None:
        _before_deploying(state, pipeline, environment, supersede=supersede)
    if report_fd is not None:
        req.args = _without_report_fd(req.args or [])
        _run_reporting(state, req, report_fd, junit=junit, report_json=report_json)
    _run(state, req, as_json=as_json, ci=ci, junit=junit, report_json=report_json)


def _before_deploying(state: _State, pipeline: str, environment: str, *, supersede: bool) -> None:
    """Gates that hold the lock there: expired ones get their default outcome now, and with
    --supersede a waiting one is given up for this deployment."""
    _apply_expired(state, pipeline, environment)
    if supersede:
        gone = state.service.supersede(pipeline, environment, user=state.session.identify("act"))
        if gone is not None:
            click.echo(f"deployment #{gone['id']} ({gone['version']}) superseded: {gone['error']}",
                       err=True)  # fmt: skip


def _apply_expired(state: _State, pipeline: str | None = None,
                   environment: str | None = None) -> int:  # fmt: skip
    """Apply the default outcome of expired gates (and run what follows); the worst exit code."""
    from ._exceptions import ExitCode

    worst = ExitCode.OK
    for x, outcome, req in state.service.expire(pipeline=pipeline, environment=environment):
        click.echo(f"deployment #{x['id']} ({x['pipeline']} {x['version']} to "
                   f"{x['environment']}): expired, {outcome}", err=True)  # fmt: skip
        if req is not None:
            req.args = list(_Group.argv)
            outcome_run = _execute(state.session, req)
            click.echo(f"deployment #{outcome_run.id} {outcome_run.status}", err=True)
            worst = max(worst, outcome_run.exit_code)
    return int(worst)


@cli.command()
@click.argument("pipeline", required=False)
@click.option("-e", "--env", "environment", default=None, help="Only this environment.")
@pass_state
def expire(state: _State, pipeline: str | None, environment: str | None) -> None:
    """Apply the default outcome (on_timeout) of every approval gate whose time is up.

    For a scheduled CI job: a default approve resumes the deployment here, a default reject
    ends it failed (and rolls back if its gate or pipeline says so). Reading commands never do
    this; `deploy` does it for the gates holding its own lock. It also sends the reminders due
    (gates with remind_every) to the pipelines' notification sinks."""
    code = _apply_expired(state, pipeline, environment)
    for x in state.service.remind(pipeline=pipeline, environment=environment):
        click.echo(f"deployment #{x['id']} ({x['pipeline']} {x['version']} to "
                   f"{x['environment']}): still awaiting approval, reminder sent", err=True)  # fmt: skip
    sys.exit(code)


def _without_report_fd(args: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
        elif a == "--report-fd":
            skip = True
        elif not a.startswith("--report-fd="):
            out.append(a)
    return out


def _run_reporting(
    state: _State, req: DeployRequest, fd: int, *, junit: str | None, report_json: str | None
) -> NoReturn:
    """The detached child: report the id (or the early error) through ``fd``, then run; write
    the report files (``--junit``, ``--report-json``) when it ends."""
    from ._ci import finish
    from ._exceptions import ShipyardError

    pipe = os.fdopen(fd, "wb")
    began: list[int] = []

    def on_begin(dep_id: int) -> None:
        began.append(dep_id)
        pipe.write(f"ID {dep_id}\n".encode())
        pipe.close()

    try:
        outcome = _execute(state.session, req, on_begin=on_begin)
    except ShipyardError as exc:
        from ._secrets import mask

        if began:
            finish(state.service, began[0], junit=junit, report_json=report_json)
        if not pipe.closed:
            pipe.write(f"{exc.exit_code} {mask(exc.show())}".encode())
            pipe.close()
        # After the id was reported nobody waits on the pipe: say it in detached.log.
        print(mask(exc.show()), file=sys.stderr)
        sys.exit(exc.exit_code)
    rollback_id = outcome.rollback.id if outcome.rollback is not None else None
    finish(state.service, outcome.id, rollback_id=rollback_id, junit=junit, report_json=report_json)
    sys.exit(outcome.exit_code)


@cli.command()
@click.argument("target", metavar="ID | PIPELINE")
@click.option(
    "-e",
    "--env",
    "environment",
    default=None,
    help="With PIPELINE: roll back its latest deployment here.",
)
@click.option(
    "--wait-lock", type=float, default=0.0, metavar="SECONDS", help="Wait for a held lock."
)
@click.option("--reason", default="", help="Why; recorded.")
@click.option(
    "--to", "to", default=None, metavar="VERSION|ID",
    help="Redeploy this earlier succeeded version (or deployment) instead of the previous one.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the rollback deployment as JSON.")
@yes_option
@ci_option
@pass_state
def rollback(state: _State, target: str, environment: str | None, wait_lock: float, reason: str,
             to: str | None, as_json: bool, yes: bool, ci: str | None) -> None:  # fmt: skip
    """Redeploy the previous successful version (before deployment ID, or the latest one), or
    with --to an earlier one that succeeded there (refused, with the candidates, otherwise)."""
    req, x, goal = state.service.rollback(
        target, environment, wait_lock=wait_lock, reason=reason, args=list(_Group.argv), to=to,
        yes=yes,
    )  # fmt: skip
    click.echo(
        f"rolling back deployment #{x['id']} ({x['version']}) to version {goal['version']} "
        f"(from deployment #{goal['id']})",
        err=as_json,
    )
    _run(state, req, as_json=as_json, ci=ci)


@cli.command()
@click.argument("deployment_id", type=int, metavar="ID")
@click.option(
    "--wait-lock", type=float, default=0.0, metavar="SECONDS", help="Wait for a held lock."
)
@click.option(
    "--from-start", is_flag=True,
    help="Run every stage again (needed once another deployment ran there since ID).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the new deployment as JSON.")
@yes_option
@ci_option
@pass_state
def retry(
    state: _State, deployment_id: int, wait_lock: float, from_start: bool, as_json: bool,
    yes: bool, ci: str | None,
) -> None:  # fmt: skip
    """Run a failed, cancelled or interrupted deployment again from its first unfinished stage.

    Refused (exit 2) once another deployment ran in that pipeline and environment since ID:
    what ID's finished stages did may have been undone. --from-start runs every stage again.
    """
    req = state.service.retry(
        deployment_id, wait_lock=wait_lock, args=list(_Group.argv), from_start=from_start
    )
    req.yes = yes
    _run(state, req, as_json=as_json, ci=ci)


@cli.command()
@click.argument("pipeline")
@click.option("--from", "source", required=True, metavar="ENV", help="Where it succeeded.")
@click.option("--to", "target", required=True, metavar="ENV", help="Where it goes now.")
@click.option("--var", "vars_", multiple=True, metavar="K=V", help="A variable for the pipeline.")
@click.option(
    "--wait-lock", type=float, default=0.0, metavar="SECONDS", help="Wait for a held lock."
)
@click.option("--notify", multiple=True, metavar="URL|NAME:VALUE", help="Add a notification sink.")
@click.option("--json", "as_json", is_flag=True, help="Print the new deployment as JSON.")
@yes_option
@ci_option
@pass_state
def promote(state: _State, pipeline: str, source: str, target: str, vars_: tuple[str, ...],
            wait_lock: float, notify: tuple[str, ...], as_json: bool, yes: bool,
            ci: str | None) -> None:  # fmt: skip
    """Deploy to --to the version of PIPELINE currently succeeded in --from (its latest
    succeeded deployment there); recorded as promoted from that deployment.

    Exits 2 when nothing succeeded there yet, 4 when it stops at an approval gate."""
    req, found = state.service.promote(
        pipeline, source, target, vars=_parse_vars(vars_), wait_lock=wait_lock,
        args=list(_Group.argv), yes=yes, notify=list(notify),
    )  # fmt: skip
    click.echo(
        f"promoting {pipeline} {found['version']} from {source} (deployment #{found['id']}) "
        f"to {target}",
        err=as_json,
    )
    _before_deploying(state, pipeline, target, supersede=False)
    _run(state, req, as_json=as_json, ci=ci)


@cli.command()
@click.argument("deployment_id", type=int, metavar="ID")
@click.option("--comment", default="", help="Why; recorded with the decision.")
@click.option("--choice", default=None, metavar="OPTION", help="One of the gate's options.")
@click.option("--json", "as_json", is_flag=True, help="Print the resumed deployment as JSON.")
@click.option(
    "--detach", is_flag=True,
    help="Decide here, then run the rest in the background; print the id once it resumed.",
)  # fmt: skip
@click.option("--report-fd", type=int, hidden=True)
@ci_option
@pass_state
def approve(state: _State, deployment_id: int, comment: str, choice: str | None, as_json: bool,
            detach: bool, report_fd: int | None, ci: str | None) -> None:  # fmt: skip
    """Approve the gate deployment ID waits at; with enough approvals, resume it here.

    Exits 4 while more approvals are needed, 2 when the approval is not allowed (already
    decided, expired, not an approver, self-approval) or the pipeline changed. The decision
    is recorded with the source SHIPYARD_SOURCE names (default: cli)."""
    from ._exceptions import ExitCode
    from ._exceptions import ShipyardError

    if detach:
        argv = list(_Group.argv)
        argv.remove("--detach")
        state.session.load()
        _detach(state, argv)
    pipe = os.fdopen(report_fd, "wb") if report_fd is not None else None
    try:
        user = state.session.identify("decide")
        decision, req = state.service.approve(
            deployment_id, user=user, comment=comment, choice=choice, source=_source()
        )
    except ShipyardError as exc:
        if pipe is not None:
            from ._secrets import mask

            pipe.write(f"{exc.exit_code} {mask(exc.show())}".encode())
            pipe.close()
            sys.exit(exc.exit_code)
        raise
    if req is None:
        text = (
            f"approval {decision.approvals} of {decision.required} recorded for deployment "
            f"#{deployment_id} ({user}); it waits for {decision.required - decision.approvals} more"
        )
        if pipe is not None:
            pipe.write(f"{int(ExitCode.AWAITING_APPROVAL)} {text}".encode())
            pipe.close()
        click.echo(text)
        sys.exit(ExitCode.AWAITING_APPROVAL)
    click.echo(f"deployment #{deployment_id} approved by {user}; resuming it here")
    req.args = _without_report_fd(list(_Group.argv))
    if pipe is not None:
        pipe.write(f"ID {deployment_id}\n".encode())
        pipe.close()
    _run(state, req, as_json=as_json, ci=ci)


def _source() -> str:
    """Where a decision comes from, for the approvals record: SHIPYARD_SOURCE (a dashboard
    running the CLI says ``web``), else ``cli``."""
    import re

    value = os.environ.get("SHIPYARD_SOURCE", "").strip() or "cli"
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", value):
        raise click.UsageError(
            f"SHIPYARD_SOURCE={value!r} is not a source name: use lower-case letters, digits, "
            "'-' and '_' (at most 32), e.g. SHIPYARD_SOURCE=web"
        )
    return value


@cli.command()
@click.argument("deployment_id", type=int, metavar="ID")
@click.option("--comment", required=True, help="Why; recorded with the decision.")
@ci_option
@pass_state
def reject(state: _State, deployment_id: int, comment: str, ci: str | None) -> None:
    """Reject the gate deployment ID waits at: it ends failed (exit 1), and rolls back if its
    gate's on_reject (or the pipeline's rollback="auto") says so."""
    from ._exceptions import ExitCode

    user = state.session.identify("decide")
    dep, rollback_req = state.service.reject(
        deployment_id, user=user, comment=comment, source=_source()
    )
    click.echo(f"deployment #{deployment_id} {dep['status']}: {dep['error']}")
    if rollback_req is not None:
        rollback_req.args = list(_Group.argv)
        try:
            _run(state, rollback_req, as_json=False, ci=ci)
        except SystemExit:
            pass
    sys.exit(ExitCode.FAILED)


@cli.command()
@click.argument("deployment_id", type=int, metavar="ID")
@click.option("--reason", default="", help="Why; recorded.")
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=10.0,
    metavar="SECONDS",
    help="How long to wait for it to stop.",
)
@pass_state
def cancel(state: _State, deployment_id: int, reason: str, wait_s: float) -> None:
    """Stop a running deployment (also one started by another process or --detach)."""
    from ._exceptions import ExitCode

    service = state.service
    source = _source()
    service.request_cancel(
        deployment_id, user=state.session.identify("act"), reason=reason,
        source="cancel" if source == "cli" else source,
    )  # fmt: skip
    status = service.wait_finished(deployment_id, wait_s)
    if status is not None:
        click.echo(f"deployment #{deployment_id} {status}")
        return
    click.echo(f"cancel requested; deployment #{deployment_id} is still stopping", err=True)
    sys.exit(ExitCode.FAILED)


@cli.command()
@click.argument("pipeline")
@env_option
@click.option("--reason", required=True, help="Why the lock is broken; recorded.")
@pass_state
def unlock(state: _State, pipeline: str, environment: str, reason: str) -> None:
    """Break the lock of PIPELINE in an environment by hand (recorded)."""
    holder = state.service.unlock(
        pipeline, environment, user=state.session.identify("act"), reason=reason
    )
    if holder is None:
        click.echo(f"{pipeline!r} in {environment!r} was not locked; recorded anyway")
    else:
        click.echo(
            f"unlocked {pipeline!r} in {environment!r}; deployment #{holder['deployment_id']} "
            "is now interrupted"
        )


# -- reading the history ---------------------------------------------------------------------------


@cli.command()
@click.argument("deployment_id", type=int, metavar="[ID]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def status(state: _State, deployment_id: int | None, as_json: bool) -> None:
    """Running and recent deployments, with stage i/N of each."""
    service = state.service
    docs = [service.get(deployment_id)] if deployment_id is not None else service.current()
    if as_json:
        _echo_json(docs)
        return
    if not docs:
        click.echo("no deployments yet")
        return
    rows = []
    for d in docs:
        total = d.get("stages_total") or 0
        cur = d.get("current_stage")
        stage = (
            f"{(cur or 0) + 1}/{total}"
            if total and cur is not None
            else (f"-/{total}" if total else "-")
        )
        rows.append([f"#{d['id']}", d["pipeline"], d["version"], d["environment"], d["status"], stage,
                     _when(d["started_at"]), _duration(d)])  # fmt: skip
    _table(rows, ["id", "pipeline", "version", "env", "status", "stage", "started", "took"])


@cli.command()
@click.option("--pipeline", default=None, help="Only this pipeline.")
@click.option("--env", "environment", default=None, help="Only this environment.")
@click.option(
    "-n", "limit", type=click.IntRange(1), default=20, show_default=True, help="How many."
)
@click.option(
    "--status", "statuses", multiple=True, metavar="STATUS",
    help="Only deployments with this status (repeatable); awaiting_approval is the inbox of "
    "what waits on a human.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def history(
    state: _State, pipeline: str | None, environment: str | None, limit: int,
    statuses: tuple[str, ...], as_json: bool,
) -> None:  # fmt: skip
    """Past deployments, newest first."""
    from ._reports import Status
    from ._service import HISTORY_KEYS

    known = {s.value for s in Status} - {"skipped", "waiting"}
    for st in statuses:
        if st not in known:
            raise click.BadParameter(
                f"{st!r} is not a deployment status; one of {', '.join(sorted(known))}",
                param_hint="--status",
            )
    docs = state.service.history(
        pipeline=pipeline, environment=environment, limit=limit, statuses=statuses
    )
    # With one pipeline and environment, the deployment whose version runs there is marked.
    current = state.service.current_id(pipeline, environment) if pipeline and environment else None
    if as_json:
        _echo_json([{**{k: d.get(k) for k in HISTORY_KEYS},
                     **({"current": d["id"] == current} if pipeline and environment else {})}
                    for d in docs])  # fmt: skip
        return
    if not docs:
        click.echo("no deployments yet")
        return

    def note(d: Mapping[str, Any]) -> str:
        parts = ["current"] if d["id"] == current else []
        if d["rollback_of"]:
            parts.append(f"rollback of #{d['rollback_of']}")
        elif d["retry_of"]:
            parts.append(f"retry of #{d['retry_of']}")
        return ", ".join(parts)

    rows = [
        [f"#{d['id']}", d["pipeline"], d["version"], d["environment"], d["status"],
         _when(d["started_at"]), _duration(d), d["user"] or "", note(d)]
        for d in docs
    ]  # fmt: skip
    _table(rows, ["id", "pipeline", "version", "env", "status", "started", "took", "by", "note"])


def _gate_line(gate: Mapping[str, Any]) -> str:
    """A gate for people: what it waits for, or how it was decided."""
    import time

    from ._reports import parse_ts

    who = ", ".join(gate.get("approvers") or []) or "anyone"
    if gate["status"] != "waiting":
        return f"{gate['stage']!r} {gate['status']} at {_when(gate['decided_at'])}"
    left = parse_ts(gate["expires_at"]) - time.time()
    when = (
        f"expired {_ago(-left)} ago; default: {gate['on_timeout']}"
        if left < 0
        else f"expires in {_ago(left)} (then {gate['on_timeout']})"
    )
    return f"{gate['stage']!r} awaits {gate['required']} approval(s) of {who}; {when}"


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _show_analysis(a: dict[str, Any]) -> None:
    """One metric of an analysis step: verdict, counts, and the values measured."""
    import json

    from ._secrets import mask

    counts = ", ".join(f"{v} {k}" for k, v in a["counts"].items() if v) or "no measurement"
    dry = " [dry-run]" if a.get("dry_run") else ""
    click.echo(f"  analysis  {a['step']}: {a['metric']}{dry}  {a['verdict'] or 'not decided'}"
               f"  ({counts})")  # fmt: skip
    values = [m["error"] if m["error"] else json.dumps(m["value"]) for m in a["measurements"][-10:]]
    if values:
        more = len(a["measurements"]) - len(values)
        click.echo(
            mask("            " + (f"... {more} more, " if more else "") + "; ".join(values))
        )


def _show_hosts(hosts: list[dict[str, Any]]) -> None:
    """The host x step matrix of a fleet deployment: a row per host, a column per step."""
    steps: list[str] = []
    cells: dict[str, dict[str, str]] = {}
    for h in hosts:
        step = f"{h['stage']}/{h['step']}"
        if step not in steps:
            steps.append(step)
        code = f" ({h['exit_code']})" if h.get("exit_code") not in (None, 0) else ""
        cells.setdefault(h["host"], {})[step] = f"{h.get('status')}{code}"
    width = max(len(h) for h in cells)
    widths = [max([len(s)] + [len(c.get(s, "-")) for c in cells.values()]) for s in steps]
    click.echo("  hosts     " + " " * width + "  " + "  ".join(
        s.ljust(w) for s, w in zip(steps, widths, strict=True)))  # fmt: skip
    for host, row in cells.items():
        click.echo("            " + host.ljust(width) + "  " + "  ".join(
            row.get(s, "-").ljust(w) for s, w in zip(steps, widths, strict=True)).rstrip())  # fmt: skip


@cli.command()
@click.argument("deployment_id", type=int, metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def show(state: _State, deployment_id: int, as_json: bool) -> None:
    """One deployment: stages, steps, durations, exit codes, errors, who and where."""
    doc = state.service.document(deployment_id)
    if as_json:
        _echo_json(doc)
        return
    from ._reports import Status
    from ._secrets import mask

    click.echo(
        f"deployment #{doc['id']}: {doc['pipeline']} {doc['version']} -> {doc['environment']}  {doc['status']}"
    )
    click.echo(
        f"  started   {_when(doc['started_at'])}   finished {_when(doc['finished_at'])}   took {_duration(doc)}"
    )
    click.echo(
        f"  by        {doc['user']}{' (' + doc['ci_actor'] + ')' if doc.get('ci_actor') else ''} on {doc['host']}"
    )
    click.echo(f"  file      {doc['pipelines_file']}  sha256 {str(doc['file_hash'])[:12]}")
    if doc.get("git_commit"):
        click.echo(f"  commit    {doc['git_commit']}")
    click.echo(f"  shipyard  {doc['shipyard_version']}")
    if doc.get("args"):
        import shlex

        click.echo(mask("  args      shipyard " + shlex.join(doc["args"])))
    if doc.get("vars"):
        click.echo("  vars      " + " ".join(f"{k}={v}" for k, v in doc["vars"].items()))
    if doc["rollback_of"]:
        click.echo(f"  rollback of #{doc['rollback_of']}")
    if doc["retry_of"]:
        click.echo(f"  retry of  #{doc['retry_of']}")
    if doc.get("promoted_from"):
        click.echo(f"  promoted from #{doc['promoted_from']}")
    if doc["error"]:
        click.echo(mask(f"  error     {doc['error']}"))
    if doc.get("gate"):
        click.echo(f"  gate      {_gate_line(doc['gate'])}")
    total = len(doc["stages"])
    for i, s in enumerate(doc["stages"], 1):
        click.echo(f"[{i}/{total}] {s['name']}  {s['status']}  {_duration(s)}")
        for st in s["steps"]:
            code = f"  exit {st['exit_code']}" if st["exit_code"] is not None else ""
            tries = f"  attempts {st['attempts']}" if st["attempts"] and st["attempts"] > 1 else ""
            label = "warning" if st["warning"] else st["status"]
            click.echo(f"  {label:<11} {st['name']}  {_duration(st)}{code}{tries}")
            if st["error"] and st["status"] != Status.SUCCEEDED:
                for line in st["error"].splitlines():
                    click.echo(mask(f"              {line}"))
    for a in doc.get("analysis") or ():
        _show_analysis(a)
    if doc.get("hosts"):
        _show_hosts(doc["hosts"])
    for a in state.service.audit_trail(deployment_id):
        click.echo(
            f"  audit     {_when(a['ts'])} {a['action']} by {a['user']}: {a['reason'] or '-'}"
        )


@cli.command()
@click.argument("deployment_id", type=int, metavar="ID")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the deployment ends.")
@pass_state
def logs(state: _State, deployment_id: int, follow: bool) -> None:
    """Print the log lines of a deployment."""
    from ._console import sanitize
    from ._console import use_color
    from ._reports import format_ts

    raw = use_color(sys.stdout, state.options["color"])
    for r in state.service.logs(deployment_id, follow=follow):
        step = r["step"] or r["stream"]
        line = r["line"] if raw else sanitize(r["line"])
        click.echo(f"{format_ts(r['ts'])[11:23]} [{step}] {line}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def plugins(state: _State, as_json: bool) -> None:
    """Loaded plugins with where they came from, their step types, notifiers and metric
    providers."""
    session = state.session
    session.load(require_file=False)
    rows = session.pm.plugin_rows()
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        version = f" {r['version']}" if r["version"] else ""
        click.echo(f"{r['name']}{version}  ({r['source']})")
        if r["step_types"]:
            click.echo(f"    step types: {', '.join(r['step_types'])}")
        if r["notifiers"]:
            click.echo(f"    notifiers:  {', '.join(r['notifiers'])}")
        if r["metric_providers"]:
            click.echo(f"    providers:  {', '.join(r['metric_providers'])}")
        registering = ("shipyard_register_step_types", "shipyard_register_notifiers",
                       "shipyard_register_metric_providers")  # fmt: skip
        hooks = [h for h in r["hooks"] if h not in registering]
        if hooks:
            click.echo(f"    hooks:      {', '.join(hooks)}")


@cli.group("store")
def store_group() -> None:
    """Migrate a history store, or copy a whole history from one store to another."""


def _store_url(url: str) -> str:
    """A store URL given as an argument: its password masked from now on; a plain path made
    absolute."""
    from ._config import register_store_url

    register_store_url(url)
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


@store_group.command("migrate")
@click.argument("url", metavar="URL")
def store_migrate(url: str) -> None:
    """Create or upgrade the schema of the store at URL (for a DBA: deploys then need no DDL)."""
    from ._secrets import mask_url
    from ._storeops import migrate

    store, applied = migrate(_store_url(url))
    try:
        done = (
            f"applied schema version(s) {', '.join(map(str, applied))}"
            if applied
            else ("already at the current schema; nothing to do")
        )
        click.echo(f"{mask_url(store.url)}: {done}")
    finally:
        store.close()


@store_group.command("copy")
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
def store_copy(src: str, dst: str) -> None:
    """Copy every deployment, stage, step, log line, artifact and audit record of SRC to DST,
    ids kept where free; running it again copies nothing twice."""
    from ._secrets import mask_url
    from ._store import open_store
    from ._storeops import copy_history

    source = open_store(_store_url(src), create=False)
    try:
        target = open_store(_store_url(dst), create=True)
        try:
            r = copy_history(source, target, progress=lambda t: click.echo(t, err=True))
        finally:
            target.close()
    finally:
        source.close()
    renumbered = f", {r.renumbered} under new ids" if r.renumbered else ""
    click.echo(
        f"copied {r.deployments} deployment(s){renumbered}, {r.lines} log line(s) and {r.audit} "
        f"audit record(s) from {mask_url(src)} to {mask_url(dst)}; {r.already_there} were "
        "there already"
    )


@cli.command()
@click.option("--pipeline", default=None, help="Only this pipeline.")
@click.option("--env", "environment", default=None, help="Only this environment.")
@click.option(
    "--since", default="30d", show_default=True, metavar="WHEN",
    help="The window: a duration back from now (30d, 12w, 48h), a date (2026-01-31), or all.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def stats(state: _State, pipeline: str | None, environment: str | None, since: str,
          as_json: bool) -> None:  # fmt: skip
    """Delivery metrics (DORA) from the history: deployment frequency, lead time for changes,
    change failure rate and time to restore, each with its performance band.

    Lead time reads the commit times from the git repository of the pipelines file's folder.
    Definitions and bands: docs/guides/dora.md.
    """
    from ._stats import compute
    from ._stats import render

    doc = compute(
        state.service.read_store(), rootdir=state.session.config.rootdir, pipeline=pipeline,
        environment=environment, since=since,
    )  # fmt: skip
    if as_json:
        _echo_json(doc)
        return
    w = doc["window"]
    if w["first_at"] is None:
        scope = " and ".join(
            f"{k} {v!r}" for k, v in (("pipeline", pipeline), ("environment", environment)) if v
        )
        where = f" of {scope}" if scope else ""
        when = f"since {w['since']}" if w["since"] else "at all"
        click.echo(f"no deployments{where} {when}; nothing to measure (try --since all)")
        return
    for line in render(doc):
        click.echo(line)


def main(argv: list[str] | None = None, prog_name: str = "shipyard") -> None:
    """Entry point of the ``shipyard`` console script."""
    try:
        cli.main(args=argv, prog_name=prog_name)
    except SystemExit as exc:
        _exit_even_if_threads_hang(exc.code)
        raise
    except Exception as exc:  # a bug, or a plugin's: its traceback, with secrets masked
        import traceback

        from ._secrets import mask

        sys.stderr.write(mask("".join(traceback.format_exception(exc))))
        sys.exit(1)


def _exit_even_if_threads_hang(code: Any) -> None:
    """Exit now when worker threads still run (a sync python step past its timeout).

    Python joins such threads at exit, so the command would hang although its deployment is
    finished and recorded. Only the console script does this; in-process callers keep control.
    """
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if not others:
        return
    for t in others:
        t.join(0.5)
    if any(t.is_alive() for t in others):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # the exit must not depend on a broken stream
                pass
        os._exit(code if isinstance(code, int) else (0 if code is None else 1))
