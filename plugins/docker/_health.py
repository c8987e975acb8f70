"""Health checks of ``docker.service``: what ``health_check=`` may be, and waiting for healthy.

A check is an HTTP probe (:class:`shipyard.sdk.HttpProbe`, run from here against the new slot),
a Docker HEALTHCHECK definition (run by the engine inside the container), or nothing (the
image's own HEALTHCHECK, else the container must keep running for :data:`MIN_UPTIME`).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import Final
from typing import TypeAlias

from shipyard.sdk import PipelineDefinitionError
from shipyard.sdk import StepFailed

from ._engine import engine_hostname
from ._logs import exit_text
from ._options import short
from ._options import show_command

if TYPE_CHECKING:
    from shipyard.sdk import HttpProbe
    from shipyard.sdk import StepContext

    from ._engine import Engine
    from ._logs import LogPump

#: Without any health check, a new service container must still run after this many seconds.
MIN_UPTIME: Final = 1.0
#: Seconds between two looks at a starting container's state.
POLL_INTERVAL: Final = 0.2

#: ``health_check=`` once checked: a probe, a Docker HEALTHCHECK (in the API's units), or None.
HealthSpec: TypeAlias = "HttpProbe | dict[str, Any] | None"

_DOCKER_KEYS = ("test", "interval", "timeout", "start_period", "retries")


def health_spec(value: Any) -> HealthSpec:
    """``health_check=`` as a probe or a Docker HEALTHCHECK definition.

    Accepted: a path such as ``"/healthz"``, a :func:`shipyard.health_check` step (its
    ``probe``), an :class:`~shipyard.sdk.HttpProbe`, a ``{"test": ...}`` mapping, or None.
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        return _docker_health(value)
    # Imported here, not at the top: a pipeline without an HTTP check never needs the probe.
    from shipyard.sdk import HttpProbe

    if isinstance(value, str):
        return HttpProbe(value)
    if isinstance(value, HttpProbe):
        return value
    probe = getattr(value, "probe", None)  # a shipyard.health_check(...) step
    if isinstance(probe, HttpProbe):
        return probe
    raise PipelineDefinitionError(
        "docker.service step: health_check must be a path such as '/healthz', "
        "shipyard.health_check(...), or a Docker health check {'test': [...]}, "
        f"got {value!r}"
    )


def _docker_health(value: Mapping[str, Any]) -> dict[str, Any]:
    """A Docker HEALTHCHECK for the API: ``test`` as a list, durations in nanoseconds."""
    test = value.get("test")
    if isinstance(test, str):
        test = ["CMD-SHELL", test]
    if not isinstance(test, Sequence) or not test or not all(isinstance(t, str) for t in test):
        raise PipelineDefinitionError(
            "docker.service step: a Docker health check needs 'test', a command string or "
            f"list such as ['CMD', 'wget', '-q', '-O-', 'http://127.0.0.1:8080/'], got {test!r}"
        )
    spec: dict[str, Any] = {"test": list(test)}
    for key in ("interval", "timeout", "start_period"):
        if key in value:
            seconds = value[key]
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
                raise PipelineDefinitionError(
                    f"docker.service step: health_check {key} must be a positive number of "
                    f"seconds, got {seconds!r}"
                )
            spec[key] = int(seconds * 1_000_000_000)
    if "retries" in value:
        spec["retries"] = int(value["retries"])
    unknown = set(value) - set(_DOCKER_KEYS)
    if unknown:
        raise PipelineDefinitionError(
            f"docker.service step: unknown health_check key {sorted(unknown)[0]!r} "
            "(keys: test, interval, timeout, start_period, retries)"
        )
    return spec


def describe_check(check: HealthSpec, health_timeout: float) -> str:
    """The check, for ``plan``."""
    if check is None:
        return "the image's HEALTHCHECK if any, else still running after 1s"
    if isinstance(check, dict):
        return f"Docker health check {show_command(check['test'])} within {health_timeout:g}s"
    return f"{check.method} {check.url_for('http://127.0.0.1:<slot>')} within {check.deadline:g}s"


