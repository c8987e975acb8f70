"""Every hook Shipyard calls: the plugin author's contract.

Implement a hook with a module-level function (or a method) of the same name, marked with
:data:`shipyard.hookimpl`. Hooks are grouped by phase. The run protocol, hook by hook:

1. ``shipyard_addhooks``, ``shipyard_register_step_types``, ``shipyard_register_notifiers``
   and ``shipyard_configure`` when the plugins are loaded;
2. ``shipyard_collection_modifyitems`` once ``pipelines.py`` is collected;
3. for a deployment: ``shipyard_deployment_started``; for each stage
   ``shipyard_stage_started``, for each of its steps ``shipyard_step_started``, then
   ``shipyard_step_call`` (the executor) for each attempt, ``shipyard_step_output`` for each
   batch of output lines, ``shipyard_step_finished``; ``shipyard_stage_finished``; at the end
   ``shipyard_deployment_finished``. ``shipyard_rollback_started`` precedes a rollback's own
   ``shipyard_deployment_started``.
4. ``shipyard_unconfigure`` when the command ends.

Event hooks receive one read-only ``event`` object; new fields may be added to events, never removed.
An exception raised by an event hook is logged and recorded; it never fails a deployment.
"""

from __future__ import annotations

from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any

import pluggy

if TYPE_CHECKING:
    import click

    from ._config import Config
    from ._events import AnalysisFinished
    from ._events import AnalysisStarted
    from ._events import ApprovalDecided
    from ._events import ApprovalExpired
    from ._events import ApprovalReminder
    from ._events import CanaryStepReached
    from ._events import DeploymentFinished
    from ._events import DeploymentStarted
    from ._events import DeploymentSuspended
    from ._events import HostFinished
    from ._events import RollbackStarted
    from ._events import StageFinished
    from ._events import StageStarted
    from ._events import StepFinished
    from ._events import StepOutput
    from ._events import StepStarted
    from ._pipeline import Pipeline
    from ._pipeline import Step
    from ._plugins import NotifierRegistry
    from ._plugins import ProviderRegistry
    from ._plugins import ShipyardPluginManager
    from ._plugins import StepTypeRegistry
    from ._reports import StepResult
    from ._runner import StepContext
    from ._store import ArtifactRow
    from ._store import DeploymentRow
    from ._store import GateRow
    from ._store import HistoryStore

hookspec = pluggy.HookspecMarker("shipyard")

# -------------------------------------------------------------------------------------------------
# Initialisation: plugins, step types, notifiers, configuration
# -------------------------------------------------------------------------------------------------


@hookspec(historic=True)
def shipyard_addhooks(pluginmanager: ShipyardPluginManager) -> None:
    """Add hook specifications of your own (``pluginmanager.add_hookspecs(module)``).

    :param pluginmanager: the Shipyard plugin manager.
    """


@hookspec(historic=True)
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    """Register step types: ``registry.add(MyStep)``.

    A step type is a subclass of :class:`shipyard.Step` with a unique ``kind``; registering a
    kind twice is an error naming both plugins.

    :param registry: the step type registry.
    """


@hookspec(historic=True)
def shipyard_register_notifiers(registry: NotifierRegistry) -> None:
    """Register notifier factories by name: ``registry.add("teams", make_teams_notifier)``.

    A factory takes the value given to ``deploy --notify NAME:VALUE`` (or a URL for the name
    ``webhook``) and returns a notifier: an object with ``send(payload: dict) -> None`` that
    receives each event's JSON payload (documented in ``shipyard.plugins.notify``), and an
    optional ``close()``.

    :param registry: the notifier registry.
    """


@hookspec
def shipyard_register_metric_providers(registry: ProviderRegistry) -> None:
    """Register metric provider types by name: ``registry.add("datadog", datadog_query)``, for
    ``shipyard plugins`` to list.

    A provider is any object with a ``name``, a ``description`` (shown in ``plan`` and the
    history, masked) and ``measure(ctx)`` (sync or async) returning the value or raising;
    pipelines build one by calling your factory (``sy.metric("m", datadog_query(...))``). The
    built-in ones are ``prometheus``, ``http_json`` and ``python_metric``.

    :param registry: the metric provider registry.
    """


@hookspec(historic=True)
def shipyard_configure(config: Config) -> None:
    """Perform set-up once plugins and the command line are known.

    :param config: the resolved configuration.
    """


