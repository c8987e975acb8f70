"""OpenTelemetry traces of deployments (issue #19): a trace per deployment, over OTLP/HTTP.

Tracing is on when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is
set, or ``[tool.shipyard] otel`` is ``true`` or an endpoint (``"http://collector:4318"``);
``otel = false`` or ``OTEL_SDK_DISABLED=true`` turn it off, and so does ``-p no:otel``. It needs
the extra ``shipyard[otel]``. Off, this module registers nothing but its ``shipyard_configure``:
no OpenTelemetry import, no hook on the step path. On, :class:`Tracing` is registered as
``otelplugin``; it imports the SDK at the first deployment (``list`` and ``plan`` stay light).

The trace of a deployment::

    deploy PIPELINE                 shipyard.deployment.id, .pipeline, .version, .environment
      stage NAME                    shipyard.stage, .stage.index, .stage.parallel, .status
        step NAME                   shipyard.step, .step.kind, .status, .attempts, .exit_code
          attempt N                 (steps with retries=) shipyard.attempt, .status, .exit_code
            host ADDRESS[:PORT]     (fleet steps) shipyard.host, server.address, .port, ...
      deploy PIPELINE (rollback)    the automatic rollback: a child of the failed deployment

Events: ``retry`` on a step span (each attempt after the first), ``rollback`` on the deployment
that failed, ``approval requested`` on a deployment stopping at a gate and ``approval decided``
on the deployment the decision resumes. A failed span has the ERROR status with the (masked)
error. An incoming ``TRACEPARENT`` (a CI job's span) is the deployment's parent. The step's
``TRACEPARENT`` (its attempt's, for a step with retries) reaches the processes of the step
(:attr:`shipyard.sdk.StepContext.process_env`), so that a deploy script's spans join the trace.
A step that is not retried has no attempt span: its one attempt is the step span, and that span
is made in one piece when the step ends (:class:`_StepSpan`; figure 13).

The collector never fails a deployment: spans are exported in batches by a background thread,
and at the end the last batch waits at most the export timeout (``OTEL_EXPORTER_OTLP_TIMEOUT``,
10 s by default) — and not at all once an export failed: what could not be sent is counted in
one warning.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any

from shipyard.sdk import hookimpl

if TYPE_CHECKING:
    from collections.abc import Generator

    from shipyard.sdk import DeploymentFinished
    from shipyard.sdk import DeploymentStarted
    from shipyard.sdk import HostFinished
    from shipyard.sdk import RollbackStarted
    from shipyard.sdk import StageFinished
    from shipyard.sdk import StageStarted
    from shipyard.sdk import Step
    from shipyard.sdk import StepContext
    from shipyard.sdk import StepFinished
    from shipyard.sdk import StepStarted

#: The plugin name :class:`Tracing` is registered under.
PLUGIN_NAME = "otelplugin"
#: Seconds an exporter that failed is left alone before it is tried again.
COOL_DOWN = 60.0
_TRUE = ("1", "true", "yes", "on")


def tracing_endpoint(setting: Any, environ: Mapping[str, str]) -> str | None:
    """Whether tracing is on, and where spans go: the traces URL, or None when off.

    :param setting: ``[tool.shipyard] otel``: None (unset), a bool, or the base endpoint.
    :param environ: the environment (``OTEL_*``).
    :raises ValueError: when ``setting`` is none of these.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE or setting is False:
        return None
    if setting is not None and not isinstance(setting, (bool, str)):
        raise ValueError(
            f"[tool.shipyard] otel must be true, false or the collector's URL, got {setting!r}"
        )
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or (
        setting if isinstance(setting, str) and setting else None
    )
    if base is None and setting is True:
        base = "http://localhost:4318"
    if base is None:
        return None
    return base.rstrip("/") + "/v1/traces"


def export_timeout(environ: Mapping[str, str]) -> float:
    """Seconds one export may take (``OTEL_EXPORTER_OTLP_TRACES_TIMEOUT``, ``..._TIMEOUT``)."""
    raw = environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or environ.get(
        "OTEL_EXPORTER_OTLP_TIMEOUT"
    )
    try:
        value = float(raw) if raw else 10.0
    except ValueError:
        value = 10.0
    return value if value > 0 else 10.0


def _warn(text: str) -> None:
    from shipyard.sdk import mask

    print(f"shipyard: warning: tracing: {mask(text)}", file=sys.stderr)


