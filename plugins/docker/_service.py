"""The ``docker.service`` step: replace a long-running container by its new version, blue-green.

One run goes: find the service's running container (:meth:`DockerServiceStep._current`), choose
the slot (:meth:`~DockerServiceStep._choose_port`), start the new container
(:meth:`~DockerServiceStep._start_new`), wait for it to be healthy (:class:`HealthWait`), switch
the router (:meth:`~DockerServiceStep._switch`), retire the old container
(:meth:`~DockerServiceStep._retire`); on a failure before the switch,
:meth:`~DockerServiceStep._undo` removes the new container and restores the old one. With
``strategy=sy.canary(...)`` the switch is :meth:`~DockerServiceStep._canary`: the strategy moves
the weights step by step and, when it fails, puts all traffic back on the old container first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import Literal
from typing import cast

from shipyard.sdk import PipelineDefinitionError
from shipyard.sdk import Step
from shipyard.sdk import StepFailed
from shipyard.sdk import StepResult
from shipyard.sdk import reject_unknown_options

from ._cleanup import SERVICE_ARTIFACT
from ._cleanup import SWITCHED_ARTIFACT
from ._cleanup import SWITCHING_ARTIFACT
from ._engine import Engine
from ._engine import cause
from ._health import HealthWait
from ._health import ServiceFailed
from ._health import describe_check
from ._health import health_spec
from ._labels import base_labels
from ._labels import carries
from ._labels import container_name
from ._labels import name_of
from ._labels import port_of
from ._logs import LogPump
from ._options import PullPolicy
from ._options import check_command
from ._options import check_env
from ._options import check_image
from ._options import check_labels
from ._options import check_pull
from ._options import check_volumes
from ._options import resolve_binds
from ._options import show_command
from ._options import show_env

if TYPE_CHECKING:
    from shipyard.sdk import StepContext

Restart = Literal["no", "on-failure", "unless-stopped", "always"]

_RESTART_POLICIES = ("no", "on-failure", "unless-stopped", "always")
_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*\Z")


# -- definition-time checks -----------------------------------------------------------------------


def _service_name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise PipelineDefinitionError(
            "docker.service step: the service name must be letters, digits, '_', '.' or '-' "
            f"(a container name prefix), got {value!r}"
        )
    return value


def _slots(value: Any) -> tuple[int, int]:
    if (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in value)
        and value[0] != value[1]
    ):
        return int(value[0]), int(value[1])
    raise PipelineDefinitionError(
        f"docker.service step: slots must be two different TCP ports, got {value!r}"
    )


def _is_seconds(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _non_negative(opt: str, value: Any) -> float:
    if not _is_seconds(value) or value < 0:
        raise PipelineDefinitionError(
            f"docker.service step: {opt} must be a number of seconds >= 0, got {value!r}"
        )
    return float(value)


def _positive(opt: str, value: Any) -> float:
    if not _is_seconds(value) or value <= 0:
        raise PipelineDefinitionError(
            f"docker.service step: {opt} must be a positive number of seconds, got {value!r}"
        )
    return float(value)


def _restart(value: Any) -> Restart:
    if value not in _RESTART_POLICIES:
        raise PipelineDefinitionError(
            "docker.service step: restart must be 'no', 'on-failure', 'unless-stopped' or "
            f"'always', got {value!r}"
        )
    return cast("Restart", value)


def _strategy(value: Any, router: Any, step: str) -> Any:
    """``strategy=``: None (blue-green) or ``sy.canary(...)`` (duck-typed: ``shift()``)."""
    if value is None:
        return None
    if not callable(getattr(value, "shift", None)):
        raise PipelineDefinitionError(
            f"docker.service step {step!r}: strategy must be sy.canary(...), got {value!r}"
        )
    if router is None:
        raise PipelineDefinitionError(
            f"docker.service step {step!r}: strategy={value!r} needs router=, a router that "
            "can split traffic by weight (e.g. sy.nginx(PATH))"
        )
    return value


def _describe_router(router: Any) -> str:
    describe = getattr(router, "describe", None)
    return describe() if callable(describe) else repr(router)


# -- one deployment -------------------------------------------------------------------------------


class _Release:
    """One replacement of the service: the container being started and the one it replaces.

    The start, the health check and the router switch fill it in as they go, so that
    :meth:`DockerServiceStep._undo` knows what to undo however far they got.
    """

    def __init__(
        self,
        cname: str,
        port: int,
        old: dict[str, Any] | None,
        *,
        scope: Mapping[str, str],
        labels: dict[str, str],
        env: dict[str, str],
        pull: PullPolicy,
    ) -> None:
        #: The new container's name, ``<service>-<version>``.
        self.cname = cname
        #: The slot it starts on.
        self.port = port
        #: The running container of the service, as the engine lists it; None for a first one.
        self.old = old
        #: The labels telling the service's containers (pipeline, environment, service).
        self.scope = scope
        self.labels = labels
        self.env = env
        #: ``"never"`` once the image was made sure of before the old container stopped.
        self.pull = pull
        #: Whether the old container was stopped (no router): a failure restarts it.
        self.old_stopped = False
        self.cid: str | None = None
        self.pump: LogPump | None = None
        self.switched = False
        #: A canary could not put all traffic back on the old version: keep both running.
        self.uncertain = False


class DockerServiceStep(Step):
    """Replace a long-running service by its new version, blue-green, on one engine.

    The new version starts as ``<service>-<version>`` with host networking, in the slot (port)
    the old one does not use, with ``PORT`` set to it. When it is healthy the router sends the
    traffic there, and the old container is stopped and removed. If it does not become healthy,
    it is removed and the old one keeps serving, the router untouched.

    Without a router nothing can move traffic between ports: the old container is stopped, the
    new one starts on the same port (restarting the old one if the new fails). That is **not**
    zero-downtime.

    :param service: the service's name; containers are ``<service>-<version>``.
    :param image: the image of the new version.
    :param command: the command; the image's default when None.
    :param env: extra environment variables (values may be secrets); ``DEPLOYMENT_*`` and
        ``PORT`` are set.
    :param slots: the two ports the versions alternate between.
    :param health_check: a path (``"/healthz"``) or :func:`shipyard.health_check` probed at the
        new slot; a Docker health check ``{"test": [...], "interval": 1}``; None uses the
        image's own HEALTHCHECK, or else only checks the container keeps running.
    :param router: a router such as :func:`shipyard.nginx`; a plugin implementing
        ``shipyard_router_switch`` drives it.
    :param strategy: None to switch all traffic at once, or :func:`shipyard.canary` to move it
        step by step (the router's plugin must implement ``shipyard_router_weights``).
    :param stop_timeout: seconds the old container gets between SIGTERM and SIGKILL.
    :param drain: seconds between the traffic switch and stopping the old container, for
        requests in flight.
    :param health_timeout: the deadline of a Docker health check (a ``health_check`` step has
        its own ``timeout``).
    :param restart: the container's restart policy.
    """

    kind = "docker.service"

    def __init__(
        self,
        service: str | None = None,
        /,
        image: str | None = None,
        *,
        command: str | Sequence[str] | None = None,
        env: Mapping[str, Any] | None = None,
        slots: Sequence[int] = (8081, 8082),
        health_check: Any = None,
        router: Any = None,
        strategy: Any = None,
        stop_timeout: float = 10,
        drain: float = 2.0,
        health_timeout: float = 60.0,
        pull: PullPolicy = "missing",
        volumes: Mapping[str, str] | Sequence[str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        restart: Restart = "unless-stopped",
        labels: Mapping[str, str] | None = None,
        name: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        **unknown: Any,
    ) -> None:
        reject_unknown_options(self, unknown)
        # docker.service(name="web", image=...) reads naturally: `name` then names the service.
        self.service = _service_name(service if service is not None else name)
        self.image = check_image(image, self.kind)
        self.command = check_command(command, self.kind)
        self.env = check_env(env, self.kind)
        self.slots = _slots(slots)
        self.health_check = health_spec(health_check)
        self.router = router
        self.stop_timeout = _non_negative("stop_timeout", stop_timeout)
        self.drain = _non_negative("drain", drain)
        self.health_timeout = _positive("health_timeout", health_timeout)
        self.restart = _restart(restart)
        self.pull = check_pull(pull, self.kind)
        self.volumes = check_volumes(volumes, self.kind)
        self.workdir = workdir
        self.user = None if user is None else str(user)
        self.labels = check_labels(labels, self.kind)
        step_name = name if name and name != self.service else None
        super().__init__(name=step_name, timeout=timeout, retries=retries)
        self.strategy = _strategy(strategy, router, self.name)

    def default_name(self) -> str:
        return f"docker service {self.service}"

    def describe(self) -> str:
        text = (
            f"start {self.image} as {self.service}-<version> on 127.0.0.1:<slot> "
            f"(slots {self.slots[0]}/{self.slots[1]}, host network, PORT=<slot>, pull={self.pull})"
            f"; check {describe_check(self.health_check, self.health_timeout)}"
        )
        if self.router is not None:
            router = _describe_router(self.router)
            how = (
                f"switch router {router}"
                if self.strategy is None
                else f"move traffic through router {router} by {self.strategy.describe()}"
            )
            text += (
                f"; {how}; after {self.drain:g}s stop the old container "
                f"(stop_timeout {self.stop_timeout:g}s)"
            )
        else:
            text += "; no router: the old container stops first (not zero-downtime)"
        if self.command is not None:
            text += f"; command {show_command(self.command)}"
        if self.env:
            text += f"; env {show_env(self.env)}"
        return text

    def plan_details(self, deployment: Any, rootdir: Any) -> list[str]:
        details = getattr(self.strategy, "plan_details", None)
        return list(details(deployment, rootdir)) if callable(details) else []

    async def run(self, context: StepContext) -> StepResult:
        engine = await Engine.connect()
        try:
            return await self._run(engine, context)
        except (engine.errors.DockerException, OSError) as exc:
            raise engine.explain(exc, f"deploy service {self.service!r}") from None
        finally:
            engine.close()

    # -- the protocol -----------------------------------------------------------------------------

    async def _run(self, engine: Engine, context: StepContext) -> StepResult:
        import json

        d = context.deployment
        scope = {
            "shipyard.service": self.service,
            "shipyard.pipeline": d.pipeline,
            "shipyard.environment": d.environment,
        }
        old = await self._current(engine, context, scope)
        cname = container_name(self.service, d.version)
        if old is not None and name_of(old) == cname:
            return await self._already_running(engine, context, old)
        await self._refuse_foreign(engine, cname, scope)
        port = self._choose_port(port_of(old))
        release = _Release(
            cname,
            port,
            old,
            scope=scope,
            labels={**self.labels, **base_labels(context), **scope, "shipyard.port": str(port)},
            env={**context.deployment_env, **context.resolve(self.env), "PORT": str(port)},
            pull=self.pull,
        )
        # Before anything changes: if shipyard is killed from here on, the next command knows
        # which container was new, which was serving, and (below) whether traffic moved.
        context.record_artifact(SERVICE_ARTIFACT, json.dumps({
            "service": self.service, "container": cname, "labels": release.labels,
            "old": name_of(old) if old is not None else None, "router": self.router is not None,
            "strategy": "canary" if self.strategy is not None and old is not None else None,
            "port": port, "old_port": port_of(old) if old is not None else None,
        }))  # fmt: skip
        if old is not None and self.router is None:
            await self._stop_old_first(engine, context, old, release)
        await self._replace(engine, context, release)
        if old is not None:
            await self._retire_even_if_cancelled(engine, context, old)
        context.log(f"{cname} serves {self.service} on 127.0.0.1:{port}", "shipyard")
        return StepResult()

    async def _current(
        self, engine: Engine, context: StepContext, scope: Mapping[str, str]
    ) -> dict[str, Any] | None:
        """The service's running container, if any; stopped leftovers are removed."""
        filters = {"label": [f"{k}={v}" for k, v in scope.items()]}
        found = await engine.call(engine.api.containers, all=True, filters=filters)
        # The engine filters by label; check again, so nothing outside the scope is touched.
        mine = [c for c in found if carries(c.get("Labels"), scope)]
        running = [c for c in mine if c.get("State") == "running"]
        for c in mine:
            if c.get("State") != "running":
                context.log(f"removing stale container {name_of(c)} ({c.get('State')})", "shipyard")
                await engine.stop_and_remove(c["Id"], None)
        if len(running) > 1:
            names = ", ".join(name_of(c) for c in running)
            raise StepFailed(
                f"service {self.service!r} has {len(running)} running containers ({names}), "
                "probably left by an interrupted deployment; Shipyard cannot tell which one "
                "serves traffic: remove the other one (docker rm -f NAME) and deploy again"
            )
        return running[0] if running else None

    def _choose_port(self, old_port: int | None) -> int:
        """The slot the old container does not use; without a router, the one it uses."""
        if self.router is None:
            return old_port if old_port is not None else self.slots[0]
        return self.slots[1] if old_port == self.slots[0] else self.slots[0]

    async def _stop_old_first(
        self, engine: Engine, context: StepContext, old: dict[str, Any], release: _Release
    ) -> None:
        """No router: the new version needs the old one's port, so the old one stops first."""
        # The old version stops first: pull before that, not during the downtime.
        await engine.ensure_image(self.image, self.pull, context)
        release.pull = "never"
        context.log(
            f"no router: stopping {name_of(old)} first; the service is down until "
            f"{release.cname} is healthy",
            "shipyard",
        )
        await engine.call(engine.api.stop, old["Id"], timeout=round(self.stop_timeout))
        release.old_stopped = True

    async def _replace(self, engine: Engine, context: StepContext, release: _Release) -> None:
        """Start the new version, wait until healthy, switch the router; else undo it all."""
        try:
            pump = await self._start_new(engine, context, release)
            try:
                await self._wait_healthy(
                    engine, context, pump.cid, release.cname, release.port, pump
                )
            finally:
                pump.close()
            if self.router is not None and self.strategy is not None and release.old is not None:
                await self._canary(context, release)
                release.switched = True
            elif self.router is not None:
                context.record_artifact(SWITCHING_ARTIFACT, release.cname)
                await self._switch(context, release.port)
                release.switched = True
            context.record_artifact(SWITCHED_ARTIFACT, release.cname)  # the new one serves
        except BaseException as exc:
            if release.switched or release.uncertain:
                raise
            await self._undo(engine, context, release)
            if isinstance(exc, ServiceFailed):
                raise StepFailed(
                    exc.message + self._aftermath(release.cname, release.old, exc.router_failed),
                    output=exc.output,
                ) from None
            raise
        finally:
            if release.pump is not None:
                release.pump.close()

    async def _start_new(self, engine: Engine, context: StepContext, release: _Release) -> LogPump:
        """Create and start the new container; return the pump following its output."""
        port = release.port
        slot = self.slots.index(port) + 1 if port in self.slots else 0
        context.log(
            f"starting {release.cname} from {self.image} on 127.0.0.1:{port} "
            f"(slot {slot} of {self.slots[0]}/{self.slots[1]}, PORT={port})",
            "shipyard",
        )
        host_config = engine.api.create_host_config(
            network_mode="host",
            binds=resolve_binds(self.volumes, context) or None,
            restart_policy={"Name": self.restart} if self.restart != "no" else None,
        )
        extra: dict[str, Any] = {}
        if isinstance(self.health_check, dict):
            extra["healthcheck"] = self.health_check
        try:
            release.cid = cid = await engine.create(
                self.image, release.pull, context, command=context.resolve(self.command),
                environment=release.env, working_dir=self.workdir, user=self.user,
                labels=release.labels, name=release.cname, host_config=host_config, detach=True,
                **extra,
            )  # fmt: skip
        except engine.errors.APIError as exc:
            if exc.status_code == 409:  # created meanwhile by someone else
                raise self._name_taken(release.cname, release.scope) from None
            raise
        await engine.call(engine.api.start, cid)
        release.pump = pump = LogPump(engine, cid, context, release.cname)
        pump.start()
        return pump

    async def _refuse_foreign(self, engine: Engine, cname: str, scope: Mapping[str, str]) -> None:
        """Fail before touching anything if another container already has the new name."""
        try:
            info = await engine.inspect(cname)
        except engine.errors.NotFound:
            return
        if not carries(info.get("Config", {}).get("Labels"), scope):
            raise self._name_taken(cname, scope)

    def _name_taken(self, cname: str, scope: Mapping[str, str]) -> StepFailed:
        return StepFailed(
            f"a container named {cname!r} already exists and does not belong to service "
            f"{self.service!r} of pipeline {scope['shipyard.pipeline']!r} in "
            f"{scope['shipyard.environment']!r}; Shipyard never touches it: remove or rename it, "
            "or give this service another name"
        )

    def _aftermath(self, cname: str, old: dict[str, Any] | None, router_failed: bool) -> str:
        """The last line of a failure: what was undone, what serves now."""
        text = f"\n  removed {cname}"
        if self.router is not None and not router_failed:
            text += "; the router was not touched"
        if old is not None:
            text += f"; {name_of(old)} " + (
                "keeps serving" if self.router is not None else "was restarted"
            )
        return text

    async def _already_running(
        self, engine: Engine, context: StepContext, current: dict[str, Any]
    ) -> StepResult:
        """The version is deployed already (a retry, a rollback to it): check it, route to it."""
        name = name_of(current)
        port = port_of(current) or self.slots[0]
        context.log(
            f"{name} already runs version {context.deployment.version} on 127.0.0.1:{port}; "
            "checking it instead of starting another",
            "shipyard",
        )
        pump = LogPump(engine, current["Id"], context, name)
        try:
            await self._wait_healthy(engine, context, current["Id"], name, port, pump)
            if self.router is not None:
                await self._switch(context, port)
        except ServiceFailed as exc:
            raise StepFailed(exc.message, output=exc.output) from None
        return StepResult()

    async def _wait_healthy(
        self, engine: Engine, context: StepContext, cid: str, cname: str, port: int, pump: LogPump
    ) -> None:
        """Return when the container is healthy; raise :class:`ServiceFailed` otherwise."""
        waiting = HealthWait(engine, context, cid, cname, pump)
        await waiting.until_healthy(self.health_check, port, self.health_timeout)

    async def _undo(self, engine: Engine, context: StepContext, release: _Release) -> None:
        """The new version failed (or we were cancelled): remove it, restore the old one."""
        cname = release.cname
        try:
            if release.cid is not None:
                await engine.stop_and_remove(release.cid, None)
                context.log(f"removed {cname}", "shipyard")
            else:
                await engine.settle()  # a create cut short by a cancel may still finish
                if await engine.remove_ours(cname, release.labels):
                    context.log(f"removed {cname}", "shipyard")
        except Exception as err:
            context.log(f"could not remove {cname}: {cause(err)}", "shipyard")
        stopped_old = release.old if release.old_stopped else None
        if stopped_old is not None:
            try:
                await engine.call(engine.api.start, stopped_old["Id"])
                context.log(f"restarted {name_of(stopped_old)}", "shipyard")
            except Exception as err:
                context.log(f"could not restart {name_of(stopped_old)}: {cause(err)}", "shipyard")

    async def _retire_even_if_cancelled(
        self, engine: Engine, context: StepContext, old: dict[str, Any]
    ) -> None:
        """The new version serves; the old one goes, even if the deployment is cancelled now."""
        import asyncio

        retire = asyncio.ensure_future(self._retire(engine, context, old))
        try:
            await asyncio.shield(retire)
        except asyncio.CancelledError:
            await retire  # the engine client must outlive it
            raise

    async def _retire(self, engine: Engine, context: StepContext, old: dict[str, Any]) -> None:
        """Drain (with a router), then stop and remove the old container; a failure only warns."""
        import asyncio

        name = name_of(old)
        if self.router is not None and self.drain > 0:
            context.log(f"draining {name} for {self.drain:g}s", "shipyard")
            await asyncio.sleep(self.drain)
        try:
            await engine.stop_and_remove(old["Id"], self.stop_timeout)
            context.log(f"stopped and removed {name}", "shipyard")
        except Exception as exc:
            context.log(
                f"warning: could not remove the old container {name}: {cause(exc)}", "shipyard"
            )

    async def _canary(self, context: StepContext, release: _Release) -> None:
        """Move the traffic to the new container step by step (``strategy=sy.canary``)."""
        assert release.old is not None
        old_port = port_of(release.old)
        if old_port is None:
            raise ServiceFailed(
                f"{name_of(release.old)} carries no shipyard.port label: a canary cannot tell "
                "which port to take the traffic from",
                [],
            )
        try:
            await self.strategy.shift(
                context, router=self.router, service=self.service, old_port=old_port,
                new_port=release.port, old_name=name_of(release.old), new_name=release.cname,
            )  # fmt: skip
        except StepFailed as exc:
            if getattr(exc, "traffic_restored", True) is False:
                release.uncertain = True
                raise StepFailed(
                    f"{exc.message}\n  {release.cname} and {name_of(release.old)} were both left "
                    "running, since either may get traffic: fix the router, send all traffic to "
                    "one of them, then remove the other (docker rm -f NAME)",
                    output=exc.output,
                ) from None
            raise ServiceFailed(exc.message, list(exc.output), router_failed=True) from None

    async def _switch(self, context: StepContext, port: int) -> None:
        """Have the router plugin send the service's traffic to ``port``."""
        import asyncio

        desc = _describe_router(self.router)
        try:
            result = context.pluginmanager.router_switch(self.router, self.service, port, context)
            if result is None:
                raise StepFailed(
                    f"no plugin handles the router {desc} (router=): is the plugin that "
                    "provides it installed and enabled? `shipyard plugins` lists them"
                )
            if not isinstance(result, bool):
                result = await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            text = exc.message if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"
            raise ServiceFailed(
                f"router {desc} could not send {self.service} to 127.0.0.1:{port}: {text}",
                [],
                router_failed=True,
            ) from None
        context.log(f"router {desc}: {self.service} -> 127.0.0.1:{port}", "shipyard")


# Reprs, tracebacks and pickles name the package, as before it was split into modules.
DockerServiceStep.__module__ = "shipyard.plugins.docker"