@hookspec
def shipyard_unconfigure(config: Config) -> None:
    """Tear down before the command exits.

    :param config: the resolved configuration.
    """


@hookspec
def shipyard_addcommands(cli: click.Group) -> None:
    """Add click commands to the ``shipyard`` command line (``cli.add_command(cmd)``).

    :param cli: the ``shipyard`` click group.
    """


@hookspec
def shipyard_cleanup_interrupted(
    deployment: DeploymentRow, artifacts: list[ArtifactRow], log: Callable[[str], None]
) -> None:
    """Clean up what a deployment whose process died left outside this host's processes.

    Called once, by the command that found the deployment's process dead and recorded it
    ``interrupted`` (the step processes it left on this host are stopped by then), with the
    artifacts its steps recorded (:meth:`StepContext.record_artifact`): a step that creates
    something outside the ``shipyard`` process — a container, a Job — records what it is about
    to create, so that this hook can find and remove it. Act only on artifacts of your own
    step types; an exception is reported as a warning and does not stop the command.

    :param deployment: the interrupted deployment.
    :param artifacts: what its steps recorded, in order.
    :param log: records a line in the deployment's log (``shipyard logs``) and shows it; say
        what was removed or left, and why.
    """


@hookspec(firstresult=True)
def shipyard_resolve_secret(name: str, config: Config) -> str | None:
    """Return the value of the secret ``name``, e.g. from a vault; None to let others try.

    The environment (and ``--secret-file``) is consulted when no plugin answers.
    Stops at first non-None result.

    :param name: the name given to ``shipyard.secret(name)``.
    :param config: the resolved configuration.
    :returns: the secret's value, or None.
    """


# -------------------------------------------------------------------------------------------------
# The history store
# -------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def shipyard_store_open(url: str, create: bool) -> HistoryStore | None:
    """Open the history store named by ``url`` if your plugin provides its scheme; else None.

    Asked for every URL whose scheme Shipyard does not open itself (a plain path and
    ``sqlite://`` are built in). The store must implement :class:`shipyard.sdk.HistoryStore`
    and pass the store contract suite (see the plugin author's guide). Stops at first non-None
    result.

    :param url: the ``--history``/``SHIPYARD_HISTORY`` setting, e.g. ``"mystore://host/db"``.
    :param create: whether to create an empty store if there is none; when False and there is
        none, raise :class:`shipyard.HistoryError` saying nothing was deployed yet.
    :returns: the open store, or None.
    """


@hookspec
def shipyard_store_schemes() -> list[str] | None:
    """The URL schemes your plugin's :func:`shipyard_store_open` opens (``["mystore"]``).

    Only used to name the supported schemes when a URL has a scheme nobody opens.

    :returns: the schemes, without ``://``.
    """


# -------------------------------------------------------------------------------------------------
# Collection
# -------------------------------------------------------------------------------------------------


@hookspec
def shipyard_collection_modifyitems(pipelines: list[Pipeline[Any]], config: Config) -> None:
    """Filter or reorder the collected pipelines in place.

    :param pipelines: the pipelines of ``pipelines.py`` in definition order.
    :param config: the resolved configuration.
    """


# -------------------------------------------------------------------------------------------------
# Running steps
# -------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def shipyard_step_call(step: Step, context: StepContext) -> Awaitable[StepResult] | None:
    """Execute one attempt of ``step``; return an awaitable of its :class:`shipyard.StepResult`.

    The built-in implementation (``trylast``) awaits ``step.run(context)``. Return an awaitable of
    your own to replace the executor for some steps (e.g. a fake for tests), or wrap it with
    ``hookwrapper=True``. Stops at first non-None result.

    :param step: the step to run.
    :param context: the deployment context, logger and secret resolver for this attempt.
    :returns: an awaitable :class:`shipyard.StepResult`, or None to let others try.
    """