@hookimpl
def shipyard_configure(config: Any) -> None:
    pm = config.pluginmanager
    if pm is None or pm.has_plugin(PLUGIN_NAME):
        return
    try:
        endpoint = tracing_endpoint(config.settings.get("otel"), os.environ)
    except ValueError as exc:
        from shipyard.sdk import PipelineDefinitionError

        raise PipelineDefinitionError(f"{config.rootdir / 'pyproject.toml'}: {exc}") from None
    if endpoint is not None:
        pm.register(Tracing(endpoint, export_timeout(os.environ)), PLUGIN_NAME)


def traceparent(span: Any) -> str:
    """The W3C ``traceparent`` header naming ``span``."""
    sc = span.get_span_context()
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


class _Run:
    """The open spans of one deployment."""

    __slots__ = ("attempts", "context", "deployment", "finished_ns", "span", "stages", "steps")

    def __init__(self, deployment: Any, span: Any, context: Any) -> None:
        self.deployment = deployment
        self.span = span
        #: The OpenTelemetry context with ``span`` current: the parent of its stages.
        self.context = context
        #: stage index -> (span, context)
        self.stages: dict[int, tuple[Any, Any]] = {}
        #: (stage index, step index) -> (span, context)
        self.steps: dict[tuple[int, int], tuple[Any, Any]] = {}
        #: (stage index, step index) -> the span of the attempt running (steps with retries=)
        self.attempts: dict[tuple[int, int], Any] = {}
        #: When it ended failed; the span stays open for the rollback event until then.
        self.finished_ns: int | None = None


class _Pieces:
    """What a :class:`_StepSpan` is made of, looked up once when tracing starts."""

    __slots__ = ("ReadableSpan", "SpanContext", "Status", "ids", "limit", "processor",
                 "resource", "scope", "unset")  # fmt: skip

    def __init__(self, tracer: Any, version: str) -> None:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace import SpanLimits
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext
        from opentelemetry.trace import Status
        from opentelemetry.trace import StatusCode

        self.ReadableSpan, self.SpanContext, self.Status = ReadableSpan, SpanContext, Status
        self.unset = Status(StatusCode.UNSET)
        self.ids, self.processor = tracer.id_generator, tracer.span_processor
        self.resource, self.scope = tracer.resource, InstrumentationScope("shipyard", version)
        #: The longest attribute value the SDK would keep (``OTEL_*ATTRIBUTE_VALUE_LENGTH_LIMIT``).
        self.limit: int | None = SpanLimits().max_span_attribute_length

    def finish(self, span: _StepSpan, end_time: int | None) -> None:
        """Hand ``span``, ended, to the span processors, as the SDK's own end does."""
        attributes, limit = span.attributes, self.limit
        if limit is not None:
            attributes = {k: v[:limit] if isinstance(v, str) else v for k, v in attributes.items()}
        self.processor.on_end(
            self.ReadableSpan(
                span.name, context=span.context, parent=span.parent, resource=self.resource,
                attributes=attributes,
                status=self.unset if span.status is None else self.Status(*span.status),
                start_time=span.start, end_time=time.time_ns() if end_time is None else end_time,
                instrumentation_scope=self.scope,
            )
        )  # fmt: skip


class _StepSpan:
    """The span of a step that is not retried (or of a host), made in one piece at its end.

    Its ids are drawn when it starts (a step's ``TRACEPARENT`` must exist before the step's
    processes do), its attributes and status are gathered as the SDK's span would gather them,
    and :meth:`end` hands the finished span to the span processors, as the SDK does at a span's
    end. Such a span has no events, links or children, so nothing is lost; what is saved is the
    SDK's bookkeeping for a span still open (a lock, the sampler's second opinion, a validation
    pass per attribute): more than half of what tracing cost a no-op step (figure 13). Used only
    where the SDK's sampler would follow the parent's choice anyway (see ``Tracing._build``).
    """

    __slots__ = ("_pieces", "attributes", "context", "name", "parent", "start", "status")

    def __init__(self, pieces: _Pieces, name: str, parent: Any, start: int | None = None) -> None:
        self._pieces = pieces
        self.parent = parent
        self.name = name
        self.context = pieces.SpanContext(
            parent.trace_id, pieces.ids.generate_span_id(), is_remote=False,
            trace_flags=parent.trace_flags, trace_state=parent.trace_state,
        )  # fmt: skip
        self.start: int | None = time.time_ns() if start is None else start
        self.attributes: dict[str, Any] = {}
        self.status: tuple[Any, str | None] | None = None

    def get_span_context(self) -> Any:
        return self.context

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self.attributes.update(attributes)

    def set_status(self, code: Any, description: str | None = None) -> None:
        self.status = (code, description)

    def end(self, end_time: int | None = None) -> None:
        if self.start is not None:
            self._pieces.finish(self, end_time)
            self.start = None