class ServiceFailed(Exception):
    """The new container did not become healthy, or the router failed; carries the reason."""

    def __init__(self, message: str, output: list[str], *, router_failed: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.output = output
        self.router_failed = router_failed


class HealthWait:
    """Waits for one started container to be healthy, watching that it keeps running.

    Every failure is a :class:`ServiceFailed` with the container's last lines of output.
    """

    def __init__(
        self, engine: Engine, context: StepContext, cid: str, cname: str, pump: LogPump
    ) -> None:
        self.engine = engine
        self.context = context
        self.cid = cid
        self.cname = cname
        self.pump = pump

    async def until_healthy(self, check: HealthSpec, port: int, health_timeout: float) -> None:
        """Return when the container is healthy by ``check``; raise :class:`ServiceFailed`."""
        if check is None or isinstance(check, dict):
            info = await self.engine.inspect(self.cid)
            if info["State"].get("Health") is None:
                await self._keeps_running()
            else:
                await self._docker_healthy(info, health_timeout)
            return
        await self._probe_healthy(check, port)

    async def _keeps_running(self) -> None:
        """No check at all: the container must at least survive its first second."""
        import asyncio

        self.context.log(
            f"no health check (none given, none in the image): only checking that "
            f"{self.cname} keeps running for {MIN_UPTIME:g}s",
            "shipyard",
        )
        await asyncio.sleep(MIN_UPTIME)
        await self.check_running("while starting")

    async def _docker_healthy(self, info: dict[str, Any], health_timeout: float) -> None:
        """Poll the engine's verdict of the container's HEALTHCHECK until healthy or the deadline."""
        import asyncio

        from shipyard.sdk import tail_text

        loop = asyncio.get_running_loop()
        deadline = loop.time() + health_timeout
        while True:
            state = info["State"]
            if not state.get("Running") or state.get("Restarting"):
                await self.check_running("during its health check")
            health = state.get("Health") or {}
            status = health.get("Status")
            if status == "healthy":
                self.context.log(f"{self.cname} is healthy (Docker health check)", "shipyard")
                return
            if status == "unhealthy" or loop.time() > deadline:
                log = health.get("Log") or []
                out = " ".join(str(log[-1].get("Output", "")).split()) if log else ""
                verdict = (
                    "is unhealthy"
                    if status == "unhealthy"
                    else f"was not healthy within {health_timeout:g}s ({status})"
                )
                raise ServiceFailed(
                    f"{self.cname} {verdict}"
                    + (f"; last health check output: {short(out, 300)}" if out else "")
                    + tail_text(self.pump.tail),
                    [*self.pump.tail, *([out] if out else [])],
                )
            await asyncio.sleep(POLL_INTERVAL)
            info = await self.engine.inspect(self.cid)

    async def _probe_healthy(self, probe: HttpProbe, port: int) -> None:
        """Probe the new slot over HTTP while watching the container, whichever ends first."""
        import asyncio

        from shipyard.sdk import probe_until_healthy
        from shipyard.sdk import tail_text

        scheme = "https" if probe.url.startswith("https:") else "http"
        url = probe.url_for(f"{scheme}://{engine_hostname(self.engine.address)}:{port}")
        probing = asyncio.ensure_future(
            probe_until_healthy(probe, url, log=self.context.log, resolve=self.context.resolve)
        )
        watch = asyncio.ensure_future(self._watch())
        try:
            done, _ = await asyncio.wait([probing, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (probing, watch):
                t.cancel()
            await asyncio.gather(probing, watch, return_exceptions=True)
        if watch in done and not watch.cancelled() and watch.exception() is not None:
            raise watch.exception()  # type: ignore[misc]
        exc = probing.exception() if not probing.cancelled() else None
        if exc is not None:
            if isinstance(exc, StepFailed):
                raise ServiceFailed(
                    f"{self.cname} did not become healthy: {exc.message}"
                    + tail_text(self.pump.tail),
                    [*self.pump.tail, *exc.output],
                )
            raise exc
        # Something else may answer on that port: make sure it is our container that runs.
        await self.check_running("although the port answered")
        self.context.log(f"{self.cname} is healthy", "shipyard")

    async def _watch(self) -> None:
        """Raise as soon as the container stops running (the health check would only time out)."""
        import asyncio

        while True:
            await asyncio.sleep(POLL_INTERVAL)
            await self.check_running("during its health check")

    async def check_running(self, when: str) -> None:
        """Raise :class:`ServiceFailed` saying how the container ended, unless it runs."""
        from shipyard.sdk import tail_text

        state = (await self.engine.inspect(self.cid))["State"]
        if state.get("Running") and not state.get("Restarting"):
            return
        await self.pump.wait(timeout=1.0)  # let the last lines of output arrive
        rc = int(state.get("ExitCode") or 0)
        how = exit_text(rc, bool(state.get("OOMKilled")))
        if state.get("Restarting"):
            how = f"keeps restarting (last {how})"
        raise ServiceFailed(
            f"{self.cname} {how} {when}{tail_text(self.pump.tail)}",
            list(self.pump.tail),
        )
