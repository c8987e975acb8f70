"""The ``health_check`` step against real HTTP(S) servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import copy
import itertools
import os
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import shipyard as sy
from http_servers import CLOSE
from http_servers import HANG
from http_servers import LoopbackServer
from http_servers import Reply
from http_servers import always
from http_servers import healthy_after
from http_servers import no_leftover_threads  # noqa: F401 - autouse fixture
from http_servers import redirect
from http_servers import statuses
from http_servers import tls_pair
from http_servers import unused_port
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from shipyard.plugins.healthcheck import HealthCheckStep
from shipyard.sdk import ProbeReport
from shipyard.sdk import probe_until_healthy


def probe(spec: HealthCheckStep, url: str | None = None) -> tuple[ProbeReport, list[str]]:
    lines: list[str] = []
    report = asyncio.run(probe_until_healthy(spec, url, lines.append))
    return report, lines


def probe_fails(spec: HealthCheckStep, url: str | None = None) -> tuple[str, float, list[str]]:
    """Run a check that must fail: (message, seconds it took, log lines)."""
    lines: list[str] = []
    start = time.monotonic()
    with pytest.raises(sy.HealthCheckFailed) as info:
        asyncio.run(probe_until_healthy(spec, url, lines.append))
    return str(info.value), time.monotonic() - start, lines


# -- becoming healthy -----------------------------------------------------------------------------


def test_service_that_becomes_healthy_after_a_while():
    with LoopbackServer(healthy_after(0.8)) as server:
        spec = sy.health_check(server.url("/healthz"), timeout=10, interval=0.2)
        start = time.monotonic()
        report, lines = probe(spec)
    assert report.healthy
    assert time.monotonic() - start >= 0.8
    assert report.attempts == len(lines) == len(server.requests) >= 3
    assert lines[0].startswith("attempt 1: HTTP 503 Service Unavailable (expected 200) (")
    assert lines[-1].startswith(f"attempt {report.attempts}: HTTP 200 OK in ")
    assert lines[-1].endswith("healthy")
    # Every attempt line says how long it took.
    assert all("ms" in line or "s)" in line for line in lines)


def test_500_then_200():
    with LoopbackServer(statuses(500, then=200)) as server:
        report, lines = probe(sy.health_check(server.url("/"), timeout=5, interval=0.1))
    assert report.healthy
    assert report.attempts == 2
    assert "HTTP 500 Internal Server Error (expected 200)" in lines[0]
    assert "HTTP 200 OK" in lines[1]


def test_backoff_starts_short_and_is_capped_at_interval():
    with LoopbackServer(healthy_after(1.6)) as server:
        probe(sy.health_check(server.url("/"), timeout=10, interval=0.4))
    arrivals = [r.at for r in server.requests]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Exponential from 50 ms: the first pauses are far below the interval...
    assert gaps[0] < 0.2
    # ...and no pause exceeds the interval (plus generous scheduling slack).
    assert max(gaps) < 0.4 + 0.3
    # With a fixed 0.4 s pause there would be at most 5 attempts in 1.6 s.
    assert len(arrivals) >= 6


@pytest.mark.parametrize(
    ("expect", "status"),
    [
        pytest.param(range(200, 300), 204, id="range"),
        pytest.param({200, 204}, 204, id="set"),
        pytest.param([301, 302], 302, id="list-of-redirects"),
        pytest.param(503, 503, id="one-status"),
    ],
)
def test_expect_forms(expect: Any, status: int):
    with LoopbackServer(always(Reply(status, "x"))) as server:
        report, _ = probe(sy.health_check(server.url("/"), expect=expect, timeout=2))
    assert report.healthy
    assert report.last.status == status


def test_contains_checks_the_body():
    with LoopbackServer(always(Reply(200, '{"status": "degraded"}'))) as server:
        message, _, lines = probe_fails(
            sy.health_check(server.url("/"), timeout=0.6, interval=0.1, contains='"status": "ok"')
        )
        ok, _ = probe(sy.health_check(server.url("/"), timeout=2, contains="degraded"))
    assert ok.healthy
    assert 'HTTP 200 but the body does not contain \'"status": "ok"\'' in message
    assert 'body: \'{"status": "degraded"}\'' in message
    assert all("does not contain" in line for line in lines)


def test_method_and_headers_are_sent():
    with LoopbackServer(always(200)) as server:
        probe(
            sy.health_check(
                server.url("/ping"), method="head", headers={"X-Probe": "shipyard"}, timeout=2
            )
        )
    (req,) = server.requests
    assert req.method == "HEAD"
    assert req.path == "/ping"
    assert req.headers["x-probe"] == "shipyard"


def test_one_client_per_check_reuses_its_connection():
    with LoopbackServer(statuses(503, 503, 503, then=200)) as server:
        probe(sy.health_check(server.url("/"), timeout=5, interval=0.05))
        connections = server.connections_opened
    assert len(server.requests) == 4
    assert connections == 1


# -- failures -------------------------------------------------------------------------------------


def test_hanging_server_request_timeout_fires_and_deadline_holds():
    with LoopbackServer(always(HANG)) as server:
        spec = sy.health_check(server.url("/healthz"), timeout=1.5, request_timeout=0.4)
        message, took, lines = probe_fails(spec)
    # The correctness bound: the deadline holds (plus generous slack), never a hang.
    assert 1.4 <= took < 1.5 + 2
    # The per-attempt timeout let several attempts happen within the deadline.
    assert len(lines) >= 3
    assert all("no answer within" in line for line in lines)
    assert message.startswith(
        f"GET {server.url('/healthz')} not healthy after {len(lines)} attempts in 1."
    )
    assert "no answer within" in message
    assert "accepted the connection but did not answer" in message


def test_hanging_server_default_request_timeout_is_capped_by_the_deadline():
    with LoopbackServer(always(HANG)) as server:
        message, took, _lines = probe_fails(sy.health_check(server.url("/"), timeout=1))
    assert took < 1 + 2
    assert "no answer within" in message


def test_server_that_closes_connections():
    with LoopbackServer(always(CLOSE)) as server:
        message, _, lines = probe_fails(sy.health_check(server.url("/"), timeout=0.8, interval=0.1))
    assert "the server closed the connection without answering" in message
    assert "accepts connections but drops them" in message
    assert len(lines) >= 2


def test_nothing_listening():
    port = unused_port()
    message, _, _ = probe_fails(sy.health_check(f"http://127.0.0.1:{port}/up", timeout=0.5))
    first = message.splitlines()[0]
    assert first.startswith(f"GET http://127.0.0.1:{port}/up not healthy after ")
    assert first.endswith(": connection refused")
    assert f"nothing listens on 127.0.0.1:{port}; did the service start" in message


def test_failure_shows_last_status_body_and_last_connection_error():
    behaviour = statuses(
        Reply(503, "database   migrations\nrunning"), Reply(503, "database not ready"), then=CLOSE
    )
    with LoopbackServer(behaviour) as server:
        message, _took, lines = probe_fails(
            sy.health_check(server.url("/h"), timeout=0.7, interval=0.1)
        )
    head, *details = message.splitlines()
    n = len(lines)
    assert head.startswith(f"GET {server.url('/h')} not healthy after {n} attempts in ")
    assert head.endswith("s (timeout 0.7s): the server closed the connection without answering")
    assert "  last HTTP answer: HTTP 503 Service Unavailable (expected 200) (attempt 2)" in details
    assert "  body: 'database not ready'" in details
    assert any(d.startswith("  hint: ") for d in details)
    (outcomes,) = [d for d in details if d.startswith("  outcomes: ")]
    assert sorted(outcomes.removeprefix("  outcomes: ").split(", ")) == sorted(
        [f"{n - 2}x connection closed", "2x HTTP 503"]
    )


def test_long_body_is_cut_in_the_failure():
    with LoopbackServer(always(Reply(500, "x" * 5000))) as server:
        message, _, _ = probe_fails(sy.health_check(server.url("/"), timeout=0.3))
    body_line = next(line for line in message.splitlines() if line.startswith("  body: "))
    assert body_line == "  body: '" + "x" * 200 + "...'"


# -- redirects and TLS ----------------------------------------------------------------------------


def test_redirect_is_not_followed_by_default():
    with LoopbackServer(redirect("/landing", target="/landing")) as server:
        message, _, _ = probe_fails(sy.health_check(server.url("/healthz"), timeout=0.4))
        followed, _ = probe(
            sy.health_check(server.url("/healthz"), timeout=2, follow_redirects=True)
        )
    assert "HTTP 302 Found (expected 200), redirect to /landing" in message
    assert "pass follow_redirects=True" in message
    assert followed.healthy
    assert followed.last.body == "landed"


@pytest.fixture(scope="module")
def tls() -> Iterator[tuple[Any, ssl.SSLContext]]:
    return tls_pair()


def test_https_with_a_private_ca(tls: tuple[Any, ssl.SSLContext], tmp_path: Path):
    ca, server_ctx = tls
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with LoopbackServer(always(200), tls=server_ctx) as server:
        url = server.url("/healthz")
        ok, _ = probe(sy.health_check(url, timeout=3, verify=str(bundle)))
        ok_path, _ = probe(sy.health_check(url, timeout=3, verify=bundle))
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        ok_ctx, _ = probe(sy.health_check(url, timeout=3, verify=client_ctx))
        unverified, _ = probe(sy.health_check(url, timeout=3, verify=False))
        message, _, _ = probe_fails(sy.health_check(url, timeout=0.4))
    assert ok.healthy
    assert ok_path.healthy
    assert ok_ctx.healthy
    assert unverified.healthy
    assert "TLS certificate verification failed" in message
    assert "pass verify='/path/to/ca.pem'" in message


def test_https_url_for_a_plain_http_server():
    with LoopbackServer(always(200)) as server:
        message, _, _ = probe_fails(
            sy.health_check(server.url("/").replace("http:", "https:"), timeout=0.4, verify=False)
        )
    assert "TLS" in message


def test_missing_ca_bundle(tmp_path: Path):
    missing = tmp_path / "nope.pem"
    message, _, _ = probe_fails(sy.health_check("https://127.0.0.1:9/", verify=str(missing)))
    assert f"the CA bundle {str(missing)!r} given as verify= does not exist" in message


# -- reuse by other steps -------------------------------------------------------------------------


def test_url_for_points_the_spec_at_another_base():
    assert sy.health_check("/healthz").url_for("http://127.0.0.1:8081") == (
        "http://127.0.0.1:8081/healthz"
    )
    spec = sy.health_check("http://example.test/status?full=1")
    assert spec.url_for("http://127.0.0.1:8082") == "http://127.0.0.1:8082/status?full=1"
    assert sy.health_check("http://example.test").url_for("http://10.0.0.1:80") == (
        "http://10.0.0.1:80/"
    )


def test_probe_with_url_override_like_docker_service():
    spec = sy.health_check("/healthz", timeout=3)
    with LoopbackServer(always(200)) as server:
        report, _lines = probe(spec, spec.url_for(server.base))
    assert report.healthy
    assert server.requests[0].path == "/healthz"
    message, _, _ = probe_fails(spec)
    assert "is not an http:// or https:// URL" in message


# -- definition errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        pytest.param({"url": "ftp://x/"}, "is not an http:// or https:// URL", id="scheme"),
        pytest.param({"url": ""}, "url must be a non-empty string", id="empty-url"),
        pytest.param({"expect": 99}, "expect must be an HTTP status", id="expect-range"),
        pytest.param({"expect": []}, "expect must be an HTTP status", id="expect-empty"),
        pytest.param({"expect": True}, "expect must be an HTTP status", id="expect-bool"),
        pytest.param({"expect": "200"}, "expect must be an HTTP status", id="expect-str"),
        pytest.param({"timeout": 0}, "timeout must be a positive number", id="timeout"),
        pytest.param({"interval": -1}, "interval must be a positive number", id="interval"),
        pytest.param(
            {"request_timeout": 0}, "request_timeout must be a positive", id="req-timeout"
        ),
        pytest.param({"method": "FETCH"}, "method must be one of", id="method"),
        pytest.param({"contains": ""}, "contains must be a non-empty string", id="contains"),
        pytest.param({"method": "HEAD", "contains": "ok"}, "HEAD answers have none", id="head"),
        pytest.param({"headers": {"X": 1}}, "headers must map strings", id="headers"),
        pytest.param({"verify": 3}, "verify must be True, False", id="verify"),
        pytest.param({"follow_redirects": "yes"}, "follow_redirects must be", id="redirects"),
        pytest.param(
            {"intervall": 2}, "unknown option 'intervall'; did you mean 'interval'?", id="typo"
        ),
    ],
)
def test_definition_errors(kwargs: dict[str, Any], fragment: str):
    kwargs = {"url": "http://127.0.0.1/healthz", **kwargs}
    with pytest.raises(sy.PipelineDefinitionError, match="health_check step") as info:
        sy.health_check(**kwargs)
    assert fragment in str(info.value)


def test_describe_and_options():
    spec = sy.health_check(
        "http://127.0.0.1:8080/healthz", expect=range(200, 300), contains="ok", timeout=30,
        interval=2, follow_redirects=True,
    )  # fmt: skip
    assert spec.kind == "health_check"
    assert spec.timeout is None  # the check enforces its own deadline
    assert spec.describe() == (
        "GET http://127.0.0.1:8080/healthz expect 200-299 containing 'ok' within 30s "
        "(interval <= 2s)  (follow redirects)"
    )
    assert spec.probe.expect == range(200, 300)
    assert spec.probe.deadline == 30.0
    assert spec.probe.interval == 2.0
    assert (
        sy.health_check("http://h/", expect={204, 200})
        .describe()
        .startswith("GET http://h/ expect 200, 204 ")
    )


# -- inside a deployment --------------------------------------------------------------------------


def test_deploy_with_a_health_check_records_every_attempt(shipyarder: Any):
    with LoopbackServer(healthy_after(0.5)) as server:
        shipyarder.makepipelines(
            f"""
            import shipyard as sy

            @sy.pipeline
            def web(d):
                return [sy.stage("verify", sy.health_check({server.url("/healthz")!r}, timeout=10, interval=0.2))]
            """
        )
        result = shipyarder.run("deploy", "web", "1.0", "-e", "prod")
    assert result.exit_code == 0, result
    result.assert_outcomes(succeeded=1)
    result.fnmatch_lines(["*attempt 1: HTTP 503 Service Unavailable (expected 200)*", "*: healthy"])
    logs = shipyarder.run("logs", str(result.deployment["id"]))
    logs.fnmatch_lines(["*attempt 1: HTTP 503*", "*HTTP 200 OK in *: healthy"])


def test_deploy_failure_message_and_masked_secrets(shipyarder: Any):
    token = "s3cr3t-token-value"
    with LoopbackServer(always(Reply(503, f"token {token} rejected"))) as server:
        shipyarder.makepipelines(
            f"""
            import shipyard as sy

            @sy.pipeline
            def web(d):
                url = {server.url("/healthz")!r} + "?token=" + sy.secret("HC_TOKEN")
                check = sy.health_check(
                    url, timeout=0.5, interval=0.1,
                    headers={{"Authorization": "Bearer " + sy.secret("HC_TOKEN")}},
                )
                return [sy.stage("verify", check)]
            """
        )
        result = shipyarder.run("deploy", "web", "1.0", "-e", "prod", env={"HC_TOKEN": token})
    assert result.exit_code == 1, result
    # The server saw the real values...
    req = server.requests[0]
    assert req.path == f"/healthz?token={token}"
    assert req.headers["authorization"] == f"Bearer {token}"
    # ...nothing else did.
    doc = result.deployment
    error = doc["stages"][0]["steps"][0]["error"]
    assert error.startswith(f"GET {server.url('/healthz')}?token=*** not healthy after ")
    assert "HTTP 503 Service Unavailable (expected 200)" in error
    assert "body: 'token *** rejected'" in error
    logs = shipyarder.run("logs", str(doc["id"]))
    for text in (result.output, logs.output, str(doc)):
        assert token not in text
    assert "token *** rejected" in result.output


def test_health_check_reads_no_http_client_until_it_runs(tmp_path: Path):
    """``import shipyard``, building checks and ``plan`` import neither httpx nor tenacity."""
    (tmp_path / "pipelines.py").write_text(
        textwrap.dedent(
            """
            import shipyard as sy

            @sy.pipeline
            def web(d):
                return [sy.stage("verify", sy.health_check("http://127.0.0.1:1/healthz"))]
            """
        )
    )
    code = textwrap.dedent(
        """
        import sys
        from shipyard._cli import cli
        try:
            cli(["plan", "web", "1.0", "-e", "prod"], standalone_mode=False)
            cli(["list"], standalone_mode=False)
        finally:
            heavy = sorted(m for m in ("httpx", "tenacity", "httpcore") if m in sys.modules)
            print("HEAVY", heavy)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    env["SHIPYARD_HISTORY"] = str(tmp_path / "h.db")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert "health_check: GET http://127.0.0.1:1/healthz expect 200" in out.stdout, out
    assert "HEAVY []" in out.stdout, out


# -- secrets in response bodies -------------------------------------------------------------------


@given(
    prefix=st.integers(min_value=0, max_value=1500),
    filler=st.sampled_from(["x", " ", "é", "\n"]),
    cut_body=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_body_excerpt_never_shows_a_piece_of_a_secret(prefix: int, filler: str, cut_body: bool):
    from shipyard import _secrets
    from shipyard.sdk import body_excerpt

    secret = "Sup3r-S3cret-Value-0042"
    # The masking table is process-wide: restore it, as the shipyarder fixture does.
    saved = {
        name: copy.copy(getattr(_secrets, name))
        for name in ("_values", "_state", "_pattern")
        if hasattr(_secrets, name)
    }
    try:
        _secrets.register([secret])
        body = (filler * prefix + secret + "tail" * 50).encode()
        text = body_excerpt(body, cut_body)
    finally:
        for name, value in saved.items():
            setattr(_secrets, name, value)
    pieces = {secret[i : i + 6] for i in range(len(secret) - 5)}
    assert not any(piece in text for piece in pieces), text
    assert len(text) <= 200 + 3
