"""The Python API: :class:`DeploymentManager`."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from ._config import Config
from ._deploy import DeployRequest
from ._deploy import Outcome
from ._deploy import RunControl
from ._deploy import execute
from ._exceptions import DeploymentNotFound
from ._identity import current_user
from ._pipeline import Stage
from ._reports import Status
from ._service import DeploymentService
from ._session import Session


class DeploymentManager:
    """Deploy, watch and roll back pipelines from Python.

    :param pipelines: the pipelines file (``pipelines.py`` in the current directory by default).
    :param history: the history store (path or URL); beside the pipelines file by default.
    :param plugins: extra plugin modules, like ``-p``.

    ``deploy()`` returns the new deployment's id as soon as it is recorded; the deployment runs
    in a background thread. ``wait(id)`` blocks until it ends.
    """

    def __init__(
        self,
        pipelines: str | os.PathLike[str] | None = None,
        history: str | os.PathLike[str] | None = None,
        plugins: Sequence[str] = (),
    ) -> None:
        self.config = Config.resolve(
            file=pipelines, history=os.fspath(history) if history else None, plugins=plugins
        )
        self.session = Session(self.config)
        self.service = DeploymentService(self.session)
        self._runs: dict[int, tuple[threading.Thread, RunControl, Future[Outcome]]] = {}

    # -- running ----------------------------------------------------------------------------------

    def plan(
        self, pipeline: str, version: str, environment: str, vars: Mapping[str, str] | None = None
    ) -> list[Stage]:
        """The stages ``deploy`` would run; changes nothing."""
        return self.service.plan(pipeline, version, environment, vars).stages

    def deploy(
        self,
        pipeline: str,
        version: str,
        environment: str,
        *,
        vars: Mapping[str, str] | None = None,
        wait_lock: float = 0.0,
        rollback: bool = True,
        notify: Sequence[str] = (),
        yes: bool = False,
    ) -> int:
        """Start a deployment in the background and return its id.

        :param yes: meant for a protected environment (as ``--yes``).
        :raises PipelineNotFound, EnvironmentLocked, UsageError, PromotionRefused: before
            anything runs.
        """
        req = DeployRequest(
            pipeline=pipeline, version=version, environment=environment, vars=dict(vars or {}),
            wait_lock=wait_lock, auto_rollback=rollback, notify=list(notify), yes=yes,
        )  # fmt: skip
        return self._start(req)

    def promote(
        self, pipeline: str, source: str, target: str, *, vars: Mapping[str, str] | None = None,
        wait_lock: float = 0.0, yes: bool = False,
    ) -> int:  # fmt: skip
        """Deploy to ``target`` the version currently succeeded in ``source`` (as ``shipyard
        promote``) in the background; return the new id.

        :raises PromotionRefused: nothing succeeded in ``source``.
        """
        req, _ = self.service.promote(
            pipeline, source, target, vars=vars, wait_lock=wait_lock, yes=yes
        )
        return self._start(req)

    def rollback(
        self, deployment_id: int, *, wait_lock: float = 0.0, to: str | None = None,
        yes: bool = False,
    ) -> int:  # fmt: skip
        """Start a rollback of ``deployment_id`` (DESIGN §4; ``to``: an earlier succeeded
        version or deployment id, as ``--to``) and return the new id.

        :raises RollbackRefused, NoPreviousDeployment, DeploymentNotFound: before anything runs.
        """
        req, _, _ = self.service.rollback(deployment_id, wait_lock=wait_lock, to=to, yes=yes)
        return self._start(req)

    def retry(self, deployment_id: int, *, wait_lock: float = 0.0, from_start: bool = False) -> int:
        """Start a new run of a failed, cancelled or interrupted deployment from its first
        unfinished stage (as ``shipyard retry``; ``from_start``: every stage) and return the
        new id."""
        return self._start(
            self.service.retry(deployment_id, wait_lock=wait_lock, from_start=from_start)
        )

    def approve(
        self, deployment_id: int, *, comment: str = "", choice: str | None = None
    ) -> int | None:
        """Approve the gate ``deployment_id`` waits at (as ``shipyard approve``). With enough
        approvals it resumes in the background here: returns its id (the same); ``wait()``
        blocks until it ends or stops at its next gate. None while more approvals are needed.

        :raises ApprovalRefused, PipelineChanged, EnvironmentLocked: nothing was resumed.
        """
        _, req = self.service.approve(
            deployment_id, user=self.session.identify("decide"), comment=comment,
            choice=choice, source="api",
        )  # fmt: skip
        return None if req is None else self._start(req)

    def reject(self, deployment_id: int, *, comment: str) -> int | None:
        """Reject the gate ``deployment_id`` waits at: it ends ``failed``. Returns the id of
        the rollback started in the background when the gate or the pipeline asks for one."""
        _, rollback = self.service.reject(
            deployment_id, user=self.session.identify("decide"), comment=comment, source="api"
        )
        return None if rollback is None else self._start(rollback)

    def _start(self, req: DeployRequest) -> int:
        self.session.load()
        started: Future[int] = Future()
        finished: Future[Outcome] = Future()
        control = RunControl()

        def on_begin(dep_id: int) -> None:
            started.set_result(dep_id)

        def target() -> None:
            try:
                outcome = asyncio.run(
                    execute(self.session, req, control=control, on_begin=on_begin)
                )
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                finished.set_exception(exc)
            else:
                finished.set_result(outcome)

        thread = threading.Thread(
            target=target, name=f"shipyard-deploy-{req.pipeline}", daemon=True
        )
        thread.start()
        dep_id = started.result()
        self._runs[dep_id] = (thread, control, finished)
        return dep_id

    def wait(self, deployment_id: int, timeout: float | None = None) -> dict[str, Any]:
        """Block until the deployment ends; return its document (as ``show --json``)."""
        run = self._runs.get(deployment_id)
        if run is not None:
            thread, _, finished = run
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"deployment {deployment_id} still running after {timeout}s")
            finished.exception()  # errors after the start are recorded in the history
        else:
            if self.service.wait_finished(deployment_id, timeout) is None:
                raise TimeoutError(f"deployment {deployment_id} still running after {timeout}s")
        return self.show(deployment_id)

    def cancel(self, deployment_id: int, reason: str = "") -> None:
        """Stop a running deployment (also one started by another process)."""
        run = self._runs.get(deployment_id)
        if run is not None and run[0].is_alive():
            run[1].cancel(f"cancelled by {current_user()}" + (f": {reason}" if reason else ""))
            return
        self.service.request_cancel(deployment_id, user=current_user(), reason=reason)

    # -- reading ----------------------------------------------------------------------------------

    def status(self, deployment_id: int) -> Status:
        """The deployment's current status."""
        return Status(self.service.status(deployment_id))

    def show(self, deployment_id: int, *, stages: bool = True) -> dict[str, Any]:
        """The deployment's document: the same as ``shipyard show ID --json``."""
        return self.service.document(deployment_id, stages=stages)

    def history(
        self, pipeline: str | None = None, environment: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        """Deployments, newest first (as ``history --json``)."""
        rows = self.service.history(pipeline=pipeline, environment=environment, limit=limit)
        return [dict(r) for r in rows]

    def close(self) -> None:
        """Wait for background deployments and unconfigure plugins."""
        for thread, _, _ in self._runs.values():
            thread.join()
        self.service.close()
        self.session.close()


__all__ = ["DeploymentManager", "DeploymentNotFound"]
DeploymentManager.__module__ = "shipyard"
