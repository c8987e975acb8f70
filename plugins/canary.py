"""Weighted traffic: ``sy.route`` steps and the ``sy.canary`` strategy of ``docker.service``.

::

    router = sy.nginx("/etc/nginx/shipyard")
    sy.route(router, "web", {8081: 90, 8082: 10})           # a step: 90% / 10%
    sy.docker.service("web", image=f"web:{d.version}", router=router,
                      strategy=sy.canary(steps=[10, 50, 100], analysis=sy.analysis(...)))

A router plugin splits the traffic (``shipyard_router_weights``; the built-in nginx router writes
weighted ``server`` lines). Before and after every change the step records the artifact
``route:<service>``: the weights asked for (``weights``), whether the change is done (``state``)
and ``settle``, the weights a repair must put back if the deployment is killed right now. For a
canary that is 100% on the old version until the move to 100% is done; for a ``route`` step,
the weights it started from until its change is done. The router plugin restores ``settle``
(``shipyard_cleanup_interrupted``) and ``docker.service`` removes the container that does not
serve, so a killed canary leaves the traffic on one known version.

A canary runs in the ``docker.service`` step: the new container starts beside the old one (the
other slot) and is health-checked; then, for each step, the weights move, ``pause`` seconds
pass, and the ``analysis`` runs in the step's context. A failed analysis (or any failure, or
Ctrl-C) puts 100% back on the old version at once and the new container is removed. At 100%
the old container is retired as after a blue-green switch. A rollback moves all traffic at once:
analysing the version you are going back to would only delay the fix.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

from shipyard import sdk

if TYPE_CHECKING:
    from pathlib import Path

#: The step artifact holding a service's weights: ``route:<service>``.
ROUTE_ARTIFACT: Final = "route"


# -- weights ----------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_weights(value: Any, where: str) -> dict[int, int]:
    """``value`` (``{port: percent}`` or ``[(port, percent), ...]``) as a checked dict.

    :raises PipelineDefinitionError: naming ``where`` and saying what to write instead.
    """
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in value
    ):
        pairs = [tuple(p) for p in value]
    else:
        raise sdk.PipelineDefinitionError(
            f"{where}: weights must be {{port: percent}} or a list of (port, percent), "
            f"got {value!r}"
        )
    if not pairs:
        raise sdk.PipelineDefinitionError(f"{where}: weights name no port; give {{port: 100}}")
    weights: dict[int, int] = {}
    for port, percent in pairs:
        if not _is_int(port) or not 0 < port < 65536:
            raise sdk.PipelineDefinitionError(
                f"{where}: unknown port {port!r} in the weights; ports are the services' host "
                "ports, whole numbers from 1 to 65535"
            )
        if port in weights:
            raise sdk.PipelineDefinitionError(f"{where}: port {port} is given twice")
        if not _is_int(percent) or not 0 <= percent <= 100:
            raise sdk.PipelineDefinitionError(
                f"{where}: the weight of port {port} must be a whole percent from 0 to 100, "
                f"got {percent!r}"
            )
        weights[port] = percent
    total = sum(weights.values())
    if total != 100:
        raise sdk.PipelineDefinitionError(
            f"{where}: the weights must sum to 100, got {total} ({show_weights(weights)})"
        )
    return weights


def show_weights(weights: Mapping[int, int]) -> str:
    """``8081 90%, 8082 10%``: the ports and their percents."""
    return ", ".join(f"{port} {percent}%" for port, percent in weights.items())


def _describe(router: Any) -> str:
    describe = getattr(router, "describe", None)
    return describe() if callable(describe) else repr(router)


def _record(
    context: sdk.StepContext,
    service: str,
    weights: Mapping[int, int],
    settle: Mapping[int, int] | None,
    state: str,
) -> None:
    context.record_artifact(
        f"{ROUTE_ARTIFACT}:{service}",
        json.dumps({
            "service": service, "state": state,
            "weights": {str(p): w for p, w in weights.items()},
            "settle": {str(p): w for p, w in settle.items()} if settle is not None else None,
        }),
    )  # fmt: skip


async def change_weights(
    context: sdk.StepContext,
    router: Any,
    service: str,
    weights: Mapping[int, int],
    *,
    settle: Mapping[int, int] | None,
    settle_after: Mapping[int, int] | None = None,
) -> None:
    """Have the router plugin split ``service`` by ``weights``, recording it before and after.

    :param settle: what a repair restores if the deployment is killed during the change.
    :param settle_after: what it restores once the change is done (``weights`` by default).
    :raises StepFailed: no plugin handles ``router``, or the change failed (the router put
        its previous state back).
    """
    import asyncio

    _record(context, service, weights, settle, "changing")
    desc = _describe(router)
    try:
        result = context.pluginmanager.router_weights(router, service, dict(weights), context)
        if result is None:
            raise sdk.StepFailed(
                f"no plugin handles weights for the router {desc} (router=): is the plugin "
                "that provides it installed and enabled, and does it support weights? "
                "`shipyard plugins` lists them"
            )
        if not isinstance(result, bool):
            await result
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        text = exc.message if isinstance(exc, sdk.StepFailed) else f"{type(exc).__name__}: {exc}"
        raise sdk.StepFailed(
            f"router {desc} could not split {service} as {show_weights(weights)}: {text}"
        ) from None
    _record(context, service, weights, weights if settle_after is None else settle_after, "set")


# -- sy.route ---------------------------------------------------------------------------------------


class RouteStep(sdk.Step):
    """Split a service's traffic between host ports by percent, through a router.

    :param router: a router whose plugin implements ``shipyard_router_weights``
        (:func:`shipyard.nginx`).
    :param service: the service's name (nginx: the upstream ``shipyard_<service>``).
    :param weights: ``{port: percent}`` or a list of ``(port, percent)``; whole percents
        summing to 100; a port at 0 gets no new request.
    """

    kind = "route"

    def __init__(self, router: Any, service: Any, weights: Any, *,
                 name: str | None = None, timeout: float | None = None, retries: int = 0,
                 **unknown: Any) -> None:  # fmt: skip
        sdk.reject_unknown_options(self, unknown)
        if not isinstance(service, str) or not service:
            raise sdk.PipelineDefinitionError(
                f"route step: the service must be a name (as given to docker.service), "
                f"got {service!r}"
            )
        self.service = service
        super().__init__(name=name, timeout=timeout, retries=retries)
        where = f"route step {self.name!r}"
        if router is None:
            raise sdk.PipelineDefinitionError(
                f"{where}: router is required, e.g. sy.route(sy.nginx(PATH), {service!r}, "
                "{8081: 90, 8082: 10})"
            )
        self.router = router
        self.weights = check_weights(weights, where)

    def default_name(self) -> str:
        return f"route {self.service}"

    def describe(self) -> str:
        return f"route {self.service} via {_describe(self.router)}: {show_weights(self.weights)}"

    async def run(self, context: sdk.StepContext) -> sdk.StepResult:
        current = getattr(self.router, "current_weights", None)
        before = current(self.service) if callable(current) else None
        await change_weights(context, self.router, self.service, self.weights, settle=before)
        context.log(f"traffic of {self.service}: {show_weights(self.weights)}", "shipyard")
        return sdk.StepResult()


route = RouteStep


# -- sy.canary --------------------------------------------------------------------------------------


def _check_steps(steps: Any) -> tuple[int, ...]:
    ok = (
        isinstance(steps, (list, tuple))
        and steps
        and all(_is_int(s) and 0 < s <= 100 for s in steps)
        and all(a < b for a, b in itertools.pairwise(steps))
    )
    if not ok:
        raise sdk.PipelineDefinitionError(
            "canary(): steps must be increasing whole percents from 1 to 100, e.g. "
            f"[10, 50, 100], got {steps!r}"
        )
    if steps[-1] != 100:
        raise sdk.PipelineDefinitionError(
            f"canary(): the last step must be 100 (the new version takes all traffic), got "
            f"{list(steps)!r}; write {[*steps, 100]!r}"
        )
    return tuple(steps)


class CanaryStrategy:
    """How ``docker.service`` moves traffic to a new version: step by step, checked between.

    :param steps: the new version's percent of traffic at each step; the last is 100.
    :param analysis: a :func:`shipyard.analysis` step, run after each step but the last; a
        failed (or erring) analysis puts 100% back on the old version.
    :param pause: seconds to wait after each step but the last (before the analysis).
    :param approval: not supported yet: use ``sy.route`` steps with approval stages between.
    """

    def __init__(self, steps: Sequence[int] = (10, 50, 100), *, analysis: Any = None,
                 pause: float | None = None, approval: Any = None) -> None:  # fmt: skip
        self.steps = _check_steps(steps)
        if analysis is not None and not callable(getattr(analysis, "run", None)):
            raise sdk.PipelineDefinitionError(
                f"canary(): analysis must be sy.analysis(...), got {analysis!r}"
            )
        if getattr(getattr(analysis, "on_inconclusive", None), "kind", None) == "approval":
            raise sdk.PipelineDefinitionError(
                "canary(): an analysis with on_inconclusive=sy.approval(...) cannot suspend a "
                "canary halfway yet; use on_inconclusive='fail' (back to the old version) or "
                "'succeed'"
            )
        if pause is not None and (
            isinstance(pause, bool) or not isinstance(pause, (int, float)) or pause < 0
        ):
            raise sdk.PipelineDefinitionError(
                f"canary(): pause must be a number of seconds >= 0, got {pause!r}"
            )
        if approval is not None:
            raise sdk.PipelineDefinitionError(
                "canary(): approval= is not supported yet; use analysis= or pause=, or sy.route "
                "steps in stages with sy.approval(...) gates between them"
            )
        self.analysis = analysis
        self.pause = float(pause) if pause is not None else None

    def __repr__(self) -> str:
        return f"canary(steps={list(self.steps)!r})"

    def describe(self) -> str:
        """One phrase for ``plan``: the steps and what happens between them."""
        between = []
        if self.pause:
            between.append(f"pause {self.pause:g}s")
        if self.analysis is not None:
            between.append(_describe(self.analysis))
        text = "canary " + " -> ".join(f"{s}%" for s in self.steps)
        return text + (f" (after each step: {', then '.join(between)})" if between else "")

    def plan_details(self, deployment: sdk.Deployment, rootdir: Path) -> list[str]:
        lines = ["canary steps: " + ", ".join(f"{s}%" for s in self.steps)]
        if self.analysis is not None:
            details = getattr(self.analysis, "plan_details", None)
            if callable(details):
                lines += [f"analysis: {line}" for line in details(deployment, rootdir)]
        return lines

    async def shift(self, context: sdk.StepContext, *, router: Any, service: str,
                    old_port: int, new_port: int, old_name: str, new_name: str) -> None:  # fmt: skip
        """Move ``service`` from ``old_port`` to ``new_port`` step by step.

        Returns once 100% goes to the new port. On any failure (or a cancel) 100% goes back to
        the old port before the exception propagates; the caller removes the new container.
        """
        import asyncio

        back = {old_port: 100, new_port: 0}
        _record(context, service, back, back, "set")
        steps = self.steps
        if context.deployment.rollback_of is not None and len(steps) > 1:
            context.log("canary: a rollback moves all traffic at once", "shipyard")
            steps = (100,)
        reached = 0
        try:
            for percent in steps:
                weights = {old_port: 100 - percent, new_port: percent}
                final = percent == 100
                await change_weights(context, router, service, weights, settle=back,
                                     settle_after=weights if final else back)  # fmt: skip
                reached = percent
                context.log(
                    f"canary step reached: {percent}% of {service} on {new_name} "
                    f"(127.0.0.1:{new_port}), {100 - percent}% on {old_name} "
                    f"(127.0.0.1:{old_port})",
                    "shipyard",
                )
                context.emit(sdk.CanaryStepReached, service=service, percent=percent,
                             new=new_name, old=old_name,
                             weights={str(p): w for p, w in weights.items()})  # fmt: skip
                if final:
                    return
                if self.pause:
                    context.log(f"canary: pausing {self.pause:g}s at {percent}%", "shipyard")
                    await asyncio.sleep(self.pause)
                if self.analysis is not None:
                    await self._analyse(context, percent)
        except BaseException as exc:
            restored = await _shielded(self._back(context, router, service, back, old_name))
            if isinstance(exc, sdk.StepFailed):
                where = f"canary stopped at {reached}%" if reached else "canary did not start"
                failed = sdk.StepFailed(
                    f"{where}: {exc.message}; "
                    + (restored or f"all traffic is back on {old_name}"),
                    output=exc.output,
                )
                #: False when the new version may still get traffic: the caller must keep it.
                failed.traffic_restored = restored is None  # type: ignore[attr-defined]
                raise failed from None
            raise

    async def _analyse(self, context: sdk.StepContext, percent: int) -> None:
        import asyncio

        assert self.analysis is not None
        context.log(f"canary: analysis at {percent}%", "shipyard")
        timeout = getattr(self.analysis, "timeout", None)
        try:
            async with asyncio.timeout(timeout):
                await self.analysis.run(context)
        except TimeoutError:
            raise sdk.StepFailed(
                f"the analysis at {percent}% did not finish within its timeout of {timeout:g}s"
            ) from None

    async def _back(self, context: sdk.StepContext, router: Any, service: str,
                    back: Mapping[int, int], old_name: str) -> str | None:  # fmt: skip
        """Put all traffic back on the old version; None, or what went wrong."""
        try:
            await change_weights(context, router, service, back, settle=back)
        except Exception as exc:
            text = exc.message if isinstance(exc, sdk.StepFailed) else str(exc)
            context.log(f"canary: could not put the traffic back: {text}", "stderr")
            return f"the traffic could NOT be put back on {old_name}: {text}"
        context.log(f"canary: all traffic of {service} is back on {old_name}", "shipyard")
        return None


async def _shielded(coro: Any) -> Any:
    """Run ``coro`` to its end even if the caller is cancelled meanwhile."""
    import asyncio

    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


canary = CanaryStrategy


@sdk.hookimpl
def shipyard_register_step_types(registry: sdk.StepTypeRegistry) -> None:
    registry.add(RouteStep)
