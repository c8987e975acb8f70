"""One real Prometheus per test session, scraping a gauge the tests control.

Debian's ``/usr/bin/prometheus`` runs on a free loopback port with a temporary storage folder
and a 1 s scrape of a loopback target: a ``prometheus_client`` registry served over HTTP by a
thread of this process. The fixture waits, by polling the query API, until the first sample of
every series set before the start is queryable (a few seconds), and fails — never skips — when
Prometheus cannot start.

::

    def test_x(prometheus_server):
        prometheus_server.errors.labels(version="1.0").set(0.01)
        ...sy.prometheus(prometheus_server.url, 'shipyard_test_errors{version="1.0"}')...
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler
from wsgiref.simple_server import WSGIServer
from wsgiref.simple_server import make_server

import pytest
from http_servers import unused_port

PROMETHEUS = "/usr/bin/prometheus"
#: The versions whose error rate is set before Prometheus starts (all in the first scrape).
SERIES = {"good": 0.01, "bad": 0.5, "meh": 0.07, "a": 0.02, "b": 0.03}


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class PrometheusServer:
    url: str
    errors: Any
    process: subprocess.Popen[bytes]

    def query(self, promql: str) -> dict[str, Any]:
        q = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=5) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
        return doc


def _start() -> Iterator[PrometheusServer]:
    from prometheus_client import CollectorRegistry
    from prometheus_client import Gauge
    from prometheus_client import make_wsgi_app

    if not os.access(PROMETHEUS, os.X_OK):
        pytest.fail(f"{PROMETHEUS} is missing: install Debian's prometheus package")
    registry = CollectorRegistry()
    errors = Gauge(
        "shipyard_test_errors", "error rate of a version", ["version"], registry=registry
    )
    for version, value in SERIES.items():
        errors.labels(version=version).set(value)
    target = make_server("127.0.0.1", 0, make_wsgi_app(registry), WSGIServer, handler_class=_Quiet)
    thread = threading.Thread(target=target.serve_forever, daemon=True)
    thread.start()
    folder = tempfile.mkdtemp(prefix="shipyard-prom-")
    port = unused_port()
    config = os.path.join(folder, "prometheus.yml")
    with open(config, "w") as f:
        f.write(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: shipyard\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target.server_port}']\n"
        )
    log = open(os.path.join(folder, "prometheus.log"), "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={folder}/data",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    server = PrometheusServer(f"http://127.0.0.1:{port}", errors, proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.flush()
                with open(os.path.join(folder, "prometheus.log"), "rb") as f:
                    out = f.read().decode("utf-8", "replace")[-2000:]
                pytest.fail(f"prometheus exited with {proc.returncode}: {out}")
            try:
                doc = server.query("shipyard_test_errors")
                if len(doc["data"]["result"]) >= len(SERIES):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("prometheus did not scrape its first sample within 60 s")
            time.sleep(0.1)  # polling the API, not waiting blindly
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        target.shutdown()
        target.server_close()
        thread.join(5)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def prometheus_server() -> Iterator[PrometheusServer]:
    """A real Prometheus scraping ``shipyard_test_errors{version=...}`` every second."""
    yield from _start()
