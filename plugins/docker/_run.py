"""The ``docker.run`` step: a one-shot container whose exit code decides."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

from shipyard.sdk import PipelineDefinitionError
from shipyard.sdk import Step
from shipyard.sdk import StepFailed
from shipyard.sdk import StepResult
from shipyard.sdk import reject_unknown_options

from ._cleanup import RUN_ARTIFACT
from ._engine import Engine
from ._engine import cause
from ._labels import base_labels
from ._labels import container_name
from ._logs import LogPump
from ._logs import exit_text
from ._options import PullPolicy
from ._options import check_command
from ._options import check_env
from ._options import check_image
from ._options import check_labels
from ._options import check_pull
from ._options import check_volumes
from ._options import resolve_binds
from ._options import short
from ._options import show_command
from ._options import show_env

if TYPE_CHECKING:
    from shipyard.sdk import StepContext


class DockerRunStep(Step):
    """Run a one-shot container; its exit code decides.

    :param image: the image, e.g. ``"migrate:1.4"``.
    :param command: the command (a list, or a string split like a shell would); the image's
        default when None.
    :param env: extra environment variables (values may be secrets); ``DEPLOYMENT_*`` are set.
    :param volumes: ``{"./data": "/data:ro"}`` or ``["./data:/data:ro"]``; relative host paths
        are relative to the pipelines file, a bare name is a named volume.
    :param workdir: the working directory inside the container.
    :param user: ``"uid[:gid]"`` or a user name known to the image.
    :param network: ``"none"`` (default), ``"host"``, or a network of the engine.
    :param pull: ``"missing"`` pulls only an image the engine lacks, ``"always"`` pulls first,
        ``"never"`` fails when the image is missing.
    :param labels: extra container labels.
    """

    kind = "docker.run"

    def __init__(
        self,
        image: str,
        command: str | Sequence[str] | None = None,
        *,
        env: Mapping[str, Any] | None = None,
        volumes: Mapping[str, str] | Sequence[str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        network: str = "none",
        pull: PullPolicy = "missing",
        labels: Mapping[str, str] | None = None,
        name: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        **unknown: Any,
    ) -> None:
        reject_unknown_options(self, unknown)
        self.image = check_image(image, self.kind)
        self.command = check_command(command, self.kind)
        self.env = check_env(env, self.kind)
        self.volumes = check_volumes(volumes, self.kind)
        if workdir is not None and (not isinstance(workdir, str) or not workdir.startswith("/")):
            raise PipelineDefinitionError(
                f"docker.run step: workdir must be an absolute path inside the container, "
                f"got {workdir!r}"
            )
        self.workdir = workdir
        if user is not None and (not isinstance(user, (str, int)) or not str(user)):
            raise PipelineDefinitionError(f"docker.run step: user must be a string, got {user!r}")
        self.user = None if user is None else str(user)
        if not isinstance(network, str) or not network:
            raise PipelineDefinitionError(
                f"docker.run step: network must be 'none', 'host' or a network name, "
                f"got {network!r}"
            )
        self.network = network
        self.pull = check_pull(pull, self.kind)
        self.labels = check_labels(labels, self.kind)
        super().__init__(name=name, timeout=timeout, retries=retries)

    def default_name(self) -> str:
        return short(f"docker run {self.image} {show_command(self.command)}".rstrip())

    def describe(self) -> str:
        text = f"docker run {self.image}"
        if self.command is not None:
            text += f" {show_command(self.command)}"
        extra = [f"network={self.network}", f"pull={self.pull}"]
        if self.env:
            extra.append("env=" + show_env(self.env))
        if self.volumes:
            extra.append("volumes=" + ",".join(self.volumes))
        if self.workdir:
            extra.append(f"workdir={self.workdir}")
        if self.user:
            extra.append(f"user={self.user}")
        return f"{text}  ({'; '.join(extra)})"

    async def run(self, context: StepContext) -> StepResult:
        engine = await Engine.connect()
        try:
            return await self._run(engine, context)
        finally:
            engine.close()

    async def _run(self, engine: Engine, context: StepContext) -> StepResult:
        import asyncio
        import json
        import secrets

        from shipyard.sdk import tail_text

        d = context.deployment
        cname = container_name(
            "shipyard-run", d.pipeline, str(d.id), f"{context.stage_index}.{context.index}",
            secrets.token_hex(3),
        )  # fmt: skip
        env = {**context.deployment_env, **context.process_env, **context.resolve(self.env)}
        labels = {**self.labels, **base_labels(context), "shipyard.step": self.name}
        host_config = engine.api.create_host_config(
            network_mode=self.network, binds=resolve_binds(self.volumes, context) or None
        )
        command = context.resolve(self.command)
        cid: str | None = None
        pump: LogPump | None = None
        cancelled = False
        # Before it exists: if shipyard is killed now, the next command finds and removes it.
        context.record_artifact(RUN_ARTIFACT, json.dumps({"container": cname, "labels": labels}))
        try:
            cid = await engine.create(
                self.image, self.pull, context, command=command, environment=env,
                working_dir=self.workdir, user=self.user, labels=labels, name=cname,
                host_config=host_config, detach=True,
            )  # fmt: skip
            context.log(f"container {cname} ({cid[:12]}) of {self.image}", "shipyard")
            await engine.call(engine.api.start, cid)
            pump = LogPump(engine, cid, context, cname)
            pump.start()
            await pump.wait()  # the output ends when the container exits
            status = await engine.call(engine.api.wait, cid, timeout=None)
            rc = int(status.get("StatusCode", -1))
        except asyncio.CancelledError:
            cancelled = True
            raise
        except StepFailed:
            raise
        except (engine.errors.DockerException, OSError) as exc:
            raise engine.explain(exc, f"run {self.image}") from None
        finally:
            if pump is not None:
                pump.close()
            await self._clean_up(engine, cid, cname, labels, cancelled, context)
        if rc != 0:
            tail = list(pump.tail) if pump is not None else []
            oom = rc == 137 and bool(status.get("Error"))
            raise StepFailed(
                f"container {cname} of {self.image} {exit_text(rc, oom)}{tail_text(tail)}",
                step_exit_code=rc,
                output=tail,
            )
        return StepResult(exit_code=0)

    async def _clean_up(
        self,
        engine: Engine,
        cid: str | None,
        cname: str,
        labels: Mapping[str, str],
        cancelled: bool,
        context: StepContext,
    ) -> None:
        """Remove the container; after a cancel or timeout, stop it gracefully first."""
        try:
            if cid is None:
                # Cancelled while creating: the create may still finish in its thread.
                await engine.settle()
                await engine.remove_ours(cname, labels)
                return
            await engine.stop_and_remove(cid, context.grace if cancelled else None)
        except Exception as exc:
            context.log(f"could not remove container {cname}: {cause(exc)}", "shipyard")
            return
        if cancelled:
            context.log(f"stopped and removed container {cname}", "shipyard")


# Reprs, tracebacks and pickles name the package, as before it was split into modules.
DockerRunStep.__module__ = "shipyard.plugins.docker"