@hookspec(firstresult=True)
def shipyard_router_switch(
    router: Any, service: str, port: int, context: StepContext
) -> Awaitable[bool] | bool | None:
    """Send the traffic of ``service`` to ``port``: the router step of ``docker.service``.

    ``docker.service(..., router=R)`` calls this once the new container answers its health
    check, and stops the old container only after the switch succeeded. Implement it for the
    router objects your plugin creates (``isinstance(router, MyRouter)``) and return None for any
    other, so that several routers can coexist. Drive an existing proxy (nginx, HAProxy, a cloud
    load balancer); do not proxy traffic yourself.

    The switch must be all-or-nothing: when it cannot be completed, restore the proxy's previous
    state and raise an exception whose message says what failed (it becomes the step's error,
    the new container is removed and the old one keeps serving). When it returns, new requests
    must reach ``port``; requests in flight may still finish on the old one (``docker.service``
    waits ``drain`` seconds before stopping it).

    The built-in implementation drives nginx (:func:`shipyard.nginx`). Stops at first non-None
    result.

    :param router: the object given as ``router=`` (e.g. ``shipyard.nginx(path)``).
    :param service: the service's name, as given to ``docker.service``.
    :param port: the host port the new container listens on (``127.0.0.1:port`` on the engine's
        host).
    :param context: the step's context: ``log()`` what you do, ``resolve()`` secrets. Call it
        from the event loop's thread only.
    :returns: True when handled, or an awaitable resolving to True (the switch may run
        subprocesses or HTTP calls asynchronously); None when ``router`` is not yours.
    """


@hookspec(firstresult=True)
def shipyard_router_weights(
    router: Any, service: str, weights: Mapping[int, int], context: StepContext
) -> Awaitable[bool] | bool | None:
    """Split the traffic of ``service`` between host ports: the router step of canaries.

    ``shipyard.route(router, service, weights)`` and ``docker.service(..., strategy=
    shipyard.canary(...))`` call this for every weight change. ``weights`` maps each host port
    to a whole percent; the percents sum to 100, and a port at 0 must receive no new request.
    Implement it for the router objects your plugin creates (``isinstance(router, MyRouter)``)
    and return None for any other, so that several routers can coexist.

    The change must be all-or-nothing, as for :func:`shipyard_router_switch`: when it cannot
    be completed, restore the proxy's previous state and raise an exception whose message says
    what failed (a canary then puts all traffic back on the old version). When it returns, new
    requests must be split as asked. A change to 100% on one port must leave the proxy in the
    same state as ``shipyard_router_switch`` to that port.

    Before each change the caller records the step artifact ``route:<service>`` (JSON:
    ``weights`` it asks for, ``settle``, the weights a repair must restore if the deployment is
    killed now). A router plugin that can act without the pipelines file (nginx can) restores
    ``settle`` in its ``shipyard_cleanup_interrupted``. The built-in implementation drives nginx
    (:func:`shipyard.nginx`). Stops at first non-None result.

    :param router: the object given as ``router=`` (e.g. ``shipyard.nginx(path)``).
    :param service: the service's name.
    :param weights: host port -> percent of new requests (whole numbers summing to 100).
    :param context: the step's context: ``log()`` what you do, ``record_artifact()`` what a
        repair needs. Call it from the event loop's thread only.
    :returns: True when handled, or an awaitable resolving to True; None when ``router`` is not
        yours.
    """


@hookspec(firstresult=True)
def shipyard_analysis_measure(metric: Any, context: Any) -> Awaitable[Any] | None:
    """Take one measurement of ``metric`` for an ``analysis`` step; return an awaitable of the value.

    The built-in implementation (``trylast``) calls ``metric.provider.measure(context)``. Return
    an awaitable of your own to replace the measurement of some metrics, or wrap it with
    ``hookwrapper=True``. The value may be anything (``None`` is a value: "no data"); raise to
    make the measurement an error. Stops at first non-None result.

    :param metric: the ``shipyard.metric(...)`` measured (``name``, ``provider``, conditions).
    :param context: the measurement's context: ``deployment``, ``n``, ``resolve()``, ``log()``,
        ``warn()``, ``http_client()``.
    :returns: an awaitable of the measured value, or None to let others try.
    """


# -------------------------------------------------------------------------------------------------
# Deployment events (notification sinks listen here)
# -------------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def shipyard_approval_check(
    deployment: DeploymentRow, gate: GateRow, user: str, decision: str
) -> str | None:
    """Your organisation's own rule for who may decide an approval gate.

    Called for every ``approve`` and ``reject`` after Shipyard's own rules (expiry, approvers,
    self-approval) passed. Return None to allow, or the reason to refuse (the command exits 2
    with it). Stops at the first non-None result.

    :param deployment: the waiting deployment (as ``show --json`` prints it, without stages).
    :param gate: its gate: ``stage``, ``spec`` (approvers, required, ...), ``decisions``.
    :param user: who decides (``SHIPYARD_USER``, the CI identity, or the OS user).
    :param decision: ``"approve"`` or ``"reject"``.
    """


