"""The ``analysis`` step: the verdict table against a reference model, the condition helpers,
real deployments with Python, HTTP JSON and Prometheus metrics."""

from __future__ import annotations

import itertools
import json
import math
import sqlite3
from typing import Any

import pytest
import shipyard as sy
from http_servers import LoopbackServer
from http_servers import Reply
from http_servers import always
from http_servers import no_leftover_threads  # noqa: F401 - autouse fixture
from http_servers import redirect
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from prometheus_server import prometheus_server  # noqa: F401 - session fixture
from shipyard.plugins import analysis as an

OUTCOMES = ["successful", "failed", "inconclusive", "error", "fatal"]


# -- the verdict, against a reference model written independently ---------------------------------


def reference_verdict(outcomes, count, failure_limit, inconclusive_limit, error_limit):
    """The rules of the docs, applied one prefix at a time."""
    for end in range(1, len(outcomes) + 1):
        seen = outcomes[:end]
        last = seen[-1]
        if last == "fatal":
            return "error"
        if last == "failed" and seen.count("failed") > failure_limit:
            return "failed"
        if last == "inconclusive" and seen.count("inconclusive") > inconclusive_limit:
            return "inconclusive"
        run = 0
        for o in reversed(seen):
            if o != "error":
                break
            run += 1
        if run > error_limit:
            return "error"
        if end == count:
            return "successful"
    return None


@settings(max_examples=2000, deadline=None)
@given(
    outcomes=st.lists(st.sampled_from(OUTCOMES), max_size=12),
    count=st.integers(1, 10),
    failure_limit=st.integers(0, 4),
    inconclusive_limit=st.integers(0, 4),
    error_limit=st.integers(0, 5),
)
def test_verdict_matches_the_reference_model(
    outcomes, count, failure_limit, inconclusive_limit, error_limit
):
    got = an.verdict(
        outcomes, count=count, failure_limit=failure_limit,
        inconclusive_limit=inconclusive_limit, consecutive_error_limit=error_limit,
    )  # fmt: skip
    assert got == reference_verdict(outcomes, count, failure_limit, inconclusive_limit, error_limit)


def test_verdict_examples():
    v = an.verdict
    assert v(["failed"], count=5) == "failed"  # fail fast
    assert v(["failed", "successful"], count=2, failure_limit=1) == "successful"
    assert v(["error"] * 4, count=10) is None
    assert v(["error"] * 5, count=10) == "error"
    assert v(["error"] * 4 + ["successful"] + ["error"] * 4, count=10) is None  # reset
    assert v(["fatal"], count=3, consecutive_error_limit=10) == "error"
    assert v(["inconclusive", "inconclusive"], count=5, inconclusive_limit=1) == "inconclusive"
    assert v([], count=1) is None


def reference_classify(value, success, failure):
    """The table of the docs: (failure answer, success answer) -> outcome; the failure
    condition is asked first, and the success condition only if that one did not decide."""

    def ask(cond):
        if cond is None:
            return "absent"
        r = cond(value)
        return "unknown" if r is an.UNKNOWN else bool(r)

    try:
        f = ask(failure)
        if f == "unknown":
            return "inconclusive"
        if f is True:
            return "failed"
        s = ask(success)
    except Exception:
        return "error"
    if s == "unknown":
        return "inconclusive"
    table = {
        ("absent", True): "successful", ("absent", False): "failed",
        (False, "absent"): "successful", (False, True): "successful",
        (False, False): "inconclusive", ("absent", "absent"): "inconclusive",
    }  # fmt: skip
    return table[(f, s)]


def _boom(v: Any) -> bool:
    raise ValueError("no")


CONDITIONS = [None, sy.below(0.5), sy.above(0.5), sy.between(0.2, 0.8), sy.equals(1),
              lambda v: v > 0.3, _boom]  # fmt: skip
VALUES = [None, math.nan, [0.1, 0.2], 0.1, 0.5, 0.9, 1, "1", "0.4", "text", True, {"a": 1},
          math.inf]  # fmt: skip


