"""The ``analysis`` step: measure metrics a number of times and decide from the results.

::

    sy.analysis(
        sy.metric("error rate", sy.prometheus("http://127.0.0.1:9090", 'job_errors{v="$DEPLOYMENT_VERSION"}'),
                  failure=sy.above(0.05), interval=10, count=6),
        on_inconclusive="fail",
    )

A measurement is *failed* if ``failure(v)``, else *successful* if ``success(v)``; with only a
success condition anything else is failed, with only a failure condition anything else is
successful, with both and neither true it is *inconclusive*. The helpers (:func:`below`,
:func:`above`, :func:`between`, :func:`equals`) cannot judge ``None``, NaN, lists or texts that
are not numbers: such a measurement is inconclusive. A provider error, or a condition that
raises, is an *error*. :func:`verdict` turns the outcomes of one metric into its verdict;
:func:`worst` combines the metrics. Both are pure functions (tested against a reference model).

httpx is imported only when a provider measures. Each measurement is kept in the history's
measurements table as it is taken (:meth:`StepContext.record_measurement`); each metric's
settings, counts and verdict as the step's artifact ``analysis:<metric>`` (JSON, written when the
metric starts and when it is decided). ``show --json`` joins the two under ``analysis``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

from shipyard import sdk

if TYPE_CHECKING:
    import httpx

#: Measurement outcomes.
SUCCESSFUL: Final = "successful"
FAILED: Final = "failed"
INCONCLUSIVE: Final = "inconclusive"
ERROR: Final = "error"
#: An error retrying cannot help (Prometheus ``bad_data``, a range vector): the metric errs at once.
FATAL: Final = "fatal"
#: Verdicts from best to worst (the analysis takes the worst of its metrics).
ORDER: Final = (SUCCESSFUL, INCONCLUSIVE, ERROR, FAILED)
#: What ``analysis_started`` says of each metric.
_STARTED_KEYS: Final = ("metric", "provider", "description", "conditions", "count", "interval",
                        "dry_run")  # fmt: skip
#: The most characters of a value kept in the history.
MAX_VALUE: Final = 4096
_VARIABLES: Final = ("ID", "VERSION", "ENVIRONMENT", "PIPELINE", "STAGE")
_VAR_RE = re.compile(r"\$\{?DEPLOYMENT_([A-Za-z0-9_]+)\}?")


# -- conditions -------------------------------------------------------------------------------------


class _Unknown:
    """What a condition helper answers for a value it cannot judge."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "UNKNOWN"


#: The answer of a condition that cannot judge a value: the measurement is inconclusive.
UNKNOWN: Final = _Unknown()


def _number(value: Any) -> float | None:
    """``value`` as a finite-or-infinite float; None for None, NaN, bools, lists, other texts."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return None if math.isnan(number) else number


class Condition:
    """A condition with a readable repr (``below(0.05)``), for ``plan`` and the history."""

    def __init__(self, text: str, test: Callable[[float], bool]) -> None:
        self.text = text
        self._test = test

    def __call__(self, value: Any) -> bool | _Unknown:
        number = _number(value)
        return UNKNOWN if number is None else self._test(number)

    def __repr__(self) -> str:
        return self.text


Condition.__module__ = "shipyard"


def _threshold(helper: str, x: Any) -> float:
    number = _number(x)
    if number is None or isinstance(x, str):
        raise sdk.PipelineDefinitionError(f"{helper}(): the threshold must be a number, got {x!r}")
    return number


def below(x: float) -> Condition:
    """True when the value is a number less than ``x``."""
    t = _threshold("below", x)
    return Condition(f"below({x!r})", lambda v: v < t)


def above(x: float) -> Condition:
    """True when the value is a number greater than ``x``."""
    t = _threshold("above", x)
    return Condition(f"above({x!r})", lambda v: v > t)


def between(lo: float, hi: float) -> Condition:
    """True when the value is a number from ``lo`` to ``hi`` (both included)."""
    a, b = _threshold("between", lo), _threshold("between", hi)
    if a > b:
        raise sdk.PipelineDefinitionError(f"between({lo!r}, {hi!r}): lo must not exceed hi")
    return Condition(f"between({lo!r}, {hi!r})", lambda v: a <= v <= b)


class _Equals(Condition):
    def __init__(self, expected: Any) -> None:
        super().__init__(f"equals({expected!r})", lambda v: v == expected)
        self.expected = expected

    def __call__(self, value: Any) -> bool | _Unknown:
        if _number(self.expected) is not None and not isinstance(self.expected, str):
            return super().__call__(value)
        if value is None or isinstance(value, (list, tuple, dict)):
            return UNKNOWN
        if isinstance(value, float) and math.isnan(value):
            return UNKNOWN
        return bool(value == self.expected)


def equals(v: Any) -> Condition:
    """True when the value equals ``v`` (numbers compare as numbers, ``"1"`` equals ``1``)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        raise sdk.PipelineDefinitionError(f"equals({v!r}): compare with a number or a text")
    return _Equals(v)