@hookspec(firstresult=True)
def shipyard_identify(user: str, purpose: str) -> str | None:
    """Who the person running this command is, in your organisation's names.

    Shipyard's own answer, ``user``, is ``SHIPYARD_USER``, then the CI identity variables
    (``GITHUB_ACTOR``, ``GITLAB_USER_LOGIN``, ...), then the OS user. Return another name to
    record instead (for example an SSO login mapped from a CI variable), or None to keep it.
    Stops at the first non-None result. The name is what approver lists are compared with.

    :param user: Shipyard's answer.
    :param purpose: ``"deploy"`` (recorded with a new deployment), ``"decide"`` (approving or
        rejecting a gate) or ``"act"`` (cancel, unlock, supersede: recorded in the audit).
    """


@hookspec
def shipyard_approval_decided(event: ApprovalDecided) -> None:
    """Someone decided an approval gate (``event.decision``: ``approve``, ``reject``,
    ``cancel`` or ``supersede``), in the process that decided it. ``event.outcome`` says what
    follows: ``resume`` (it runs on here), ``recorded`` (more approvals are needed),
    ``rejected``, ``cancelled``, ``superseded``."""


@hookspec
def shipyard_approval_expired(event: ApprovalExpired) -> None:
    """An approval gate's time ran out and ``shipyard expire`` (or a deploy meeting it) applied
    its default outcome (``event.outcome``: ``approved`` or ``rejected``)."""


@hookspec
def shipyard_approval_reminder(event: ApprovalReminder) -> None:
    """A gate with ``remind_every`` still waits: sent by ``shipyard expire`` when a reminder
    is due (run it on a schedule); ``event.to_dict()["commands"]`` says how to decide."""


@hookspec
def shipyard_analysis_started(event: AnalysisStarted) -> None:
    """An analysis step starts measuring its metrics (``event.metrics``)."""


@hookspec
def shipyard_analysis_finished(event: AnalysisFinished) -> None:
    """An analysis step decided: ``event.verdict``, ``event.outcome`` (``continue``, ``fail``,
    ``wait for approval``, ``stopped``) and ``event.summary``."""


@hookspec
def shipyard_canary_step_reached(event: CanaryStepReached) -> None:
    """A canary moved ``event.percent`` of ``event.service``'s traffic to the new version."""


@hookspec
def shipyard_host_finished(event: HostFinished) -> None:
    """A fleet step's action on one host ended: ``event.action`` (``apply``, ``revert`` or
    ``check``) on ``event.host``, with its ``status``, ``exit_code``, ``error`` and times."""


@hookspec
def shipyard_deployment_suspended(event: DeploymentSuspended) -> None:
    """The deployment stopped at an approval gate (``event.gate``); it awaits a decision, and
    ``event.to_dict()["commands"]`` says how to give it. Nothing of it runs meanwhile."""


@hookspec
def shipyard_deployment_started(event: DeploymentStarted) -> None:
    """A deployment started: its stages and steps are known and recorded.

    :param event: carries ``deployment`` and ``stages``.
    """


@hookspec
def shipyard_rollback_started(event: RollbackStarted) -> None:
    """A rollback is about to start; it is a deployment of its own that follows.

    :param event: carries ``deployment`` (the one rolled back), ``target`` version and ``reason``.
    """


@hookspec
def shipyard_stage_started(event: StageStarted) -> None:
    """A stage started.

    :param event: carries ``deployment``, ``index``, ``total`` and ``stage``.
    """


@hookspec
def shipyard_step_started(event: StepStarted) -> None:
    """A step started.

    :param event: carries ``deployment``, ``stage_index``, ``index`` and ``step``.
    """


@hookspec
def shipyard_step_output(event: StepOutput) -> None:
    """A batch of output lines of a running step (already masked).

    :param event: carries ``deployment``, ``stage_index``, ``index`` and ``lines``.
    """


@hookspec
def shipyard_step_finished(event: StepFinished) -> None:
    """A step finished (succeeded, failed, cancelled or skipped).

    :param event: carries ``deployment``, ``stage_index``, ``index``, ``step`` and ``result``.
    """


@hookspec
def shipyard_stage_finished(event: StageFinished) -> None:
    """A stage finished.

    :param event: carries ``deployment``, ``index``, ``stage`` and ``status``.
    """


@hookspec
def shipyard_deployment_finished(event: DeploymentFinished) -> None:
    """A deployment finished; its final status is recorded.

    :param event: carries ``deployment``, ``status`` and ``error``.
    """
