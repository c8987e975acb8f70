"""The Python API: :class:`DeploymentManager`."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ._config import Config
from ._deploy import DeployRequest
from ._deploy import Outcome
from ._deploy import RunControl
from ._deploy import execute
from ._exceptions import DeploymentNotFound
from ._history import current_user
from ._pipeline import Deployment
from ._pipeline import Stage
from ._reports import Status
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
        self._runs: dict[int, tuple[threading.Thread, RunControl, Future[Outcome]]] = {}

    # -- running ----------------------------------------------------------------------------------

    def plan(
        self, pipeline: str, version: str, environment: str, vars: Mapping[str, str] | None = None
    ) -> list[Stage]:
        """The stages ``deploy`` would run; changes nothing."""
        pipe = self.session.pipeline(pipeline)
        d = Deployment(0, pipe.name, version, environment, dict(vars or {}))
        return self.session.build(pipe, d)

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
    ) -> int:
        """Start a deployment in the background and return its id.

        :raises PipelineNotFound, EnvironmentLocked, UsageError: before anything runs.
        """
        req = DeployRequest(
            pipeline=pipeline, version=version, environment=environment, vars=dict(vars or {}),
            wait_lock=wait_lock, auto_rollback=rollback, notify=list(notify),
        )  # fmt: skip
        return self._start(req)

    def rollback(self, deployment_id: int, *, wait_lock: float = 0.0) -> int:
        """Start a rollback of ``deployment_id`` (DESIGN §4) and return the new id."""
        store = self.session.open_store()
        try:
            x = store.get(deployment_id)
            target = store.rollback_target(deployment_id)
        finally:
            store.close()
        req = DeployRequest(
            pipeline=x["pipeline"], version=target["version"], environment=x["environment"],
            vars=dict(target.get("vars") or {}), rollback_of=deployment_id, auto_rollback=False,
            wait_lock=wait_lock,
        )  # fmt: skip
        return self._start(req)

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
            self._poll_until_finished(deployment_id, timeout)
        return self.show(deployment_id)

    def _poll_until_finished(self, deployment_id: int, timeout: float | None) -> None:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.status(deployment_id).is_finished:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"deployment {deployment_id} still running after {timeout}s")
            time.sleep(0.1)

    def cancel(self, deployment_id: int, reason: str = "") -> None:
        """Stop a running deployment (also one started by another process)."""
        run = self._runs.get(deployment_id)
        if run is not None and run[0].is_alive():
            run[1].cancel(f"cancelled by {current_user()}" + (f": {reason}" if reason else ""))
            return
        store = self.session.open_store()
        try:
            store.request_cancel(deployment_id, user=current_user(), reason=reason)
        finally:
            store.close()

    # -- reading ----------------------------------------------------------------------------------

    def status(self, deployment_id: int) -> Status:
        """The deployment's current status."""
        return Status(self.show(deployment_id, stages=False)["status"])

    def show(self, deployment_id: int, *, stages: bool = True) -> dict[str, Any]:
        """The deployment's document: the same as ``shipyard show ID --json``."""
        store = self.session.open_store(create=Path(self.config.history).exists())
        try:
            return store.document(deployment_id, stages=stages)
        finally:
            store.close()

    def history(
        self, pipeline: str | None = None, environment: str | None = None, limit: int = 20
    ) -> list[dict[str, Any]]:
        """Deployments, newest first (as ``history --json``)."""
        if not Path(self.config.history).exists():
            return []
        store = self.session.open_store()
        try:
            return store.deployments(pipeline=pipeline, environment=environment, limit=limit)
        finally:
            store.close()

    def close(self) -> None:
        """Wait for background deployments and unconfigure plugins."""
        for thread, _, _ in self._runs.values():
            thread.join()
        self.session.close()


__all__ = ["DeploymentManager", "DeploymentNotFound"]
DeploymentManager.__module__ = "shipyard"