@settings(max_examples=1500, deadline=None)
@given(
    value=st.sampled_from(VALUES) | st.floats(allow_nan=True) | st.none(),
    success=st.sampled_from(CONDITIONS),
    failure=st.sampled_from(CONDITIONS),
)
def test_classify_matches_the_table(value, success, failure):
    outcome, error = an.classify(value, success, failure)
    assert outcome == reference_classify(value, success, failure)
    assert (error is not None) == (outcome == "error")


def test_a_raising_condition_is_an_error_quoting_the_value():
    outcome, error = an.classify(None, lambda v: v < 0.1, None)
    assert outcome == "error"
    assert "TypeError" in error
    assert "None (no data)" in error


def test_worst_of_and_dry_run():
    assert an.worst([("successful", False), ("failed", False)]) == "failed"
    assert an.worst([("inconclusive", False), ("error", False)]) == "error"
    assert an.worst([("successful", False), ("failed", True)]) == "successful"
    assert an.worst([("failed", True)]) == "successful"
    assert an.worst([]) == "successful"


# -- conditions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cond", [sy.below(1), sy.above(1), sy.between(0, 1), sy.equals(1)])
@pytest.mark.parametrize("value", [None, math.nan, [1.0], [], {"a": 1}, "nope", True])
def test_helpers_cannot_judge_none_nan_lists(cond, value):
    assert cond(value) is an.UNKNOWN


def test_helper_reprs_and_answers():
    assert [repr(c) for c in (sy.below(0.05), sy.above(3), sy.between(0.9, 1.0), sy.equals("ok"))] == [
        "below(0.05)", "above(3)", "between(0.9, 1.0)", "equals('ok')"]  # fmt: skip
    assert sy.below(0.05)(0.01) is True
    assert sy.below(0.05)(0.05) is False
    assert [sy.between(1, 2)(v) for v in (1, 2, 2.5)] == [True, True, False]
    assert [sy.equals("ok")(v) for v in ("ok", "ko")] == [True, False]
    assert sy.above(1)("2.5") is True  # a numeric text (an HTTP body) is a number
    with pytest.raises(sy.PipelineDefinitionError, match="lo must not exceed hi"):
        sy.between(2, 1)
    with pytest.raises(sy.PipelineDefinitionError, match="threshold must be a number"):
        sy.below("x")


# -- deployments ----------------------------------------------------------------------------------

PIPELINES = """
import os
import shipyard as sy

VALUES = [float(v) if v not in ("none", "boom") else v for v in os.environ.get("VALUES", "0.01").split(",")]
calls = []

def measure():
    v = VALUES[min(len(calls), len(VALUES) - 1)]
    calls.append(v)
    if v == "boom":
        raise RuntimeError("provider down")
    return None if v == "none" else v

@sy.pipeline
def web(d):
    return [sy.stage("verify", sy.analysis(
        sy.metric("error rate", sy.python_metric(measure), success=sy.below(0.05),
                  failure=sy.above(0.1), interval=0.05, count=int(os.environ.get("COUNT", "3")),
                  failure_limit=int(os.environ.get("FLIMIT", "0"))),
        on_inconclusive=os.environ.get("ON_INC", "fail")))]
"""


def artifacts(shipyarder: Any) -> dict[str, Any]:
    """The latest deployment's analysis, by ``analysis:<metric>``, as ``show --json`` gives it."""
    latest = shipyarder.history[0]["id"]
    doc = shipyarder.run("show", str(latest), "--json").json()
    return {f"analysis:{a['metric']}": a for a in doc["analysis"]}


def measured(shipyarder: Any) -> int:
    """How many measurements the history holds (0 while it is being created)."""
    if not shipyarder.history_path.exists():
        return 0
    with sqlite3.connect(shipyarder.history_path) as db:
        try:
            return db.execute("SELECT count(*) FROM measurements").fetchone()[0]
        except sqlite3.OperationalError:  # the history is being created
            return 0