class Tracing:
    """The ``otelplugin``: spans from the deployment events, exported over OTLP/HTTP."""

    def __init__(self, endpoint: str, timeout: float) -> None:
        #: The traces URL (``.../v1/traces``).
        self.endpoint = endpoint
        #: Seconds one export may take; the end of the command waits at most this long.
        self.timeout = timeout
        self._tracer: Any = None
        self._processor: Any = None
        self._exporter: Any = None
        self._otel: Any = None
        #: Set when spans may be made in one piece (the sampler follows the parent's choice).
        self._pieces: _Pieces | None = None
        self._broken = False
        self._closed = False
        #: Open deployments by ``id()`` of their Deployment object.
        self._runs: dict[int, _Run] = {}
        #: Failed deployments whose span waits for a rollback event, by deployment id.
        self._failed: dict[int, _Run] = {}
        #: Approval decisions waiting for the deployment they resume, by deployment id.
        self._decisions: dict[int, list[tuple[dict[str, Any], int]]] = {}

    # -- set-up and tear-down ---------------------------------------------------------------------

    def _start(self) -> bool:
        """Build the tracer on first use; False when tracing cannot work here (said once)."""
        if self._tracer is not None:
            return True
        if self._broken or self._closed:
            return False
        try:
            self._tracer = self._build()
        except ImportError as exc:
            self._broken = True
            _warn(
                f"traces are off: {exc.name or exc} is not installed (OpenTelemetry is "
                f"configured for {self.endpoint}); install it with pip install 'shipyard[otel]'"
            )
            return False
        except Exception as exc:  # a bad OTEL_* setting: no traces, but the deployment runs
            self._broken = True
            _warn(f"traces are off: {type(exc).__name__}: {exc}")
            return False
        import atexit

        atexit.register(self.shutdown)
        return True

    def _build(self) -> Any:
        import logging

        from opentelemetry import context as otel_context
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        from shipyard.sdk import __version__
        from shipyard.sdk import register_secrets

        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        if protocol.strip() != "http/protobuf":
            _warn(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} ignored: Shipyard sends http/protobuf")
        # Header values are credentials (an API key): masked wherever Shipyard writes.
        for var in ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"):
            for item in os.environ.get(var, "").split(","):
                register_secrets([item.partition("=")[2].strip()])
        # The exporter logs each failure; we say it once, at the end (see shutdown()).
        self._log = _last_message_handler(logging)
        otel_log = logging.getLogger("opentelemetry")
        otel_log.addHandler(self._log)
        otel_log.propagate = False

        named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        )
        attributes = {"service.version": __version__}
        if not named:
            attributes["service.name"] = "shipyard"
        provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
        self._exporter = _guarded_exporter(
            OTLPSpanExporter(endpoint=self.endpoint, timeout=self.timeout), self
        )
        self._processor = BatchSpanProcessor(self._exporter)
        provider.add_span_processor(self._processor)
        self._otel = (trace, otel_context, TraceContextTextMapPropagator())
        tracer = provider.get_tracer("shipyard", __version__)
        # A one-piece span skips the sampler: right only for samplers that decide as the parent
        # did (the OTEL_TRACES_SAMPLER choices: parent-based, by trace id, always).
        from opentelemetry.sdk.trace import sampling

        kinds = (sampling.ParentBased, sampling.ParentBasedTraceIdRatio,
                 sampling.TraceIdRatioBased, sampling.StaticSampler)  # fmt: skip
        if type(provider.sampler) in kinds:
            self._pieces = _Pieces(tracer, __version__)
        return tracer

    def _child(self, name: str, parent: Any, context: Any = None, start: int | None = None) -> Any:
        """A span under ``parent``: in one piece where that is exact, else the SDK's.

        ``context`` is ``parent``'s OpenTelemetry context when the caller has it at hand."""
        ctx = parent.get_span_context()
        if self._pieces is not None and ctx.trace_flags.sampled:
            return _StepSpan(self._pieces, name, ctx, start)
        if context is None:
            context = self._otel[0].set_span_in_context(parent)
        return self._tracer.start_span(name, context=context, start_time=start)

    @hookimpl
    def shipyard_unconfigure(self, config: Any) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """End what is still open, send the last batch (at most :attr:`timeout` seconds; not at
        all after a failed export), and say once what could not be sent."""
        if self._closed:
            return
        self._closed = True
        if self._processor is None:
            return
        for run in list(self._failed.values()):
            run.span.end(end_time=run.finished_ns)
        self._failed.clear()
        for run in list(self._runs.values()):
            run.span.end()
        self._runs.clear()
        exporter = self._exporter
        exporter.closing = True
        # The processor's own shutdown may wait 30 s for its thread: bounded here instead.
        import threading

        flush = threading.Thread(target=self._processor.shutdown, name="shipyard-otel-flush")
        flush.daemon = True
        flush.start()
        flush.join(self.timeout)
        if flush.is_alive():  # still waiting for the collector: given up, counted as lost
            exporter.lost += exporter.sending
            exporter.why = exporter.why or f"gave up after {self.timeout:g}s"
        else:  # nothing of ours logs any more (a running export would: keep it quiet then)
            import logging

            logging.getLogger("opentelemetry").removeHandler(self._log)
        if exporter.lost:
            from shipyard.sdk import display_url

            last = exporter.why or ""
            if "due to timeout, max retries or shutdown" in last:  # says nothing more
                last = f"gave up after {self.timeout:g}s"
            why = f" ({last[:300]})" if last else ""
            _warn(
                f"{exporter.lost} span(s) could not be sent to {display_url(self.endpoint)}"
                f"{why}; is the collector running? (OTEL_EXPORTER_OTLP_ENDPOINT)"
            )

    # -- spans ------------------------------------------------------------------------------------

    def _span(self, name: str, parent: Any, attributes: dict[str, Any]) -> tuple[Any, Any]:
        trace = self._otel[0]
        span = self._tracer.start_span(name, context=parent, attributes=attributes)
        return span, trace.set_span_in_context(span, parent)

    def _parent_of(self, deployment: Any) -> Any:
        """The rolled-back deployment's span for a rollback, else an incoming TRACEPARENT."""
        if deployment.rollback_of is not None:
            failed = self._failed.pop(deployment.rollback_of, None)
            if failed is not None:
                failed.span.end(end_time=failed.finished_ns)
                return failed.context
        incoming = os.environ.get("TRACEPARENT")
        if incoming:
            carrier = {"traceparent": incoming}
            if os.environ.get("TRACESTATE"):
                carrier["tracestate"] = os.environ["TRACESTATE"]
            return self._otel[2].extract(carrier)
        return None

    def _end(self, span: Any, status: str, error: str | None) -> None:
        span.set_attribute("shipyard.status", status)
        if error:
            from opentelemetry.trace import StatusCode

            span.set_attribute("shipyard.error", error)
            if status in ("failed", "cancelled", "interrupted"):
                span.set_status(StatusCode.ERROR, error)

    @hookimpl
    def shipyard_deployment_started(self, event: DeploymentStarted) -> None:
        if not self._start():
            return
        d = event.deployment
        for run in list(self._failed.values()):  # no rollback came for these
            if run.deployment.id != d.rollback_of:
                run.span.end(end_time=run.finished_ns)
                del self._failed[run.deployment.id]
        attributes: dict[str, Any] = {
            "shipyard.deployment.id": d.id,
            "shipyard.pipeline": d.pipeline,
            "shipyard.version": d.version,
            "shipyard.environment": d.environment,
            "deployment.environment.name": d.environment,
        }
        if d.rollback_of is not None:
            attributes["shipyard.rollback_of"] = d.rollback_of
        if event.start_stage:
            attributes["shipyard.start_stage"] = event.start_stage
        if event.resumed:
            attributes["shipyard.resumed"] = True
        name = f"deploy {d.pipeline}" + (" (rollback)" if d.rollback_of is not None else "")
        span, ctx = self._span(name, self._parent_of(d), attributes)
        for attrs, ts in self._decisions.pop(d.id, ()):
            span.add_event("approval decided", attrs, timestamp=ts)
        self._runs[id(d)] = _Run(d, span, ctx)

    @hookimpl
    def shipyard_stage_started(self, event: StageStarted) -> None:
        run = self._runs.get(id(event.deployment))
        if run is None:
            return
        st = event.stage
        run.stages[event.index] = self._span(
            f"stage {st.name}",
            run.context,
            {
                "shipyard.stage": st.name,
                "shipyard.stage.index": event.index,
                "shipyard.stage.parallel": st.parallel,
            },
        )

    @hookimpl
    def shipyard_step_started(self, event: StepStarted) -> None:
        run = self._runs.get(id(event.deployment))
        stage = run.stages.get(event.stage_index) if run is not None else None
        if stage is None:
            return
        step = event.step
        assert run is not None
        # Its attributes are set once, when it ends (nothing reads them before: the sampler is
        # the parent's), in one call: a no-op step pays for one attribute pass, not two.
        name = f"step {step.name}"
        if step.retries:  # attempt spans and retry events: the SDK's span
            span = self._tracer.start_span(name, context=stage[1])
        else:
            span = self._child(name, stage[0], stage[1])
        # The step's context (the parent of attempt spans) is made only for retried steps.
        run.steps[event.stage_index, event.index] = (span, None)

    @hookimpl(wrapper=True)
    def shipyard_step_call(self, step: Step, context: StepContext) -> Generator[Any, Any, Any]:
        run = self._runs.get(id(context.deployment))
        key = (context.stage_index, context.index)
        pair = run.steps.get(key) if run else None
        if pair is None:
            return (yield)
        if not step.retries:  # one attempt: the step's span is the attempt's (#19, figure 13)
            context.process_env["TRACEPARENT"] = traceparent(pair[0])
            return (yield)
        assert run is not None
        if pair[1] is None:
            pair = run.steps[key] = (pair[0], self._otel[0].set_span_in_context(pair[0]))
        n = context.attempt
        if n > 1:
            pair[0].add_event("retry", {"shipyard.attempt": n})
        span = self._tracer.start_span(
            f"attempt {n}", context=pair[1], attributes={"shipyard.attempt": n}
        )
        context.process_env["TRACEPARENT"] = traceparent(span)
        run.attempts[key] = span
        try:
            awaitable = yield
        except BaseException as exc:
            self._attempt_ended(span, None, exc)
            raise
        if awaitable is None:
            span.end()
            return None
        return self._watch(awaitable, span)

    async def _watch(self, awaitable: Any, span: Any) -> Any:
        try:
            result = await awaitable
        except BaseException as exc:
            self._attempt_ended(span, None, exc)
            raise
        self._attempt_ended(span, result, None)
        return result

    def _attempt_ended(self, span: Any, result: Any, exc: BaseException | None) -> None:
        import asyncio

        if exc is None:
            status = str(getattr(result, "status", "failed"))
            code, error = getattr(result, "exit_code", None), getattr(result, "error", None)
        elif isinstance(exc, asyncio.CancelledError):
            status, code, error = "cancelled", None, "stopped (timed out or cancelled)"
        else:
            from shipyard.sdk import mask

            status = "skipped" if type(exc).__name__ == "Skipped" else "failed"
            code = getattr(exc, "step_exit_code", None)
            error = mask(str(getattr(exc, "message", None) or exc).split("\n", 1)[0])
        if code is not None:
            span.set_attribute("shipyard.exit_code", code)
        self._end(span, status, error)
        span.end()

    @hookimpl
    def shipyard_step_finished(self, event: StepFinished) -> None:
        run = self._runs.get(id(event.deployment))
        pair = run.steps.pop((event.stage_index, event.index), None) if run else None
        if pair is None:
            return
        assert run is not None
        run.attempts.pop((event.stage_index, event.index), None)
        span, r, step = pair[0], event.result, event.step
        attributes: dict[str, Any] = {"shipyard.step": step.name, "shipyard.step.kind": step.kind,
                                      "shipyard.status": str(r.status)}  # fmt: skip
        if r.attempts != 1:
            attributes["shipyard.attempts"] = r.attempts
        if r.exit_code is not None:
            attributes["shipyard.exit_code"] = r.exit_code
        if r.warning:
            attributes["shipyard.warning"] = True
        span.set_attributes(attributes)
        if r.error:
            self._end(span, str(r.status), r.error)
        span.end()

    @hookimpl
    def shipyard_host_finished(self, event: HostFinished) -> None:
        """A span per action of a fleet step on a host, under its step's (or attempt's) span."""
        run = self._runs.get(id(event.deployment))
        key = (event.stage_index, event.index)
        pair = run.steps.get(key) if run else None
        if pair is None:
            return
        assert run is not None
        parent = run.attempts.get(key) or pair[0]
        name = f"host {event.host}" + ("" if event.action == "apply" else f" ({event.action})")
        start, end = int(event.started_at * 1e9), int(event.finished_at * 1e9)
        span = self._child(name, parent, start=start)
        attributes: dict[str, Any] = {
            "shipyard.host": event.host, "server.address": event.address,
            "server.port": event.port, "shipyard.host.group": event.group,
            "shipyard.host.action": event.action, "shipyard.attempt": event.attempt,
        }  # fmt: skip
        if event.region:
            attributes["shipyard.region"] = event.region
        if event.exit_code is not None:
            attributes["shipyard.exit_code"] = event.exit_code
        span.set_attributes(attributes)
        self._end(span, event.status, event.error)
        span.end(end_time=end)

    @hookimpl
    def shipyard_stage_finished(self, event: StageFinished) -> None:
        run = self._runs.get(id(event.deployment))
        pair = run.stages.pop(event.index, None) if run else None
        if pair is not None:
            self._end(pair[0], str(event.status), None)
            pair[0].end()

    @hookimpl
    def shipyard_deployment_finished(self, event: DeploymentFinished) -> None:
        run = self._runs.pop(id(event.deployment), None)
        if run is None:
            return
        for span, _ in [*run.steps.values(), *run.stages.values()]:  # a cancel's leftovers
            span.end()
        self._end(run.span, str(event.status), event.error)
        if str(event.status) == "failed":
            # Open until we know whether an automatic rollback follows (its event goes here).
            run.finished_ns = time.time_ns()
            self._failed[run.deployment.id] = run
        else:
            run.span.end()

    @hookimpl
    def shipyard_rollback_started(self, event: RollbackStarted) -> None:
        run = self._failed.get(event.deployment.id)
        if run is not None:
            run.span.add_event(
                "rollback",
                {
                    "shipyard.rollback.target": event.target,
                    "shipyard.rollback.reason": event.reason,
                },
            )
            run.finished_ns = time.time_ns()

    @hookimpl
    def shipyard_deployment_suspended(self, event: Any) -> None:
        run = self._runs.pop(id(event.deployment), None)
        if run is None:
            return
        run.span.add_event(
            "approval requested",
            {"shipyard.stage": event.stage.name, "shipyard.approval.expires_at": event.expires_at},
        )
        self._end(run.span, "awaiting_approval", None)
        run.span.end()

    @hookimpl
    def shipyard_approval_decided(self, event: Any) -> None:
        attrs = {
            "shipyard.stage": str(event.stage),
            "shipyard.approval.decision": str(event.decision),
            "shipyard.approval.user": str(event.user),
            "shipyard.approval.outcome": str(event.outcome),
        }
        self._decisions.setdefault(event.deployment.id, []).append((attrs, time.time_ns()))