def _describe_condition(cond: Any) -> str:
    if isinstance(cond, Condition):
        return repr(cond)
    code = getattr(cond, "__code__", None)
    name = getattr(cond, "__qualname__", None) or repr(cond)
    if code is not None:
        return f"{name} ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})"
    return str(name)


# -- the verdict: pure functions ---------------------------------------------------------------------


def classify(value: Any, success: Callable[[Any], Any] | None,
             failure: Callable[[Any], Any] | None) -> tuple[str, str | None]:  # fmt: skip
    """The outcome of one measured ``value`` and, for an error, what went wrong."""

    def ask(cond: Callable[[Any], Any], which: str) -> Any:
        try:
            return cond(value)
        except Exception as exc:
            raise _ConditionError(
                f"the {which} condition {_describe_condition(cond)} raised "
                f"{type(exc).__name__}: {exc} on the value {_show(value)}"
            ) from exc

    try:
        f = ask(failure, "failure") if failure is not None else None
        if f is UNKNOWN:
            return INCONCLUSIVE, None
        if f:
            return FAILED, None
        if success is None:
            return (SUCCESSFUL, None) if failure is not None else (INCONCLUSIVE, None)
        s = ask(success, "success")
    except _ConditionError as exc:
        return ERROR, str(exc)
    if s is UNKNOWN:
        return INCONCLUSIVE, None
    if s:
        return SUCCESSFUL, None
    return (INCONCLUSIVE, None) if failure is not None else (FAILED, None)


class _ConditionError(Exception):
    pass


def verdict(outcomes: Sequence[str], *, count: int, failure_limit: int = 0,
            inconclusive_limit: int = 0, consecutive_error_limit: int = 4) -> str | None:  # fmt: skip
    """The verdict of a metric after ``outcomes`` (in order), or None while it is undecided.

    Failed as soon as the failed measurements exceed ``failure_limit``; inconclusive as soon as
    the inconclusive ones exceed ``inconclusive_limit``; error after more than
    ``consecutive_error_limit`` errors in a row (any other outcome resets the streak) or at a
    fatal error; otherwise successful once ``count`` measurements were made.
    """
    failed = inconclusive = streak = 0
    for n, outcome in enumerate(outcomes, 1):
        if outcome == FATAL:
            return ERROR
        if outcome == ERROR:
            streak += 1
            if streak > consecutive_error_limit:
                return ERROR
        else:
            streak = 0
            if outcome == FAILED:
                failed += 1
                if failed > failure_limit:
                    return FAILED
            elif outcome == INCONCLUSIVE:
                inconclusive += 1
                if inconclusive > inconclusive_limit:
                    return INCONCLUSIVE
        if n >= count:
            return SUCCESSFUL
    return None


def worst(verdicts: Sequence[tuple[str, bool]]) -> str:
    """The analysis's verdict: the worst of its metrics' ``(verdict, dry_run)``, dry-run ones
    left out (successful when no metric decides)."""
    decided = [v for v, dry in verdicts if not dry]
    return max(decided, key=ORDER.index) if decided else SUCCESSFUL


