"""The run protocol: stages in order, steps one after another or in parallel, on asyncio.

Every observable thing the runner does is an event on the :class:`~shipyard._events.EventBus`;
it writes nothing itself.
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from collections.abc import Iterable
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import Protocol

from ._events import DeploymentFinished
from ._events import DeploymentStarted
from ._events import Event
from ._events import EventBus
from ._events import LogLine
from ._events import StageFinished
from ._events import StageStarted
from ._events import StepFinished
from ._events import StepOutput
from ._events import StepStarted
from ._exceptions import Skipped
from ._exceptions import StepFailed
from ._reports import Status
from ._reports import StepResult
from ._reports import utcnow
from ._secrets import SecretValues
from ._secrets import mask

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from ._pipeline import Deployment
    from ._pipeline import Stage
    from ._pipeline import Step
    from ._plugins import ShipyardPluginManager
    from ._store import HistoryStore

#: Seconds between SIGTERM and SIGKILL when a step's processes are stopped.
DEFAULT_GRACE = 3.0


class Control(Protocol):
    """What the runner reads of whoever may cancel it: why it was cancelled, how the
    deployment then ends, and the task a cancel stops (cleared once the run is over)."""

    reason: str | None
    status: Status
    task: asyncio.Task[Any] | None


class StepContext:
    """What a step sees while it runs: the deployment, a logger, secrets, its environment."""

    def __init__(
        self,
        runner: Runner,
        deployment: Deployment,
        stage: Stage,
        stage_index: int,
        index: int,
        step: Step,
    ) -> None:
        self._runner = runner
        #: The deployment this step belongs to.
        self.deployment = deployment
        self.stage = stage
        self.stage_index = stage_index
        self.index = index
        self.step = step
        #: 1 for the first attempt, 2 for the first retry, ...
        self.attempt = 1
        #: The pipelines file's directory: commands run here unless told otherwise.
        self.rootdir: Path = runner.rootdir
        #: Seconds between SIGTERM and SIGKILL when stopping processes.
        self.grace: float = runner.grace
        #: The plugin manager, for steps that call hooks themselves (``docker.service`` routers).
        self.pluginmanager: ShipyardPluginManager = runner.pm
        #: Variables for every process this step starts, besides ``DEPLOYMENT_*`` and before the
        #: step's own ``env=``: plugins add to it before the step runs (tracing sets
        #: ``TRACEPARENT`` from a ``shipyard_step_call`` wrapper, per attempt). :meth:`environ`
        #: and :meth:`environb` include it; a step that starts processes elsewhere (a one-shot
        #: container, a Job's pod) passes it too.
        self.process_env: dict[str, str] = {}

    @property
    def deployment_env(self) -> dict[str, str]:
        """The ``DEPLOYMENT_*`` variables every process of this step receives."""
        d = self.deployment
        return {
            "DEPLOYMENT_ID": str(d.id),
            "DEPLOYMENT_VERSION": d.version,
            "DEPLOYMENT_ENVIRONMENT": d.environment,
            "DEPLOYMENT_PIPELINE": d.pipeline,
            "DEPLOYMENT_STAGE": self.stage.name,
        }

    def environ(self, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
        """The environment for a child process: ours, ``DEPLOYMENT_*``, then ``extra`` resolved."""
        env = dict(os.environ)
        env.update(self.deployment_env)
        if self._runner.process_tag:
            env["SHIPYARD_DEPLOYMENT_TAG"] = self._runner.process_tag
        if self.process_env:
            env.update(self.process_env)
        if extra:
            env.update({str(k): str(v) for k, v in self.resolve(dict(extra)).items()})
        return env

    def environb(self, extra: Mapping[str, Any] | None = None) -> dict[bytes, bytes]:
        """:meth:`environ` as bytes, for ``subprocess``: it skips encoding the inherited
        environment once per process, which costs more than the rest of a quick step's set-up."""
        # environb's own copy re-encodes every item; its backing dict already holds bytes.
        env = dict(getattr(os.environb, "_data", None) or os.environb)
        for k, v in self.deployment_env.items():
            env[os.fsencode(k)] = os.fsencode(v)
        if self._runner.process_tag:
            env[b"SHIPYARD_DEPLOYMENT_TAG"] = os.fsencode(self._runner.process_tag)
        for k, v in self.process_env.items():
            env[os.fsencode(k)] = os.fsencode(v)
        if extra:
            for k, v in self.resolve(dict(extra)).items():
                env[os.fsencode(str(k))] = os.fsencode(str(v))
        return env

    def resolve(self, value: Any) -> Any:
        """``value`` with secret placeholders replaced by the real secrets (only for the step)."""
        return self._runner.secrets.resolve(value)

    def captured_output(self) -> AbstractContextManager[object]:
        """A block in which what this step's code writes to ``sys.stdout`` and ``sys.stderr``
        (``print()``, a logging handler on them, threads it starts) is this step's output:
        logged line by line like a command's, masked, and recorded. For steps that run code in
        the ``shipyard`` process, as ``python`` steps do; enter it on the event loop."""
        from ._capture import capturing

        return capturing(self)

    def record_artifact(self, name: str, content: str) -> bool:
        """Keep ``content`` (text) in the history as this step's artifact ``name``, for a later
        rollback to find with :meth:`restored_artifact`; a Kubernetes step keeps the manifests
        it rendered. False (nothing kept) when it holds a secret: a masked copy could not be
        applied again, and the history never holds a secret. Outside a recorded deployment
        (a test's runner with no history) there is nowhere to keep it: True, nothing done."""
        store = self._runner.store
        if mask(content) != content:
            return False
        if store is None or self.deployment.id <= 0:
            return True
        store.record_artifact(self.deployment.id, self.stage_index, self.index, name, content)
        return True

    def record_measurement(
        self, metric: str, n: int, value: Any, outcome: str, *, error: str | None = None,
        dry_run: bool = False, ts: str | None = None, warnings: Iterable[str] = (),
    ) -> None:  # fmt: skip
        """Keep one measurement of an analysis (metric ``metric``, the ``n``-th) in the history's
        measurements table: ``value`` as JSON text (masked; the caller keeps it under 4 KiB),
        ``outcome`` one of ``successful``, ``failed``, ``inconclusive``, ``error``; ``warnings``
        what the provider warned of. Nothing is kept outside a recorded deployment."""
        import json

        store = self._runner.store
        if store is None or self.deployment.id <= 0:
            return
        text = None if value is None else mask(json.dumps(value))
        warned = list(warnings)
        store.record_measurement(
            self.deployment.id, self.stage_index, self.index,
            {"metric": metric, "n": n, "ts": ts or utcnow(), "value": text, "outcome": outcome,
             "error": mask(error) if error else None, "dry_run": dry_run,
             "warnings": json.dumps([mask(w) for w in warned]) if warned else None},
        )  # fmt: skip

    def emit(self, event_type: type[Event], **fields: Any) -> None:
        """Send an event of this step (``sdk.AnalysisStarted``, ...) to the history, the console,
        the sinks and the plugins' hooks; the deployment, stage and step are filled in."""
        where: dict[str, Any] = {"stage": self.stage.name, "stage_index": self.stage_index,
                                 "index": self.index, "step": self.step.name}  # fmt: skip
        self._runner.bus.emit(event_type(deployment=self.deployment, **where, **fields))

    def restored_artifact(self, name: str) -> str | None:
        """In a rollback, the artifact ``name`` that the step of the same stage and name kept in
        the deployment being restored (:attr:`Deployment.restores`); else None."""
        store, restores = self._runner.store, self.deployment.restores
        if store is None or restores is None:
            return None
        for row in reversed(store.artifacts(restores)):
            if (
                row["name"] == name
                and row["stage"] == self.stage.name
                and row["step"] == self.step.name
            ):
                return row["content"]
        return None

    def log(self, text: str, stream: str = "stdout") -> None:
        """Record and show one line of output (masked)."""
        self.log_lines([text], stream)

    def log_lines(self, texts: Iterable[str], stream: str = "stdout") -> None:
        """Record and show several lines at once: one event, one history batch."""
        now = time.time()
        lines = [LogLine(now, stream, mask(t)) for t in texts]
        if lines:
            self._runner.bus.emit(
                StepOutput(
                    deployment=self.deployment,
                    stage_index=self.stage_index,
                    index=self.index,
                    step=self.step,
                    lines=lines,
                )
            )


