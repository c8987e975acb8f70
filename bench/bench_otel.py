"""Figure 13: what tracing (``shipyard.plugins.otel``, issue #19) costs per step.

Marginal cost per no-op ``python`` step, as in figure 4 (bench_steps.py): (median wall time of a
deployment of 1,000 steps - that of 100 steps) / 900, whole ``shipyard deploy`` processes. Three
configurations, run round-robin:

- ``disabled``: ``-p no:otel``, the plugin not even loaded: the baseline;
- ``off``: the plugin loaded, no ``OTEL_*`` endpoint (everyone's default);
- ``on``: spans exported over OTLP/HTTP to a loopback collector in this process that answers
  200 to every export (it reads the body, decodes nothing).

- 13a: on - off, per step: <= 0.1 ms (a step span, made in one piece as the step ends, and
  TRACEPARENT set; no attempt span, as the steps are not retried);
- 13b: off - disabled, per step: zero, i.e. within the noise of the measurement (<= 0.01 ms).

The floor of 13a, for context: bench/floor_otel_spans.py, the OpenTelemetry SDK alone starting,
ending and exporting the same spans to the same collector (its marginal cost per span).

Run alone: ``python bench/bench_otel.py [RUNS]``.
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from _common import BENCH
from _common import Options
from _common import child_env
from _common import cpu_ms
from _common import figure
from _common import interleaved
from _common import median
from _common import python
from _common import run_process
from _common import spread
from _common import tmpdir
from _common import walls_ms
from bench_steps import LARGE
from bench_steps import SMALL
from bench_steps import deploy_argv
from bench_steps import steps_pipelines


class _Sink(BaseHTTPRequestHandler):
    """A collector that accepts every export."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()


def _per_step(ms: dict[str, list[float]], name: str) -> float:
    return (median(ms[f"{name}{LARGE}"]) - median(ms[f"{name}{SMALL}"])) / (LARGE - SMALL)


def otel_steps(opts: Options) -> dict[str, Any]:
    """Figure 13: tracing per no-op step: on <= 0.1 ms more than off; off = not loaded."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    plain = {k: v for k, v in child_env().items() if not k.startswith(("OTEL_", "TRACEPARENT"))}
    envs = {
        "disabled": plain,
        "off": plain,
        "on": {**plain, "OTEL_EXPORTER_OTLP_ENDPOINT": url, "OTEL_SERVICE_NAME": "bench"},
    }
    try:
        with tmpdir("otel") as tmp_:
            tmp = Path(tmp_)
            commands = {}
            for n in (SMALL, LARGE):
                f = tmp / f"pipelines_{n}.py"
                f.write_text(steps_pipelines("python", n))
                for name, env in envs.items():
                    argv = deploy_argv(f, tmp / f"history_{name}_{n}.db")
                    if name == "disabled":
                        argv = [argv[0], "-p", "no:otel", *argv[1:]]
                    commands[f"{name}{n}"] = lambda argv=argv, env=env: run_process(
                        argv, cwd=tmp, env=env
                    )
                floor = [python(), str(BENCH / "floor_otel_spans.py"), str(n), f"{url}/v1/traces"]
                commands[f"floor{n}"] = lambda argv=floor: run_process(argv, cwd=tmp, env=plain)
            runs = interleaved(commands, runs=opts.runs, warmup=1)
    finally:
        server.shutdown()
        server.server_close()
    ms = {k: walls_ms(v) for k, v in runs.items()}
    cpu = cpu_ms(runs)
    per = {name: _per_step(ms, name) for name in (*envs, "floor")}
    details: dict[str, Any] = {k: spread(v) for k, v in ms.items()}
    details["cpu_ms_median"] = cpu
    details["wall_ms_per_step"] = {k: round(v, 4) for k, v in per.items()}
    details["cpu_ms_per_step"] = {
        name: round((cpu[f"{name}{LARGE}"] - cpu[f"{name}{SMALL}"]) / (LARGE - SMALL), 4)
        for name in (*envs, "floor")
    }
    return {
        "figures": [
            figure(
                "13a",
                "tracing on: extra cost per no-op python step (spans exported over OTLP/HTTP)",
                measured=per["on"] - per["off"],
                unit="ms/step",
                floor=per["floor"],
                floor_label="OpenTelemetry SDK alone: a span started, ended, exported (per span)",
                max_value=0.1,
                details=details,
            ),
            figure(
                "13b",
                "tracing off: extra cost per no-op python step (vs the plugin not loaded)",
                measured=per["off"] - per["disabled"],
                unit="ms/step",
                max_value=0.01,
                details=details,
            ),
        ]
    }


if __name__ == "__main__":
    import json

    result = otel_steps(Options(runs=int(sys.argv[1]) if len(sys.argv) > 1 else 10))
    for row in result["figures"]:
        print(f"{row['id']}  {row['figure']}: {row['measured']:.4f} {row['unit']} "
              f"(target {row['target']}): {'PASS' if row['pass'] else 'FAIL'}")  # fmt: skip
    print(json.dumps(result["figures"][0]["details"]["wall_ms_per_step"]))
    print(json.dumps(result["figures"][0]["details"]["cpu_ms_per_step"]))