# -- values ---------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _show(value: Any, limit: int = 200) -> str:
    """A value on one line for logs and errors (masked, shortened)."""
    if value is None:
        text = "None (no data)"
    elif isinstance(value, float):
        text = repr(_jsonable(value)) if not math.isfinite(value) else f"{value:g}"
    elif isinstance(value, str):
        text = repr(value)
    else:
        text = json.dumps(_jsonable(value), separators=(",", ":"))
    text = sdk.mask(text)
    return text if len(text) <= limit else text[:limit] + "..."


# -- providers -----------------------------------------------------------------------------------------


class MeasurementError(Exception):
    """A provider could not measure; ``fatal`` when trying again cannot help."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


MeasurementError.__module__ = "shipyard"


class MeasureContext:
    """What a provider's ``measure(ctx)`` gets: the deployment, secrets, a log, a shared client."""

    def __init__(self, step: sdk.StepContext, metric: Metric, n: int, clients: dict[Any, Any]):
        self.step = step
        #: The deployment measured.
        self.deployment = step.deployment
        #: The metric's name and the measurement's number (1, 2, ...).
        self.metric, self.n = metric.name, n
        #: Warnings the provider reported for this measurement (recorded with it).
        self.warnings: list[str] = []
        self._clients = clients

    @property
    def deployment_env(self) -> dict[str, str]:
        """The ``DEPLOYMENT_*`` values (``DEPLOYMENT_VERSION``, ...)."""
        return self.step.deployment_env

    def resolve(self, value: Any) -> Any:
        """``value`` with secret placeholders replaced by the secrets."""
        return self.step.resolve(value)

    def log(self, text: str) -> None:
        """A line in the step's log (masked)."""
        self.step.log(text)

    def warn(self, text: str) -> None:
        """Record a warning with this measurement (and log it)."""
        self.warnings.append(sdk.mask(text))
        self.step.log(f"{self.metric} #{self.n}: warning: {text}", "stderr")

    def http_client(self, verify: Any = True) -> httpx.AsyncClient:
        """An httpx client shared by the measurements of this analysis (closed at its end)."""
        client = self._clients.get(verify)
        if client is None:
            import httpx

            client = self._clients[verify] = httpx.AsyncClient(verify=verify)
        return client


