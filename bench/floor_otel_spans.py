"""The floor of figure 13a: the OpenTelemetry SDK alone doing what tracing adds to a step.

python bench/floor_otel_spans.py N URL

A tracer set up as ``shipyard.plugins.otel`` sets up its own (a resource, a batch processor, the
OTLP/HTTP exporter to ``URL``); a root span; ``N`` child spans with a step's attributes, each
started and ended; then everything exported before the process exits. The marginal cost per span
(N = 1,000 against N = 100) is what any tracing of a step costs, whoever does it.
"""

from __future__ import annotations

import sys


def main() -> None:
    n, url = int(sys.argv[1]), sys.argv[2]
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "floor"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url, timeout=10)))
    tracer = provider.get_tracer("floor", "0")
    root = tracer.start_span("deploy")
    parent = trace.set_span_in_context(root)
    for i in range(n):
        span = tracer.start_span(f"step noop {i}", context=parent)
        span.set_attributes({"shipyard.step": f"noop {i}", "shipyard.step.kind": "python",
                             "shipyard.status": "succeeded"})  # fmt: skip
        span.end()
    root.end()
    provider.shutdown()


if __name__ == "__main__":
    main()