def _last_message_handler(logging: Any) -> Any:
    """A logging handler keeping the last message of the OpenTelemetry loggers in ``last``."""

    class LastMessage(logging.Handler):  # type: ignore[misc]  # logging is given as Any
        last: str | None = None

        def emit(self, record: Any) -> None:
            if self.last is not None:  # the first message of a failed export says why
                return
            try:
                self.last = record.getMessage()
            except Exception:  # a bad format string in a log call: keep the template
                self.last = str(record.msg)

    return LastMessage(logging.WARNING)


def _guarded_exporter(inner: Any, owner: Tracing) -> Any:
    """``inner`` (the OTLP exporter) behind a guard: after a failed export, batches are dropped
    (and counted) for :data:`COOL_DOWN` seconds, and the final flush is not even tried."""
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    class GuardedExporter(SpanExporter):
        def __init__(self) -> None:
            self.inner = inner
            #: Spans that could not be sent (failed or dropped).
            self.lost = 0
            self.closing = False
            #: Spans of the export in progress.
            self.sending = 0
            #: What the exporter said of the last failure.
            self.why: str | None = None
            self._failed_at: float | None = None

        def export(self, spans: Any) -> SpanExportResult:
            failed_at = self._failed_at
            if failed_at is not None and (self.closing or time.monotonic() - failed_at < COOL_DOWN):
                self.lost += len(spans)
                return SpanExportResult.FAILURE
            owner._log.last = None
            self.sending = len(spans)
            try:
                result: SpanExportResult = self.inner.export(spans)
            except Exception as exc:  # the exporter's bug must not kill the export thread
                owner._log.last = f"{type(exc).__name__}: {exc}"
                result = SpanExportResult.FAILURE
            self.sending = 0
            if result is SpanExportResult.SUCCESS:
                self._failed_at = None
            else:
                self.lost += len(spans)
                self._failed_at = time.monotonic()
                self.why = owner._log.last or self.why
            return result

        def shutdown(self) -> None:
            self.inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return True

    return GuardedExporter()