def test_healthy_analysis_succeeds_and_records_every_measurement(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    result = shipyarder.run("deploy", "web", "1.0", "-e", "prod", env={"VALUES": "0.01,0.02,0.03"})
    assert result.exit_code == 0, result.output
    doc = artifacts(shipyarder)["analysis:error rate"]
    assert doc["verdict"] == "successful"
    assert doc["counts"] == {"successful": 3, "failed": 0, "inconclusive": 0, "error": 0}
    assert [m["value"] for m in doc["measurements"]] == [0.01, 0.02, 0.03]
    assert doc["conditions"] == {"success": "below(0.05)", "failure": "above(0.1)"}
    assert (doc["stage"], doc["step"], [m["n"] for m in doc["measurements"]]) == (
        "verify", "analysis", [1, 2, 3],
    )  # fmt: skip
    with sqlite3.connect(shipyarder.history_path) as db:  # one row per measurement, in its table
        rows = db.execute(
            "SELECT metric, n, value, outcome FROM measurements ORDER BY id"
        ).fetchall()
    assert rows == [
        ("error rate", n, str(v), "successful") for n, v in ((1, 0.01), (2, 0.02), (3, 0.03))
    ]
    shown = shipyarder.run("show", "1").output
    assert "  analysis  analysis: error rate  successful  (3 successful)" in shown
    assert "0.01; 0.02; 0.03" in shown
    logs = shipyarder.run("logs", "1").output
    assert "analysis started: error rate" in logs
    assert "error rate #2/3: 0.02 -> successful" in logs
    assert "analysis finished: successful" in logs


def test_failing_analysis_fails_fast(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    result = shipyarder.run("deploy", "web", "1.0", "-e", "prod",
                            env={"VALUES": "0.01,0.5,0.01", "COUNT": "10"})  # fmt: skip
    assert result.exit_code == 1, result.output
    doc = artifacts(shipyarder)["analysis:error rate"]
    assert doc["verdict"] == "failed"
    assert len(doc["measurements"]) == 2  # stopped at the first failure
    show = shipyarder.run("show", "1", "--json").json()
    assert "analysis failed" in show["stages"][0]["steps"][0]["error"]
    assert "last value 0.5" in show["stages"][0]["steps"][0]["error"]


def test_sinks_get_the_analysis_started_and_finished_and_no_single_measurement(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    sink = shipyarder.path / "events.jsonl"
    result = shipyarder.run("deploy", "web", "1.0", "-e", "prod", "--notify", f"jsonl:{sink}",
                            env={"VALUES": "0.01,0.2"})  # fmt: skip
    assert result.exit_code == 1, result.output
    events = [json.loads(line) for line in sink.read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names.count("analysis_started") == names.count("analysis_finished") == 1
    assert names.index("step_started") < names.index("analysis_started")
    assert names.index("analysis_finished") < names.index("step_finished")
    started = events[names.index("analysis_started")]
    assert (started["stage"], started["step"], [m["metric"] for m in started["metrics"]]) == (
        "verify", "analysis", ["error rate"])  # fmt: skip
    assert started["metrics"][0]["conditions"] == {
        "success": "below(0.05)",
        "failure": "above(0.1)",
    }
    finished = events[names.index("analysis_finished")]
    assert (finished["verdict"], finished["outcome"]) == ("failed", "fail")
    assert finished["summary"] == "error rate failed (1 successful, 1 failed)"
    assert finished["metrics"] == [{"metric": "error rate", "verdict": "failed", "dry_run": False,
        "counts": {"successful": 1, "failed": 1, "inconclusive": 0, "error": 0}}]  # fmt: skip
    assert names == ["deployment_started", "stage_started", "step_started", "analysis_started",
                     "analysis_finished", "step_finished", "stage_finished",
                     "deployment_finished"]  # fmt: skip


@pytest.mark.parametrize(("on_inc", "code"), [("fail", 1), ("succeed", 0)])
def test_inconclusive_follows_on_inconclusive(shipyarder, on_inc, code):
    shipyarder.makepipelines(PIPELINES)
    result = shipyarder.run("deploy", "web", "1.0", "-e", "prod",
                            env={"VALUES": "0.07", "ON_INC": on_inc})  # fmt: skip
    assert result.exit_code == code, result.output
    assert artifacts(shipyarder)["analysis:error rate"]["verdict"] == "inconclusive"


def test_empty_results_are_inconclusive_and_errors_stream_until_the_limit(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    result = shipyarder.run("deploy", "web", "1.0", "-e", "prod",
                            env={"VALUES": "none", "ON_INC": "succeed"})  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = artifacts(shipyarder)["analysis:error rate"]
    assert doc["measurements"][0]["value"] is None
    assert doc["measurements"][0]["outcome"] == "inconclusive"
    result = shipyarder.run("deploy", "web", "1.1", "-e", "prod",
                            env={"VALUES": "boom", "COUNT": "20"})  # fmt: skip
    assert result.exit_code == 1
    doc = artifacts(shipyarder)["analysis:error rate"]
    assert doc["verdict"] == "error"
    assert len(doc["measurements"]) == 5  # more than 4 in a row
    assert doc["measurements"][0]["error"] == "RuntimeError: provider down"


def test_dry_run_metrics_never_change_the_verdict(shipyarder):
    shipyarder.makepipelines("""
        import shipyard as sy

        @sy.pipeline
        def web(d):
            return [sy.stage("verify", sy.analysis(
                sy.metric("ok", sy.python_metric(lambda: 1.0), success=sy.above(0), count=2, interval=0.05),
                sy.metric("watch", sy.python_metric(lambda: 99.0), failure=sy.above(1), dry_run=True),
                sy.metric("raw", sy.python_metric(lambda: [1, 2]), dry_run=True),
            ))]
    """)
    result = shipyarder.run("deploy", "web", "1.0", "-e", "prod")
    assert result.exit_code == 0, result.output
    docs = artifacts(shipyarder)
    assert docs["analysis:watch"]["verdict"] == "failed"
    assert docs["analysis:watch"]["measurements"][0]["dry_run"] is True
    assert docs["analysis:raw"]["measurements"][0]["value"] == [1, 2]
    assert "(dry-run: watch failed" in shipyarder.run("logs", "1").output


def test_a_metric_without_condition_is_a_definition_error(shipyarder):
    shipyarder.makepipelines("""
        import shipyard as sy

        @sy.pipeline
        def web(d):
            return [sy.stage("verify", sy.analysis(
                sy.metric("latency", sy.python_metric(lambda: 1.0)), name="canary check"))]
    """)
    for cmd in (["plan", "web", "1", "-e", "x"], ["deploy", "web", "1", "-e", "x"]):
        result = shipyarder.run(*cmd)
        assert result.exit_code == 2, result.output
        assert "pipeline 'web'" in result.stderr
        assert "analysis step 'canary check': metric 'latency' has no condition" in result.stderr
        assert "Traceback" not in result.output
    assert shipyarder.history == []


def test_plan_prints_the_queries_and_conditions(shipyarder):
    shipyarder.makepipelines("""
        import shipyard as sy

        @sy.pipeline
        def web(d):
            return [sy.stage("verify", sy.analysis(sy.metric(
                "errors", sy.prometheus("http://127.0.0.1:9", 'rate(errors{version="$DEPLOYMENT_VERSION"}[1m])'),
                failure=sy.above(0.05), interval="10s", count=6)))]
    """)
    result = shipyarder.run("plan", "web", "1.0", "-e", "prod")
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert lines[2:] == [
        "- analysis: analysis of 1 metric; on inconclusive: fail",
        "errors: prometheus http://127.0.0.1:9 query 'rate(errors{version=\"$DEPLOYMENT_VERSION\"}[1m])';"
        " failure above(0.05); 6 measurement(s) every 10s; limits: failure 0, inconclusive 0,"
        " errors in a row 4",
    ]  # fmt: skip


def test_bad_definitions_say_what_to_do():
    p = sy.python_metric(lambda: 1)
    cases = [
        (lambda: sy.analysis(), "at least one sy.metric"),
        (lambda: sy.metric("m", lambda: 1), "is not a provider"),
        (lambda: sy.metric("m", p, failure=0.5), "must be a callable"),
        (lambda: sy.metric("m", p, count=0), "count must be a whole number >= 1"),
        (lambda: sy.metric("m", p, interval="soon"), "interval must be seconds"),
        (lambda: sy.analysis(sy.metric("m", p, failure=sy.above(1)), on_inconclusive="maybe"),
         "on_inconclusive must be"),
        (lambda: sy.prometheus("http://x", "up{v=\"$DEPLOYMENT_COLOUR\"}"), "unknown variable"),
        (lambda: sy.http_json("http://x", path="a..b"), "bad path"),
    ]  # fmt: skip
    for build, text in cases:
        with pytest.raises(sy.PipelineDefinitionError, match=text):
            build()


def test_promql_substitution_escapes_strings():
    p = sy.prometheus(
        "http://127.0.0.1:9", 'up{v="$DEPLOYMENT_VERSION",e="${DEPLOYMENT_ENVIRONMENT}"}'
    )
    env = {"DEPLOYMENT_VERSION": 'a"b\\c', "DEPLOYMENT_ENVIRONMENT": "x\ny"}
    assert p.render(env) == 'up{v="a\\"b\\\\c",e="x\\ny"}'


# -- HTTP JSON --------------------------------------------------------------------------------------

HTTP_PIPELINE = """
import os
import shipyard as sy

@sy.pipeline
def web(d):
    return [sy.stage("verify", sy.analysis(sy.metric(
        "ratio", sy.http_json(os.environ["URL"], path=os.environ.get("JPATH") or None,
                              headers={"Authorization": sy.secret("TOKEN")}),
        success=sy.above(0.9), consecutive_error_limit=0)))]
"""


@pytest.mark.parametrize(
    ("reply", "path", "code", "value", "error"),
    [
        (Reply(200, json.dumps({"data": {"items": [{"ratio": 0.99}]}}), {"Content-Type": "application/json"}),
         "data.items[0].ratio", 0, 0.99, None),
        (Reply(200, "0.95 ok"), None, 1, "0.95 ok", None),
        (Reply(200, json.dumps({"data": {"items": []}})), "data.items[0].ratio", 1, None,
         "data.items has no 0"),
        (Reply(500, "broken"), None, 1, None, "HTTP 500: broken"),
    ],
    ids=["json-path", "text-body", "missing-key", "http-500"],
)  # fmt: skip
def test_http_json(shipyarder, reply, path, code, value, error):
    shipyarder.makepipelines(HTTP_PIPELINE)
    with LoopbackServer(always(reply)) as server:
        result = shipyarder.run("deploy", "web", "1", "-e", "x",
                                env={"URL": server.url("/m"), "JPATH": path or "", "TOKEN": "tok-s3cr3t"})  # fmt: skip
        assert server.requests[0].headers["authorization"] == "tok-s3cr3t"
    assert result.exit_code == code, result.output
    m = artifacts(shipyarder)["analysis:ratio"]["measurements"][0]
    assert m["value"] == value
    assert (error is None and m["error"] is None) or error in m["error"]
    assert "tok-s3cr3t" not in result.output + shipyarder.run("logs", "1").output
    assert "tok-s3cr3t" not in (shipyarder.history_path.read_bytes().decode("latin-1"))


def test_http_json_does_not_follow_redirects(shipyarder):
    shipyarder.makepipelines(HTTP_PIPELINE)
    with LoopbackServer(redirect("/elsewhere", target="/elsewhere")) as server:
        result = shipyarder.run("deploy", "web", "1", "-e", "x",
                                env={"URL": server.url("/m"), "TOKEN": "t0k3n-value"})  # fmt: skip
        assert [r.path for r in server.requests] == ["/m"]
    assert result.exit_code == 1
    assert "not followed" in artifacts(shipyarder)["analysis:ratio"]["measurements"][0]["error"]


# -- a third-party provider and the measurement hook ------------------------------------------------

PLUGIN = """
import shipyard as sy

class Constant:
    name = "constant"
    description = "the constant 0.5"

    def measure(self, ctx):
        ctx.log(f"measuring {ctx.metric} #{ctx.n} of {ctx.deployment.version}")
        return 0.5

@sy.hookimpl
def shipyard_register_metric_providers(registry):
    registry.add("constant", Constant)

@sy.hookimpl
def shipyard_analysis_measure(metric, context):
    if metric.name == "replaced":
        async def fixed():
            return 42.0
        return fixed()
    return None
"""


def test_third_party_provider_and_the_hook(shipyarder):
    shipyarder.makeplugin("constplug", PLUGIN)
    shipyarder.makepipelines("""
        import shipyard as sy
        from constplug import Constant

        @sy.pipeline
        def web(d):
            return [sy.stage("verify", sy.analysis(
                sy.metric("plain", Constant(), success=sy.equals(0.5)),
                sy.metric("replaced", Constant(), success=sy.equals(42)),
            ))]
    """)
    result = shipyarder.run("-p", "constplug", "deploy", "web", "2.0", "-e", "x")
    assert result.exit_code == 0, result.output
    docs = artifacts(shipyarder)
    assert docs["analysis:plain"]["measurements"][0]["value"] == 0.5
    assert docs["analysis:plain"]["description"] == "the constant 0.5"
    assert docs["analysis:replaced"]["measurements"][0]["value"] == 42.0
    assert "measuring plain #1 of 2.0" in shipyarder.run("logs", "1").output
    listed = {r["name"]: r for r in shipyarder.run("-p", "constplug", "plugins", "--json").json()}
    assert listed["constplug"]["metric_providers"] == ["constant"]
    assert listed["analysis"]["metric_providers"] == ["http_json", "prometheus", "python_metric"]
    assert "    providers:  constant" in shipyarder.run("-p", "constplug", "plugins").output


# -- a real Prometheus ------------------------------------------------------------------------------

PROM_PIPELINE = """
import os
import shipyard as sy

@sy.pipeline
def web(d):
    return [sy.stage("verify", sy.analysis(sy.metric(
        "errors", sy.prometheus(os.environ["PROM"], os.environ["QUERY"]),
        success=sy.below(0.05), failure=sy.above(0.1), interval=0.2, count=2,
        consecutive_error_limit=1)))]
"""


@pytest.mark.xdist_group("prometheus")
@pytest.mark.parametrize(
    ("version", "query", "code", "verdict", "value", "error"),
    [
        ("good", 'shipyard_test_errors{version="$DEPLOYMENT_VERSION"}', 0, "successful", 0.01, None),
        ("bad", 'shipyard_test_errors{version="$DEPLOYMENT_VERSION"}', 1, "failed", 0.5, None),
        ("meh", 'shipyard_test_errors{version="$DEPLOYMENT_VERSION"}', 1, "inconclusive", 0.07, None),
        ("none", 'shipyard_test_errors{version="$DEPLOYMENT_VERSION"}', 1, "inconclusive", None, None),
        ("good", 'sum(shipyard_test_errors{version="$DEPLOYMENT_VERSION"}', 1, "error", None,
         "prometheus refused the query (bad_data): "),
        ("good", 'shipyard_test_errors{version="$DEPLOYMENT_VERSION"}[30s]', 1, "error", None,
         "use an instant query"),
        ("a", 'shipyard_test_errors{version=~"a|b"}', 1, "inconclusive", [0.02, 0.03], None),
        ("x", "scalar(vector(0)) / 0", 1, "inconclusive", "NaN", None),
    ],
    ids=["healthy", "failing", "inconclusive", "empty", "bad-query", "range-vector", "several",
         "nan"],
)  # fmt: skip
def test_real_prometheus(
    shipyarder,
    prometheus_server,  # noqa: F811 - the session fixture
    version,
    query,
    code,
    verdict,
    value,
    error,
):
    shipyarder.makepipelines(PROM_PIPELINE)
    result = shipyarder.run("deploy", "web", version, "-e", "x",
                            env={"PROM": prometheus_server.url, "QUERY": query})  # fmt: skip
    assert result.exit_code == code, result.output
    doc = artifacts(shipyarder)["analysis:errors"]
    assert doc["verdict"] == verdict
    first = doc["measurements"][0]
    if error:
        assert error in first["error"]
        assert len(doc["measurements"]) == 1  # retrying cannot help: at once
    else:
        assert first["error"] is None
        got = first["value"]
        assert sorted(got) == value if isinstance(value, list) else got == value


@pytest.mark.xdist_group("prometheus")
def test_unreachable_prometheus_is_an_error_streak(shipyarder):
    from http_servers import unused_port

    shipyarder.makepipelines(PROM_PIPELINE)
    result = shipyarder.run("deploy", "web", "good", "-e", "x",
                            env={"PROM": f"http://127.0.0.1:{unused_port()}", "QUERY": "up"})  # fmt: skip
    assert result.exit_code == 1
    doc = artifacts(shipyarder)["analysis:errors"]
    assert doc["verdict"] == "error"
    assert len(doc["measurements"]) == 2  # more than consecutive_error_limit=1 in a row
    assert (
        "could not connect" in doc["measurements"][0]["error"]
        or "refused" in doc["measurements"][0]["error"]
    )


# -- timing, Ctrl-C and the step's timeout ----------------------------------------------------------

SLOW = """
import shipyard as sy

@sy.pipeline
def web(d):
    return [sy.stage("verify", sy.analysis(sy.metric(
        "m", sy.python_metric(lambda: 0.0), success=sy.below(1), interval=0.3, count=3,
        initial_delay=0.2), name="slow", timeout=TIMEOUT))]
"""


def test_measurements_follow_initial_delay_and_interval(shipyarder):
    import time

    shipyarder.makepipelines(SLOW.replace("TIMEOUT", "None"))
    start = time.monotonic()
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    took = time.monotonic() - start
    assert result.exit_code == 0, result.output
    assert took >= 0.2 + 2 * 0.3
    times = [m["ts"] for m in artifacts(shipyarder)["analysis:m"]["measurements"]]
    from shipyard.sdk import parse_ts

    gaps = [parse_ts(b) - parse_ts(a) for a, b in itertools.pairwise(times)]
    assert len(times) == 3
    assert all(g >= 0.25 for g in gaps), gaps


def test_the_step_timeout_stops_the_intervals(shipyarder):
    shipyarder.makepipelines(SLOW.replace("TIMEOUT", "0.4").replace("interval=0.3", "interval=30"))
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 1
    assert (
        "timed out after 0.4s"
        in shipyarder.run("show", "1", "--json").json()["stages"][0]["steps"][0]["error"]
    )
    assert len(artifacts(shipyarder)["analysis:m"]["measurements"]) == 1


def test_ctrl_c_during_an_interval_exits_130_at_once(shipyarder):
    import signal
    import time

    from polling import wait_for

    shipyarder.makepipelines(SLOW.replace("TIMEOUT", "None").replace("interval=0.3", "interval=60"))
    proc = shipyarder.popen("deploy", "web", "1", "-e", "x")
    wait_for(lambda: measured(shipyarder) > 0, timeout=30, what="the first measurement")
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 130
    assert time.monotonic() - start < 1.0
    assert shipyarder.history[0]["status"] == "cancelled"