def _escape_promql(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'").replace("\n", "\\n")


class PrometheusProvider:
    """An instant query to a Prometheus server (``/api/v1/query``)."""

    name = "prometheus"

    def __init__(self, address: str, query: str, *, timeout: float = 10.0,
                 headers: Mapping[str, str] | None = None, verify: Any = True) -> None:  # fmt: skip
        if not isinstance(address, str) or not address.startswith(("http://", "https://")):
            raise sdk.PipelineDefinitionError(
                f"prometheus(): address must be an http:// or https:// URL, got {address!r}"
            )
        if not isinstance(query, str) or not query.strip():
            raise sdk.PipelineDefinitionError(f"prometheus(): query must be PromQL, got {query!r}")
        for var in _VAR_RE.findall(query):
            if var not in _VARIABLES:
                known = ", ".join(f"$DEPLOYMENT_{v}" for v in _VARIABLES)
                raise sdk.PipelineDefinitionError(
                    f"prometheus(): unknown variable $DEPLOYMENT_{var} in the query (known: {known})"
                )
        self.address, self.query = address.rstrip("/"), query
        self.timeout, self.headers, self.verify = float(timeout), dict(headers or {}), verify

    @property
    def description(self) -> str:
        return sdk.mask(f"prometheus {sdk.display_url(self.address)} query {self.query!r}")

    def render(self, env: Mapping[str, str]) -> str:
        """The query with ``$DEPLOYMENT_*`` replaced, escaped for a PromQL string."""
        return _VAR_RE.sub(lambda m: _escape_promql(env[f"DEPLOYMENT_{m.group(1)}"]), self.query)

    async def measure(self, ctx: MeasureContext) -> Any:
        import httpx

        url = ctx.resolve(self.address) + "/api/v1/query"
        query = self.render(ctx.deployment_env)
        client = ctx.http_client(sdk.ssl_verify(self.verify, url))
        try:
            resp = await client.get(url, params={"query": query},
                                    headers=ctx.resolve(self.headers), timeout=self.timeout)  # fmt: skip
        except httpx.HTTPError as exc:
            _label, error, _hint = sdk.classify_error(exc, url, self.timeout)
            raise MeasurementError(f"prometheus {sdk.display_url(self.address)}: {error}") from None
        try:
            doc = resp.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise MeasurementError(
                f"prometheus answered HTTP {resp.status_code} with no API document: "
                f"{sdk.body_excerpt(resp.content)}"
            )
        for warning in doc.get("warnings") or ():
            ctx.warn(f"prometheus: {warning}")
        if doc.get("status") != "success":
            kind, message = doc.get("errorType", "?"), doc.get("error", "")
            raise MeasurementError(
                f"prometheus refused the query ({kind}): {message}", fatal=kind == "bad_data"
            )
        data: dict[str, Any] = doc.get("data") or {}
        kind = data.get("resultType")
        result: Any = data.get("result") or ()
        if kind == "vector":
            values = [float(sample["value"][1]) for sample in result or ()]
            return None if not values else values[0] if len(values) == 1 else values
        if kind == "scalar":
            return float(result[1])
        if kind == "string":
            return str(result[1])
        if kind == "matrix":
            raise MeasurementError(
                "the query returned a range vector; use an instant query (e.g. wrap it in "
                "rate(...[5m]) or avg_over_time(...[5m]))",
                fatal=True,
            )
        raise MeasurementError(f"prometheus returned an unknown result type {kind!r}")


class HttpJsonProvider:
    """A GET of a JSON document and the value at ``path`` (``"data.items[0].ratio"``)."""

    name = "http_json"

    def __init__(self, url: str, path: str | None = None, *,
                 headers: Mapping[str, str] | None = None, timeout: float = 10.0,
                 verify: Any = True) -> None:  # fmt: skip
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise sdk.PipelineDefinitionError(
                f"http_json(): url must be an http:// or https:// URL, got {url!r}"
            )
        self.url, self.headers, self.timeout, self.verify = (
            url,
            dict(headers or {}),
            timeout,
            verify,
        )
        self.path = path
        self.keys: list[str | int] = _parse_path(path) if path else []

    @property
    def description(self) -> str:
        where = f" path {self.path}" if self.path else ""
        return sdk.mask(f"http_json GET {sdk.display_url(self.url)}{where}")

    async def measure(self, ctx: MeasureContext) -> Any:
        import httpx

        url = ctx.resolve(self.url)
        client = ctx.http_client(sdk.ssl_verify(self.verify, url))
        try:
            resp = await client.get(url, headers=ctx.resolve(self.headers), timeout=self.timeout,
                                    follow_redirects=False)  # fmt: skip
        except httpx.HTTPError as exc:
            _label, error, _hint = sdk.classify_error(exc, url, self.timeout)
            raise MeasurementError(f"GET {sdk.display_url(self.url)}: {error}") from None
        if not 200 <= resp.status_code < 300:
            where = resp.headers.get("location")
            extra = f" (redirect to {sdk.display_url(where)} not followed)" if where else ""
            raise MeasurementError(
                f"GET {sdk.display_url(self.url)}: HTTP {resp.status_code}{extra}: "
                f"{sdk.body_excerpt(resp.content)}"
            )
        try:
            value = resp.json()
        except ValueError:
            return resp.text
        for i, key in enumerate(self.keys):
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                upto = _format_path(self.keys[:i]) or "the document"
                raise MeasurementError(
                    f"GET {sdk.display_url(self.url)}: {upto} has no {key!r} (path {self.path})"
                ) from None
        return value


def _parse_path(path: str) -> list[str | int]:
    keys: list[str | int] = []
    for part in path.split("."):
        m = re.fullmatch(r"([^\[\]]*)((?:\[\d+\])*)", part)
        if not m or (not m.group(1) and not m.group(2)):
            raise sdk.PipelineDefinitionError(
                f"http_json(): bad path {path!r}; write keys and indexes as 'data.items[0].ratio'"
            )
        if m.group(1):
            keys.append(m.group(1))
        keys += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    return keys


def _format_path(keys: Sequence[str | int]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")


class PythonMetricProvider:
    """A Python callable's return value (sync ones run on a worker thread)."""

    name = "python"

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if not callable(fn):
            raise sdk.PipelineDefinitionError(f"python_metric(): {fn!r} is not callable")
        self.fn, self.args, self.kwargs = fn, args, kwargs

    @property
    def description(self) -> str:
        return sdk.mask(f"python {_describe_condition(self.fn)}")

    async def measure(self, ctx: MeasureContext) -> Any:
        import asyncio
        import inspect

        args, kwargs = ctx.resolve(list(self.args)), ctx.resolve(dict(self.kwargs))
        if inspect.iscoroutinefunction(self.fn):
            return await self.fn(*args, **kwargs)
        result = await asyncio.to_thread(self.fn, *args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result


prometheus = PrometheusProvider
http_json = HttpJsonProvider
python_metric = PythonMetricProvider


def _description(provider: Any) -> str:
    text = getattr(provider, "description", None)
    if callable(text):
        text = text()
    return sdk.mask(str(text if text is not None else provider.name))


# -- metrics and the step ------------------------------------------------------------------------------


def _seconds(value: Any, what: str, *, positive: bool) -> float:
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
        if m:
            value = (
                float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
            )
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise sdk.PipelineDefinitionError(f"metric: {what} must be seconds or '30s', got {value!r}")
    if value < 0 or (positive and value == 0):
        raise sdk.PipelineDefinitionError(
            f"metric: {what} must be > 0{'' if positive else '='}, got {value!r}"
        )
    return float(value)


def _whole(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise sdk.PipelineDefinitionError(
            f"metric: {what} must be a whole number >= {low}, got {value!r}"
        )
    return value


class Metric:
    """One metric of an analysis: a provider, conditions, how often and how many times."""

    def __init__(self, name: str, provider: Any, *, success: Callable[[Any], Any] | None = None,
                 failure: Callable[[Any], Any] | None = None, interval: float | str = 60.0,
                 count: int = 1, initial_delay: float | str = 0, failure_limit: int = 0,
                 inconclusive_limit: int = 0, consecutive_error_limit: int = 4,
                 dry_run: bool = False) -> None:  # fmt: skip
        if not isinstance(name, str) or not name.strip():
            raise sdk.PipelineDefinitionError(
                f"metric: name must be a non-empty text, got {name!r}"
            )
        if not (hasattr(provider, "name") and callable(getattr(provider, "measure", None))):
            raise sdk.PipelineDefinitionError(
                f"metric {name!r}: {provider!r} is not a provider (an object with name, description "
                "and measure(ctx)); use sy.prometheus(...), sy.http_json(...) or sy.python_metric(fn)"
            )
        for which, cond in (("success", success), ("failure", failure)):
            if cond is not None and not callable(cond):
                raise sdk.PipelineDefinitionError(
                    f"metric {name!r}: {which} must be a callable such as sy.below(0.05), got {cond!r}"
                )
        self.name, self.provider, self.success, self.failure = name, provider, success, failure
        self.interval = _seconds(interval, "interval", positive=True)
        self.count = _whole(count, "count", 1)
        self.initial_delay = _seconds(initial_delay, "initial_delay", positive=False)
        self.failure_limit = _whole(failure_limit, "failure_limit", 0)
        self.inconclusive_limit = _whole(inconclusive_limit, "inconclusive_limit", 0)
        self.consecutive_error_limit = _whole(consecutive_error_limit, "consecutive_error_limit", 0)
        self.dry_run = bool(dry_run)

    def conditions(self) -> dict[str, str | None]:
        return {
            "success": _describe_condition(self.success) if self.success is not None else None,
            "failure": _describe_condition(self.failure) if self.failure is not None else None,
        }

    def describe(self) -> str:
        conds = ", ".join(f"{k} {v}" for k, v in self.conditions().items() if v) or "no condition"
        every = f" every {self.interval:g}s" if self.count > 1 else ""
        delay = f" after {self.initial_delay:g}s" if self.initial_delay else ""
        limits = (f"limits: failure {self.failure_limit}, inconclusive {self.inconclusive_limit}, "
                  f"errors in a row {self.consecutive_error_limit}")  # fmt: skip
        dry = " [dry-run]" if self.dry_run else ""
        return (f"{self.name}: {_description(self.provider)}; {conds}; {self.count} "
                f"measurement(s){every}{delay}; {limits}{dry}")  # fmt: skip

    def judge(self, outcomes: Sequence[str]) -> str | None:
        return verdict(
            outcomes, count=self.count, failure_limit=self.failure_limit,
            inconclusive_limit=self.inconclusive_limit,
            consecutive_error_limit=self.consecutive_error_limit,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"<Metric {self.name!r}>"


Metric.__module__ = "shipyard"
metric = Metric


class _Run:
    """The measurements of one metric in one analysis, as recorded."""

    def __init__(self, m: Metric) -> None:
        self.metric = m
        self.measurements: list[dict[str, Any]] = []
        self.outcomes: list[str] = []
        self.verdict: str | None = None

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in (SUCCESSFUL, FAILED, INCONCLUSIVE, ERROR)}
        for o in self.outcomes:
            out[ERROR if o == FATAL else o] += 1
        return out

    def summary(self) -> str:
        c = self.counts()
        parts = ", ".join(f"{v} {k}" for k, v in c.items() if v) or "no measurement"
        return f"{self.metric.name} {self.verdict or 'stopped'} ({parts})"

    def document(self) -> dict[str, Any]:
        m = self.metric
        return {
            "metric": m.name, "provider": m.provider.name, "description": _description(m.provider),
            "conditions": m.conditions(), "count": m.count, "interval": m.interval,
            "initial_delay": m.initial_delay, "failure_limit": m.failure_limit,
            "inconclusive_limit": m.inconclusive_limit,
            "consecutive_error_limit": m.consecutive_error_limit, "dry_run": m.dry_run,
            "verdict": self.verdict, "counts": self.counts(),
        }  # fmt: skip


def _kept(value: Any) -> tuple[Any, bool]:
    """``value`` as kept in the history: JSON data, or its text cut at 4 KiB."""
    data = _jsonable(value)
    text = sdk.mask(json.dumps(data))
    if len(text) <= MAX_VALUE:
        return json.loads(text), False
    return text[:MAX_VALUE], True


class AnalysisStep(sdk.Step):
    """Measure each metric ``count`` times and decide: success continues, failure fails the step,
    inconclusive does what ``on_inconclusive`` says: ``"fail"``, ``"succeed"``, or stop the
    deployment at an approval gate (``sy.approval(...)``: approving accepts the result and goes on
    with the next stage, without analysing again)."""

    kind = "analysis"

    def __init__(self, *metrics: Metric, on_inconclusive: Any = "fail", on_failure: str = "fail",
                 name: str | None = None, timeout: float | None = None, retries: int = 0,
                 **unknown: Any) -> None:  # fmt: skip
        sdk.reject_unknown_options(self, unknown)
        super().__init__(name=name, timeout=timeout, retries=retries)
        if not metrics:
            raise sdk.PipelineDefinitionError(
                f"analysis step {self.name!r}: give at least one sy.metric(...)"
            )
        seen: set[str] = set()
        for m in metrics:
            if not isinstance(m, Metric):
                raise sdk.PipelineDefinitionError(
                    f"analysis step {self.name!r}: {m!r} is not a metric; build it with sy.metric(...)"
                )
            if m.name in seen:
                raise sdk.PipelineDefinitionError(
                    f"analysis step {self.name!r}: two metrics are named {m.name!r}"
                )
            seen.add(m.name)
            if m.success is None and m.failure is None and not m.dry_run:
                raise sdk.PipelineDefinitionError(
                    f"analysis step {self.name!r}: metric {m.name!r} has no condition; give "
                    "success=... and/or failure=... (e.g. failure=sy.above(0.05)), or "
                    "dry_run=True to only record it"
                )
        #: ``on_inconclusive=sy.approval(...)``: the gate an inconclusive analysis stops at.
        self.gate: Any = None
        if getattr(on_inconclusive, "kind", None) == "approval":
            self.gate, on_inconclusive = on_inconclusive, "approval"
        elif on_inconclusive not in ("fail", "succeed"):
            raise sdk.PipelineDefinitionError(
                f"analysis step {self.name!r}: on_inconclusive must be 'fail', 'succeed' or "
                f"sy.approval(...), got {on_inconclusive!r}"
            )
        if on_failure != "fail":
            raise sdk.PipelineDefinitionError(
                f"analysis step {self.name!r}: on_failure must be 'fail', got {on_failure!r}"
            )
        self.metrics = list(metrics)
        self.on_inconclusive, self.on_failure = on_inconclusive, on_failure

    def default_name(self) -> str:
        return "analysis"

    def describe(self) -> str:
        n = len(self.metrics)
        then = self.on_inconclusive if self.gate is None else f"wait for {self.gate.describe()}"
        return f"analysis of {n} metric{'s' if n > 1 else ''}; on inconclusive: {then}"

    def plan_details(self, deployment: sdk.Deployment, rootdir: Any) -> list[str]:
        return [m.describe() for m in self.metrics]

    async def run(self, context: sdk.StepContext) -> sdk.StepResult:
        import asyncio

        runs = [_Run(m) for m in self.metrics]
        clients: dict[Any, Any] = {}
        context.log(f"analysis started: {', '.join(m.name for m in self.metrics)}")
        context.emit(sdk.AnalysisStarted, metrics=[
            {k: v for k, v in r.document().items() if k in _STARTED_KEYS} for r in runs
        ])  # fmt: skip
        deciding = [r for r in runs if not r.metric.dry_run]
        tasks = {asyncio.ensure_future(self._measure(context, r, clients)): r for r in runs}
        try:
            watched = {t for t, r in tasks.items() if not r.metric.dry_run} or set(tasks)
            while watched:
                done, watched = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()
                if any(r.verdict in (FAILED, ERROR) for r in deciding):
                    break  # fail fast: nothing later can make it better
        except asyncio.CancelledError:
            context.log("analysis stopped before its verdict", "stderr")
            self._finished(context, runs, None, "stopped")
            raise
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in clients.values():
                await client.aclose()
        # Undecided metrics were stopped by another's failure, which alone decides then.
        result = worst([(r.verdict, False) for r in deciding if r.verdict])
        summary = "; ".join(r.summary() for r in deciding)
        dry = "; ".join(r.summary() for r in runs if r.metric.dry_run)
        context.log(f"analysis finished: {result}: {summary or 'no deciding metric'}"
                    + (f" (dry-run: {dry})" if dry else ""))  # fmt: skip
        if result == SUCCESSFUL or (result == INCONCLUSIVE and self.on_inconclusive == "succeed"):
            self._finished(context, runs, result, "continue")
            return sdk.StepResult()
        reasons = []
        for r in deciding:
            if r.verdict == result:
                last: dict[str, Any] = next(
                    (m for m in reversed(r.measurements) if m["outcome"] != SUCCESSFUL), {}
                )
                why = last.get("error") or f"last value {_show(last.get('value'))}"
                reasons.append(f"{r.summary()}: {why}")
        error = f"analysis {result}: " + "; ".join(reasons)
        if result == INCONCLUSIVE and self.gate is not None:
            context.log(f"{error}; waiting for a decision ({self.gate.describe()})")
            self._finished(context, runs, result, "wait for approval")
            return sdk.StepResult(sdk.Status.WAITING, error=error, gate=self.gate)
        self._finished(context, runs, result, "fail")
        raise sdk.StepFailed(error)

    @staticmethod
    def _finished(context: sdk.StepContext, runs: list[_Run], verdict: str | None,
                  outcome: str) -> None:  # fmt: skip
        deciding = "; ".join(r.summary() for r in runs if not r.metric.dry_run)
        dry = "; ".join(r.summary() for r in runs if r.metric.dry_run)
        context.emit(
            sdk.AnalysisFinished, verdict=verdict, outcome=outcome,
            summary=(deciding or "no deciding metric") + (f" (dry-run: {dry})" if dry else ""),
            metrics=[{"metric": r.metric.name, "verdict": r.verdict, "counts": r.counts(),
                      "dry_run": r.metric.dry_run} for r in runs],
        )  # fmt: skip

    async def _measure(self, context: sdk.StepContext, run: _Run, clients: dict[Any, Any]) -> None:
        import asyncio

        m = run.metric
        loop = asyncio.get_running_loop()
        start = loop.time() + m.initial_delay
        pm: Any = context.pluginmanager
        name = f"analysis:{m.name}"
        context.record_artifact(name, json.dumps(run.document()))
        for n in range(1, m.count + 1):
            delay = start + (n - 1) * m.interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            ctx = MeasureContext(context, m, n, clients)
            value: Any = None
            error: str | None = None
            outcome: str
            try:
                measured = pm.analysis_measure(metric=m, context=ctx)
                value = await measured
            except MeasurementError as exc:
                outcome, error = (FATAL if exc.fatal else ERROR), sdk.mask(str(exc))
            except Exception as exc:
                outcome, error = ERROR, sdk.mask(f"{type(exc).__name__}: {exc}")
            else:
                outcome, error = classify(value, m.success, m.failure)
            kept, cut = _kept(value)
            record: dict[str, Any] = {"n": n, "ts": sdk.utcnow(), "value": kept,
                                      "outcome": ERROR if outcome == FATAL else outcome,
                                      "error": error, "dry_run": m.dry_run}  # fmt: skip
            warnings = list(ctx.warnings)
            if cut:
                warnings.append(f"value cut at {MAX_VALUE} characters")
            run.measurements.append(record)
            run.outcomes.append(outcome)
            run.verdict = m.judge(run.outcomes)
            shown = error if error else f"{_show(value)} -> {outcome}"
            context.log(f"{m.name} #{n}/{m.count}: {shown}" + (" [dry-run]" if m.dry_run else ""))
            context.record_measurement(
                m.name, n, kept, record["outcome"], error=error, dry_run=m.dry_run,
                ts=record["ts"], warnings=warnings,
            )  # fmt: skip
            if run.verdict is not None:
                context.record_artifact(name, json.dumps(run.document()))
                return


analysis = AnalysisStep


@sdk.hookimpl(trylast=True)
def shipyard_analysis_measure(metric: Metric, context: MeasureContext) -> Any:
    """The built-in measurement: the provider's ``measure(ctx)`` (sync or async)."""
    import inspect

    result = metric.provider.measure(context)
    if inspect.isawaitable(result):
        return result

    async def done() -> Any:
        return result

    return done()


@sdk.hookimpl
def shipyard_register_step_types(registry: sdk.StepTypeRegistry) -> None:
    registry.add(AnalysisStep)


@sdk.hookimpl
def shipyard_register_metric_providers(registry: sdk.ProviderRegistry) -> None:
    registry.add("prometheus", prometheus)
    registry.add("http_json", http_json)
    registry.add("python_metric", python_metric)
