"""The HTTP probe engine: real HTTP, retried until healthy or the deadline.

:class:`HttpProbe` is a checked description of one probe (URL, healthy statuses, deadline, ...);
:func:`probe_until_healthy` runs it. The ``health_check`` step is a thin step around a probe, and
other steps (``docker.service(health_check=...)``, a Kubernetes apply, a third-party plugin)
run the same engine through :mod:`shipyard.sdk` without importing another plugin.

Every attempt is one line of output with what it saw and how long it took. Attempts back off
exponentially with jitter, from :data:`FIRST_DELAY` up to ``interval``; each attempt has its own
request timeout, so a server that accepts and never answers cannot eat the deadline, and the
deadline itself is enforced. When the check gives up, the failure names the URL, the attempts
made, the time spent, the last HTTP answer (status and a short excerpt of the body) and the last
connection error, with a hint at the likely cause.

httpx and tenacity are imported when a probe runs, never when a pipelines file is loaded.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

from ._exceptions import HealthCheckFailed
from ._exceptions import PipelineDefinitionError
from ._secrets import mask

if TYPE_CHECKING:
    import ssl

    import httpx


#: The first pause between attempts (seconds); it doubles up to ``interval``.
FIRST_DELAY: Final = 0.05
#: The per-attempt request timeout when none is given (capped by the time left).
DEFAULT_REQUEST_TIMEOUT: Final = 5.0
#: An attempt is started only if at least this much of the deadline is left (seconds).
MIN_WINDOW: Final = 0.05
#: Bytes of a body read when ``contains`` is given; beyond it the body counts as not containing.
MAX_BODY: Final = 1 << 20
#: Bytes of a body read otherwise (for the excerpt shown in a failure).
EXCERPT_BYTES: Final = 64 * 1024
#: Characters of the body shown in a failure.
EXCERPT_CHARS: Final = 200
#: Methods a health check may use.
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_PLACEHOLDER_START = "{{shipyard.secret:"


# -- the expected statuses ------------------------------------------------------------------------


def _expect_set(expect: Any) -> range | frozenset[int]:
    """Normalise ``expect`` (one status, a collection, or a range); raise ValueError if invalid."""
    if isinstance(expect, bool):
        raise ValueError
    if isinstance(expect, int):
        values: range | frozenset[int] = frozenset({expect})
    elif isinstance(expect, range):
        if not expect:
            raise ValueError
        values = expect
    elif isinstance(expect, Iterable) and not isinstance(expect, (str, bytes, Mapping)):
        items = list(expect)
        if not items or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
            raise ValueError
        values = frozenset(items)
    else:
        raise ValueError
    if min(values) < 100 or max(values) > 599:
        raise ValueError
    return values


def describe_expect(values: range | frozenset[int]) -> str:
    if isinstance(values, range):
        if values.step == 1:
            return f"{values.start}-{values.stop - 1}"
        return ", ".join(str(v) for v in values)
    ordered = sorted(values)
    if len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ", ".join(str(v) for v in ordered)


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


# -- the probe ------------------------------------------------------------------------------------


class HttpProbe:
    """One HTTP check, its arguments checked: what :func:`probe_until_healthy` runs.

    :param url: the URL to probe; may contain secrets. A path alone (``"/healthz"``) is allowed
        where the caller supplies the host (see :meth:`url_for`).
    :param expect: the healthy status: one code, a collection of codes, or a ``range``.
    :param timeout: the deadline of the whole check, in seconds (kept as :attr:`deadline`).
    :param interval: the longest time between the starts of two attempts, in seconds; it
        starts at :data:`FIRST_DELAY` and doubles (with jitter) up to ``interval``.
    :param method: the HTTP method.
    :param contains: text the body must contain to be healthy.
    :param headers: request headers; values may contain secrets.
    :param verify: verify TLS certificates (default), ``False`` not to, or the path of a CA
        bundle (PEM file or directory) for servers with a private CA.
    :param follow_redirects: follow redirects; by default a redirect is an unhealthy answer.
    :param request_timeout: the timeout of one attempt (default :data:`DEFAULT_REQUEST_TIMEOUT`,
        never more than the time left).
    :param label: what the errors call the check's owner ("health_check step").
    :raises PipelineDefinitionError: an argument is invalid; the message names ``label``.
    """

    def __init__(
        self,
        url: str,
        expect: int | Iterable[int] | range = 200,
        timeout: float = 60,
        interval: float = 1.0,
        method: str = "GET",
        contains: str | None = None,
        headers: Mapping[str, str] | None = None,
        verify: bool | str | os.PathLike[str] | ssl.SSLContext = True,
        *,
        follow_redirects: bool = False,
        request_timeout: float | None = None,
        label: str = "health check",
    ) -> None:
        def bad(text: str) -> PipelineDefinitionError:
            return PipelineDefinitionError(f"{label}: {text}")

        self.url = _check_url(url, label)
        try:
            self.expect = _expect_set(expect)
        except ValueError:
            raise bad(
                "expect must be an HTTP status (100-599), a non-empty collection of them or a "
                f"range, got {expect!r}"
            ) from None
        if not _positive(timeout):
            raise bad(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not _positive(interval):
            raise bad(f"interval must be a positive number of seconds, got {interval!r}")
        if request_timeout is not None and not _positive(request_timeout):
            raise bad(
                f"request_timeout must be a positive number of seconds, got {request_timeout!r}"
            )
        if not isinstance(method, str) or method.upper() not in METHODS:
            raise bad(f"method must be one of {', '.join(sorted(METHODS))}, got {method!r}")
        if contains is not None and (not isinstance(contains, str) or not contains):
            raise bad(f"contains must be a non-empty string, got {contains!r}")
        if contains is not None and method.upper() == "HEAD":
            raise bad("contains needs a body, and HEAD answers have none; use method='GET'")
        if headers is not None and (
            not isinstance(headers, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
        ):
            raise bad(f"headers must map strings to strings, got {headers!r}")
        if not isinstance(verify, (bool, str, os.PathLike)) and not _is_ctx(verify):
            raise bad(
                "verify must be True, False, the path of a CA bundle or an ssl.SSLContext, "
                f"got {verify!r}"
            )
        if isinstance(verify, (str, os.PathLike)) and not os.fspath(verify):
            raise bad("verify is an empty path")
        if not isinstance(follow_redirects, bool):
            raise bad(f"follow_redirects must be True or False, got {follow_redirects!r}")
        #: Seconds the whole check may take (the ``timeout`` argument).
        self.deadline = float(timeout)
        self.interval = float(interval)
        self.method = method.upper()
        self.contains = contains
        self.headers: dict[str, str] = dict(headers or {})
        self.verify = verify
        self.follow_redirects = follow_redirects
        self.request_timeout = float(request_timeout or DEFAULT_REQUEST_TIMEOUT)

    def __repr__(self) -> str:
        return f"<HttpProbe {self.describe()}>"

    def describe(self) -> str:
        """The probe on one line, for ``plan`` (secret placeholders shown as they are)."""
        text = f"{self.method} {self.url} expect {describe_expect(self.expect)}"
        if self.contains is not None:
            text += f" containing {self.contains!r}"
        text += f" within {self.deadline:g}s (interval <= {self.interval:g}s)"
        extra = []
        if self.follow_redirects:
            extra.append("follow redirects")
        if self.verify is False:
            extra.append("TLS unverified")
        elif self.verify is not True:
            extra.append(f"CA {_verify_text(self.verify)}")
        if self.headers:
            extra.append("headers " + ", ".join(sorted(self.headers)))
        return text + (f"  ({'; '.join(extra)})" if extra else "")

    def url_for(self, base: str) -> str:
        """The URL to probe when the service answers at ``base`` (``scheme://host:port``).

        A path-only URL is appended to ``base``; a full URL keeps its path and query and takes
        the scheme, host and port of ``base``. This is how ``docker.service`` points the check at
        the slot it just started.
        """
        from urllib.parse import urlsplit
        from urllib.parse import urlunsplit

        b = urlsplit(base)
        u = urlsplit(self.url)
        path = u.path or "/"
        return urlunsplit((b.scheme, b.netloc, path, u.query, ""))


def _is_ctx(value: Any) -> bool:
    return type(value).__name__ == "SSLContext"


def _verify_text(verify: Any) -> str:
    return "ssl context" if _is_ctx(verify) else os.fspath(verify)


def _check_url(url: Any, label: str) -> str:
    if not isinstance(url, str) or not url:
        raise PipelineDefinitionError(f"{label}: url must be a non-empty string, got {url!r}")
    if url.startswith(("/", _PLACEHOLDER_START)):
        return url
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise PipelineDefinitionError(f"{label}: url {mask(url)!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PipelineDefinitionError(
            f"{label}: url {mask(url)!r} is not an http:// or https:// URL "
            "(or a path such as '/healthz' inside docker.service)"
        )
    return url


@dataclass
class Attempt:
    """What one attempt saw."""

    #: 1 for the first attempt.
    number: int
    #: Seconds the attempt took.
    elapsed: float
    #: The HTTP status, when the server answered.
    status: int | None = None
    #: The reason phrase of the answer ("Service Unavailable").
    reason: str = ""
    #: The start of the body (decoded, masked), when the server answered.
    body: str = ""
    #: Where a redirect pointed (masked).
    location: str | None = None
    #: The connection error, when there was no answer ("connection refused", ...).
    error: str | None = None
    #: A hint at the likely cause of ``error``.
    hint: str = ""
    #: Why the answer is not healthy; None when it is.
    problem: str | None = None
    #: A short label for the tally of outcomes ("HTTP 503", "connection refused").
    label: str = ""

    @property
    def healthy(self) -> bool:
        return self.problem is None

    def line(self) -> str:
        """The attempt's line of output."""
        took = _ms(self.elapsed)
        if self.healthy:
            return f"attempt {self.number}: HTTP {self.status} {self.reason} in {took}: healthy"
        return f"attempt {self.number}: {self.problem} ({took})"


@dataclass
class ProbeReport:
    """The outcome of :func:`probe_until_healthy`."""

    #: The URL probed, masked.
    url: str
    method: str
    healthy: bool
    #: How many attempts were made.
    attempts: int
    #: Seconds from the first attempt to the end.
    elapsed: float
    #: The last attempt.
    last: Attempt
    #: The last attempt that got an HTTP answer, if any.
    last_answer: Attempt | None = None
    #: The last attempt that got no answer (a connection error), if any.
    last_error: Attempt | None = None
    #: How many attempts ended each way ("HTTP 503": 12, "connection refused": 3).
    tally: Counter[str] = field(default_factory=Counter)
    deadline: float = 0.0

    def failure_message(self) -> str:
        """What a person needs to know when the check gave up (secrets masked).

        The first line says it all (URL, attempts, time, the last outcome); the next lines give
        the last answer's body, the last connection error, a hint and the tally of outcomes.
        """
        n = self.attempts
        last = self.last
        lines = [
            f"{self.method} {self.url} not healthy after {n} attempt{'s' if n != 1 else ''} "
            f"in {self.elapsed:.1f}s (timeout {self.deadline:g}s): {last.problem}"
        ]
        answer = self.last_answer
        if answer is not None:
            if answer is not last:
                lines.append(
                    f"last HTTP answer: {answer.problem or f'HTTP {answer.status}'} "
                    f"(attempt {answer.number})"
                )
            lines.append(f"body: {answer.body!r}" if answer.body else "body: (empty)")
        error = self.last_error
        if error is not None and error is not last:
            lines.append(f"last connection error: {error.error} (attempt {error.number})")
        hint = last.hint or (error.hint if error is not None else "")
        if hint:
            lines.append(f"hint: {hint}")
        if len(self.tally) > 1:
            seen = ", ".join(f"{count}x {label}" for label, count in self.tally.most_common())
            lines.append(f"outcomes: {seen}")
        return "\n  ".join(mask(line) for line in lines)


def _secs(seconds: float) -> str:
    return f"{round(seconds, 2):g}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


def display_url(url: str) -> str:
    """``url`` fit to show: secrets masked and any password in it replaced by ``***``."""
    text = mask(url)
    from urllib.parse import urlsplit
    from urllib.parse import urlunsplit

    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if parts.password:
        host = parts.netloc.rpartition("@")[2]
        text = urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    return text


def ssl_verify(verify: Any, url: str, follow_redirects: bool = False) -> Any:
    """The ``verify`` value to give httpx for ``url``.

    A CA bundle path becomes an :class:`ssl.SSLContext` (httpx deprecates paths). A plain
    ``http://`` URL that will not be redirected never does TLS, so it skips loading the system
    trust store (~80 ms).

    :raises FileNotFoundError: the CA bundle does not exist.
    """
    if _is_ctx(verify) or verify is False:
        return verify
    if url.startswith("http://") and not follow_redirects:
        return False
    if verify is True:
        return True
    import ssl

    path = os.fspath(verify)
    if os.path.isdir(path):
        return ssl.create_default_context(capath=path)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    return ssl.create_default_context(cafile=path)


def classify_error(exc: BaseException, url: str, budget: float) -> tuple[str, str, str]:
    """``(label, error, hint)`` for a failed request."""
    import httpx

    text = str(exc) or type(exc).__name__
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        where = parts.netloc.rpartition("@")[2] or parts.netloc
    except ValueError:
        where = "the server"
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
            return (
                "connect timeout",
                f"could not connect within {_secs(budget)}s (request timeout)",
                f"is {where} reachable from here (firewall, wrong address)?",
            )
        return (
            "timeout",
            f"no answer within {_secs(budget)}s (request timeout)",
            f"{where} accepted the connection but did not answer; is the service stuck or "
            "still starting? raise request_timeout if it is merely slow",
        )
    lowered = text.lower()
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        reason = text.split("certificate verify failed:", 1)[-1].split("(_ssl")[0].strip()
        return (
            "TLS verification failed",
            f"TLS certificate verification failed: {reason}",
            "if the server uses a private CA, pass verify='/path/to/ca.pem'",
        )
    if "ssl" in lowered or "tls" in lowered or "wrong version number" in lowered:
        return (
            "TLS error",
            f"TLS handshake failed: {text}",
            "is this an https:// URL for a server that speaks plain HTTP (or the reverse)?",
        )
    if isinstance(exc, httpx.ConnectError):
        if "refused" in lowered or _caused_by(exc, ConnectionRefusedError):
            return (
                "connection refused",
                "connection refused",
                f"nothing listens on {where}; did the service start, and on that port?",
            )
        if (
            "name or service not known" in lowered
            or "nodename nor servname" in lowered
            or ("name resolution" in lowered)
        ):
            return (
                "name not resolved",
                f"cannot resolve the host name: {text}",
                "check the host name in the URL",
            )
        return ("connect error", f"cannot connect: {text}", "")
    if isinstance(exc, httpx.RemoteProtocolError):
        if "without sending" in lowered or "disconnected" in lowered:
            return (
                "connection closed",
                "the server closed the connection without answering",
                f"{where} accepts connections but drops them: a crashing worker, a proxy with "
                "no upstream, or a non-HTTP service on that port",
            )
        return ("protocol error", f"invalid HTTP answer: {text}", "is this an HTTP service?")
    if isinstance(exc, (httpx.ReadError, httpx.WriteError)):
        return (
            "connection reset",
            f"the connection broke: {text}",
            f"{where} reset the connection; is the service crashing?",
        )
    if isinstance(exc, httpx.TooManyRedirects):
        return ("too many redirects", f"too many redirects: {text}", "is there a redirect loop?")
    return (type(exc).__name__, f"{type(exc).__name__}: {text}", "")


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` or an exception in its chain (anyio wraps them) is a ``kind``."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return True
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        todo += list(getattr(e, "exceptions", ()))
    return False


class _Probe:
    """One check's HTTP client, used from a worker thread of its own.

    httpx's synchronous client in a thread costs about a third of its asyncio client per
    request (no anyio machinery, far fewer event-loop wake-ups) and no more than twice a plain
    urllib request; one client per check reuses its connection from attempt to attempt. Only
    the worker thread touches the client; the event loop awaits its results.
    """

    def __init__(self, spec: HttpProbe, verify: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.spec = spec
        self.verify = verify
        self.client: httpx.Client | None = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="shipyard-health-check")

    def request(
        self, url: str, headers: dict[str, str], budget: float
    ) -> tuple[httpx.Response, bytes, bool]:
        """(response, up to the body limit of its body, whether it was cut); in the worker."""
        import httpx

        if self.client is None:  # built here: loading a trust store takes ~80 ms
            self.client = httpx.Client(
                verify=self.verify, follow_redirects=self.spec.follow_redirects
            )
        limit = MAX_BODY if self.spec.contains is not None else EXCERPT_BYTES
        # httpx's timeout bounds each phase; this bounds the body, so a server that trickles
        # bytes cannot keep the worker busy long after the attempt was given up.
        stop_at = time.monotonic() + budget
        chunks: list[bytes] = []
        size, cut = 0, False
        with self.client.stream(
            self.spec.method, url, headers=headers, timeout=httpx.Timeout(budget)
        ) as response:
            if self.spec.method != "HEAD":
                for chunk in response.iter_bytes():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size >= limit:
                        cut = True
                        break
                    if time.monotonic() > stop_at:
                        raise httpx.ReadTimeout("the body did not arrive in time")
        return response, b"".join(chunks)[:limit], cut

    def close(self) -> None:
        """Close the client after any request still running; do not wait for it."""

        def close_client() -> None:
            if self.client is not None:
                self.client.close()

        self.executor.submit(close_client)
        self.executor.shutdown(wait=False)


def body_excerpt(body: bytes, cut: bool = False, chars: int = EXCERPT_CHARS) -> str:
    """The start of ``body`` on one line, at most ``chars`` characters, secrets masked.

    Masking comes before shortening, and the text is first cut where no secret is split, so no
    part of a secret can show.
    """
    from shipyard._secrets import cut_point

    text = body[: chars * 8].decode("utf-8", "replace")
    if len(text) > chars * 4:
        text, cut = text[: cut_point(text, chars * 4)], True
    text = " ".join(mask(text).split())
    if len(text) > chars:
        text, cut = text[:chars], True
    return text + "..." if cut and text else text


async def _probe_once(
    probe: _Probe,
    url: str,
    headers: dict[str, str],
    number: int,
    budget: float,
) -> Attempt:
    import asyncio

    import httpx

    spec = probe.spec
    start = time.monotonic()
    loop = asyncio.get_running_loop()
    try:
        # The worker's own timeouts end a request after `budget`; this bounds the wait for it.
        async with asyncio.timeout(budget + 0.25):
            response, body, cut = await loop.run_in_executor(
                probe.executor, probe.request, url, headers, budget
            )
    except (httpx.HTTPError, httpx.InvalidURL, TimeoutError, OSError) as exc:
        label, error, hint = classify_error(exc, url, budget)
        return Attempt(
            number,
            time.monotonic() - start,
            error=mask(error),
            hint=mask(hint),
            problem=mask(error),
            label=label,
        )
    elapsed = time.monotonic() - start
    status = response.status_code
    attempt = Attempt(
        number,
        elapsed,
        status=status,
        reason=response.reason_phrase,
        body=body_excerpt(body, cut),
        label=f"HTTP {status}",
    )
    if status not in spec.expect:
        attempt.problem = f"HTTP {status} {response.reason_phrase}".rstrip() + (
            f" (expected {describe_expect(spec.expect)})"
        )
        location = response.headers.get("location")
        if 300 <= status < 400 and location:
            attempt.location = mask(location)
            attempt.problem += f", redirect to {attempt.location}"
            if not spec.follow_redirects:
                attempt.hint = "redirects are not followed; pass follow_redirects=True to follow"
    elif spec.contains is not None and spec.contains.encode() not in body:
        attempt.problem = f"HTTP {status} but the body does not contain {spec.contains!r}"
        if cut:
            attempt.problem += f" (in its first {MAX_BODY // 1024} KiB)"
        attempt.label = f"HTTP {status} without {spec.contains!r}"
    if attempt.problem:
        attempt.problem = mask(attempt.problem)
    return attempt


async def probe_until_healthy(
    check: HttpProbe | Any,
    url_override: str | None = None,
    log: Callable[[str], Any] | None = None,
    *,
    resolve: Callable[[Any], Any] | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> ProbeReport:
    """Probe until healthy or the deadline of ``check``; the reusable core of health checks.

    :param check: an :class:`HttpProbe`, or a step that carries one as ``probe`` (such as
        :func:`shipyard.health_check`).
    :param url_override: the URL to probe instead of ``check.url`` (e.g. from
        :meth:`HttpProbe.url_for`); it may contain secret placeholders.
    :param log: called with one line per attempt (``context.log`` in a step).
    :param resolve: replaces secret placeholders by their values (``context.resolve``); without
        it, values are used as they are.
    :param sleep: waits between attempts (``asyncio.sleep``); benchmarks replace it to measure
        the cost of the attempts alone.
    :returns: the report of a healthy check.
    :raises HealthCheckFailed: when the deadline passed; ``exc.report`` is the
        :class:`ProbeReport` and ``str(exc)`` explains the failure (secrets masked).
    """
    import asyncio

    import tenacity

    spec: HttpProbe = check if isinstance(check, HttpProbe) else check.probe
    resolve = resolve or (lambda value: value)
    emit = log or (lambda _text: None)
    raw_url = url_override or spec.url
    shown = display_url(raw_url)
    url = str(resolve(raw_url))
    if not url.startswith(("http://", "https://")):
        raise HealthCheckFailed(
            f"health check: {shown!r} is not an http:// or https:// URL; a path alone works only "
            "where another step supplies the host (docker.service(health_check=...))"
        )
    headers = {str(k): str(v) for k, v in resolve(dict(spec.headers)).items()}
    try:
        verify = ssl_verify(spec.verify, url, spec.follow_redirects)
    except FileNotFoundError as exc:
        raise HealthCheckFailed(
            f"health check of {shown}: the CA bundle {exc.args[0]!r} given as verify= does not "
            "exist"
        ) from None
    except OSError as exc:  # ssl.SSLError: not a PEM file
        raise HealthCheckFailed(
            f"health check of {shown}: cannot load the CA bundle {_verify_text(spec.verify)!r}: "
            f"{exc}"
        ) from None

    start = time.monotonic()
    deadline = start + spec.deadline
    tally: Counter[str] = Counter()
    state: dict[str, Attempt | None] = {"answer": None, "error": None, "last": None}
    counter = 0
    attempt_started = start

    async def attempt_once() -> Attempt:
        nonlocal counter, attempt_started
        counter += 1
        attempt_started = time.monotonic()
        budget = min(spec.request_timeout, max(deadline - time.monotonic(), MIN_WINDOW))
        a = await _probe_once(probe, url, headers, counter, budget)
        tally[a.label] += 1
        state["answer" if a.status is not None else "error"] = state["last"] = a
        emit(a.line())
        return a

    def wait(retry_state: tenacity.RetryCallState) -> float:
        n = retry_state.attempt_number
        cap = min(spec.interval, FIRST_DELAY * 2 ** min(n - 1, 30))
        delay = random.uniform(cap / 2, cap)  # "equal jitter": spreads probes, keeps the cap
        now = time.monotonic()
        # The pause runs from the start of the last attempt (its duration counts), so attempts
        # start at most `interval` apart; the next one starts at least MIN_WINDOW before the
        # deadline.
        return max(0.0, min(delay - (now - attempt_started), deadline - now - MIN_WINDOW))

    def stop(_retry_state: tenacity.RetryCallState) -> bool:
        return deadline - time.monotonic() < MIN_WINDOW

    retrying = tenacity.AsyncRetrying(
        wait=wait,
        stop=stop,
        retry=tenacity.retry_if_result(lambda a: not a.healthy),
        retry_error_callback=lambda rs: rs.outcome.result() if rs.outcome else None,
        sleep=sleep or asyncio.sleep,
    )
    probe = _Probe(spec, verify)
    last: Attempt | None = None
    try:
        # A backstop only: every attempt is already bounded by the time left.
        async with asyncio.timeout(spec.deadline + 2.0):
            last = await retrying(attempt_once)
    except TimeoutError:
        last = state["last"]
        if last is None:
            raise HealthCheckFailed(
                f"{spec.method} {shown}: no attempt finished within the timeout of "
                f"{spec.deadline:g}s"
            ) from None
    finally:
        probe.close()
    assert last is not None
    report = ProbeReport(
        url=shown,
        method=spec.method,
        healthy=last.healthy,
        attempts=counter,
        elapsed=time.monotonic() - start,
        last=last,
        last_answer=state["answer"],
        last_error=state["error"],
        tally=tally,
        deadline=spec.deadline,
    )
    if not report.healthy:
        failure = HealthCheckFailed(report.failure_message(), output=[last.line()])
        setattr(failure, "report", report)  # noqa: B010 - HealthCheckFailed has no such field
        raise failure
    return report