def describe_exception(exc: BaseException, rootdir: Path | None = None) -> str:
    """``Type: message (file:line)`` pointing at the innermost frame of the user's code."""
    where = ""
    tb = exc.__traceback__
    for frame, lineno in traceback.walk_tb(tb):
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] not in ("shipyard", "asyncio", "concurrent", "threading"):
            where = f" ({frame.f_code.co_filename}:{lineno} in {frame.f_code.co_name})"
    return f"{type(exc).__name__}: {exc}{where}"


class Runner:
    """Runs the stages of one deployment, emitting events on ``bus``."""

    def __init__(
        self,
        *,
        pluginmanager: ShipyardPluginManager,
        bus: EventBus,
        secrets: SecretValues | None = None,
        rootdir: Path | None = None,
        grace: float = DEFAULT_GRACE,
        retry_backoff: float | None = None,
        control: Control | None = None,
        process_tag: str | None = None,
        store: HistoryStore | None = None,
    ) -> None:
        #: Where steps' artifacts are kept and found again (None: nowhere, e.g. in tests).
        self.store = store
        #: ``SHIPYARD_DEPLOYMENT_TAG`` of every step process: how the command that finds this
        #: process dead finds what it left running (see ``shipyard._liveness.stop_orphans``).
        self.process_tag = process_tag
        #: Says why the run was cancelled (a :class:`~shipyard._deploy.RunControl`).
        self.control = control
        self.result: tuple[Status, str | None] | None = None
        self.pm = pluginmanager
        self.bus = bus
        self.secrets = secrets or SecretValues()
        self.rootdir = rootdir or Path.cwd()
        self.grace = grace
        if retry_backoff is None:
            retry_backoff = float(os.environ.get("SHIPYARD_RETRY_BACKOFF", "1.0"))
        self.retry_backoff = retry_backoff

    async def run(
        self, deployment: Deployment, stages: list[Stage], *, start_stage: int = 0,
        note: str | None = None, resumed: bool = False,
    ) -> tuple[Status, str | None]:  # fmt: skip
        """Run the deployment; return its final status and error. Never raises for step failures.

        A cancellation of the calling task (Ctrl-C, SIGTERM, ``shipyard cancel``) stops the
        running steps and ends the deployment ``cancelled``.
        """
        started = utcnow()
        self.bus.emit(
            DeploymentStarted(
                deployment=deployment,
                stages=stages,
                start_stage=start_stage,
                note=note,
                resumed=resumed,
            )
        )
        status, error = Status.SUCCEEDED, None
        warnings: list[str] = []
        total = len(stages)
        try:
            for si in range(start_stage, total):
                stage = stages[si]
                if len(stage.steps) == 1 and stage.steps[0].kind == "approval":
                    # A gate: the deployment stops here, recorded as awaiting a decision.
                    self._suspend(deployment, si, stage)
                    return Status.AWAITING_APPROVAL, None
                self.bus.emit(
                    StageStarted(deployment=deployment, index=si, total=total, stage=stage)
                )
                results = await self._run_stage(deployment, stage, si)
                gated = [r.gate for _, r in results if r.status is Status.WAITING and r.gate]
                if gated:
                    # A step stopped at a gate (the last of its stage): suspended like one.
                    self._suspend(deployment, si, stage, gated[0])
                    return Status.AWAITING_APPROVAL, None
                failed = [(st, r) for st, r in results if r.status is Status.FAILED]
                stage_status = Status.SUCCEEDED
                if failed and not stage.continue_on_failure:
                    stage_status = Status.FAILED
                elif any(r.status is Status.CANCELLED for _, r in results):
                    stage_status = Status.CANCELLED
                self.bus.emit(
                    StageFinished(deployment=deployment, index=si, stage=stage, status=stage_status)
                )
                if failed and not stage.continue_on_failure:
                    st, r = failed[0]
                    status = Status.FAILED
                    error = f"step {st.name!r} of stage {stage.name!r} failed: {r.error}"
                    break
                warnings += [f"{st.name!r} ({r.error})" for st, r in failed]
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            status = self.control.status if self.control else Status.CANCELLED
            error = (self.control.reason if self.control else None) or "cancelled"
        if self.control is not None:
            # Done: a cancel from now on (a heartbeat racing the end) has nothing to stop.
            self.control.task = None
        if status is Status.SUCCEEDED and warnings:
            error = "succeeded with failed steps in continue_on_failure stages: " + ", ".join(
                warnings
            )
        error = mask(error) if error else None
        self.bus.emit(
            DeploymentFinished(
                deployment=deployment, status=status, error=error, started_at=started
            )
        )
        #: How it ended, as recorded: kept, for a caller whose task a late cancel marked
        #: cancelled after the end (asyncio cancels a task whose coroutine returns while a
        #: cancel request is pending).
        self.result = (status, error)
        return status, error

    def _suspend(self, deployment: Deployment, si: int, stage: Stage, gate: Any = None) -> None:
        from ._events import DeploymentSuspended
        from ._reports import format_ts

        gate = gate if gate is not None else stage.steps[0]
        now = time.time()
        if self.control is not None:
            self.control.task = None  # nothing runs from now on: a cancel has nothing to stop
        self.bus.emit(
            DeploymentSuspended(
                deployment=deployment, index=si, stage=stage, gate=gate,
                requested_at=format_ts(now), expires_at=format_ts(now + gate.gate_timeout),
            )
        )  # fmt: skip

    async def _run_stage(
        self, deployment: Deployment, stage: Stage, si: int
    ) -> list[tuple[Step, StepResult]]:
        results: list[tuple[Step, StepResult]] = []
        if not stage.parallel:
            for i, step in enumerate(stage.steps):
                r = await self._run_step(deployment, stage, si, i, step)
                results.append((step, r))
                if r.status is Status.FAILED and not stage.continue_on_failure:
                    break
            return results
        tasks = [
            asyncio.ensure_future(self._run_step(deployment, stage, si, i, step))
            for i, step in enumerate(stage.steps)
        ]
        try:
            if stage.continue_on_failure:
                await asyncio.wait(tasks)
            else:
                pending: set[asyncio.Future[StepResult]] = set(tasks)
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    if any(
                        not t.cancelled() and t.exception() is None
                        and t.result().status is Status.FAILED
                        for t in done
                    ):  # fmt: skip
                        for t in pending:
                            t.cancel()
                        await asyncio.gather(*pending, return_exceptions=True)
                        break
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for step, t in zip(stage.steps, tasks, strict=True):
            if t.cancelled():
                results.append((step, StepResult(Status.CANCELLED, error="cancelled")))
            elif t.exception() is not None:
                results.append((step, StepResult.failed(describe_exception(t.exception()))))  # type: ignore[arg-type]
            else:
                results.append((step, t.result()))
        return results

    async def _run_step(
        self, deployment: Deployment, stage: Stage, si: int, i: int, step: Step
    ) -> StepResult:
        ctx = StepContext(self, deployment, stage, si, i, step)
        started = utcnow()
        self.bus.emit(
            StepStarted(
                deployment=deployment, stage=stage, stage_index=si, index=i, step=step, ts=started
            )
        )
        result: StepResult | None = None
        try:
            if step.retries:
                result = await self._with_retries(step, ctx)
            else:
                result = await self._attempt(step, ctx)
        except asyncio.CancelledError:
            result = StepResult(Status.CANCELLED, error="cancelled", attempts=ctx.attempt)
            raise
        finally:
            if result is None:
                result = StepResult.failed("the step was interrupted by an internal error")
            result.started_at = started
            result.finished_at = finished = utcnow()
            if result.status is Status.FAILED and stage.continue_on_failure:
                result.warning = True
            if result.error:
                result.error = mask(result.error)
            result.output_tail = [mask(t) for t in result.output_tail]
            self.bus.emit(
                StepFinished(
                    deployment=deployment, stage=stage, stage_index=si, index=i, step=step,
                    result=result, ts=finished,
                )
            )  # fmt: skip
        return result

    async def _attempt(self, step: Step, ctx: StepContext) -> StepResult:
        scope = None
        # Any, not StepResult: a third-party executor may return anything at all.
        result: Any
        try:
            if step.timeout is not None:
                async with asyncio.timeout(step.timeout) as scope:
                    result = await self.pm.step_call(step, ctx)
            else:
                result = await self.pm.step_call(step, ctx)
        except TimeoutError as exc:
            if scope is not None and scope.expired():
                result = StepResult.failed(f"timed out after {step.timeout:g}s")
            else:
                result = StepResult.failed(describe_exception(exc))
        except Skipped as exc:
            result = StepResult(Status.SKIPPED, error=exc.reason)
        except StepFailed as exc:
            result = StepResult.failed(
                exc.message, exit_code=exc.step_exit_code, output_tail=exc.output
            )
        except (Exception, SystemExit) as exc:  # sys.exit() in a step fails the step, not us
            result = StepResult.failed(describe_exception(exc))
        checked = (
            result
            if isinstance(result, StepResult)
            else StepResult.failed(f"step type {step.kind!r} returned {result!r}, not a StepResult")
        )
        checked.attempts = ctx.attempt
        return checked

    async def _with_retries(self, step: Step, ctx: StepContext) -> StepResult:
        import tenacity

        def before_sleep(state: tenacity.RetryCallState) -> None:
            r = state.outcome.result() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0
            ctx.log(
                f"attempt {state.attempt_number} of {step.retries + 1} failed: "
                f"{r.error if r else '?'}; retrying in {delay:.2f}s",
                "shipyard",
            )
            ctx.attempt = state.attempt_number + 1

        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(step.retries + 1),
            wait=tenacity.wait_exponential(
                multiplier=self.retry_backoff, max=60 * self.retry_backoff
            )
            + tenacity.wait_random(0, self.retry_backoff / 4),
            retry=tenacity.retry_if_result(lambda r: r.status is Status.FAILED),
            before_sleep=before_sleep,
            retry_error_callback=lambda state: state.outcome.result(),  # type: ignore[union-attr]
            reraise=True,
        )
        result: StepResult = await retrying(self._attempt, step, ctx)
        return result


StepContext.__module__ = "shipyard"
