"""The ``health_check`` step: real HTTP, retried until healthy or the deadline.

::

    sy.health_check("http://127.0.0.1:8080/healthz", expect=200, timeout=60, interval=1.0)

The step is a thin shell around :class:`shipyard.sdk.HttpProbe`: the probe engine (attempts,
back-off, deadline, the explained failure) lives in the SDK, so ``docker.service(...,
health_check=sy.health_check("/healthz"))``, a Kubernetes apply or a third-party step run the very
same check through :func:`shipyard.sdk.probe_until_healthy`.

httpx and tenacity are imported when a check runs, never when a pipelines file is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any

from shipyard import sdk

if TYPE_CHECKING:
    import ssl


class HealthCheckStep(sdk.Step):
    """Probe ``url`` until it answers as expected, or fail when ``timeout`` seconds have passed.

    :param url: the URL to probe; may contain secrets. A path alone (``"/healthz"``) is allowed
        where another step supplies the host, as in ``docker.service(health_check=...)``.
    :param expect: the healthy status: one code, a collection of codes, or a ``range``.
    :param timeout: the deadline of the whole check, in seconds.
    :param interval: the longest time between the starts of two attempts, in seconds; it
        starts at 0.05 s and doubles (with jitter) up to ``interval``.
    :param method: the HTTP method.
    :param contains: text the body must contain to be healthy.
    :param headers: request headers; values may contain secrets.
    :param verify: verify TLS certificates (default), ``False`` not to, or the path of a CA
        bundle (PEM file or directory) for servers with a private CA.
    :param follow_redirects: follow redirects; by default a redirect is an unhealthy answer.
    :param request_timeout: the timeout of one attempt (default 5 s, never more than the time
        left).
    """

    kind = "health_check"

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
        name: str | None = None,
        retries: int = 0,
        **unknown: Any,
    ) -> None:
        sdk.reject_unknown_options(self, unknown)
        #: The checked probe this step runs.
        self.probe = sdk.HttpProbe(
            url,
            expect,
            timeout,
            interval,
            method,
            contains,
            headers,
            verify,
            follow_redirects=follow_redirects,
            request_timeout=request_timeout,
            label="health_check step",
        )
        # The check enforces its own deadline (and explains a failure far better than the
        # runner's generic "timed out"), so the step carries no runner timeout.
        super().__init__(name=name, timeout=None, retries=retries)

    @property
    def url(self) -> str:
        """The URL (or path) probed, as written."""
        return self.probe.url

    def default_name(self) -> str:
        return f"health check {self.url}"

    def describe(self) -> str:
        return self.probe.describe()

    def url_for(self, base: str) -> str:
        """The URL to probe when the service answers at ``base``; see :meth:`HttpProbe.url_for`."""
        return self.probe.url_for(base)

    async def run(self, context: sdk.StepContext) -> sdk.StepResult:
        await sdk.probe_until_healthy(self.probe, log=context.log, resolve=context.resolve)
        return sdk.StepResult()


health_check = HealthCheckStep


@sdk.hookimpl
def shipyard_register_step_types(registry: sdk.StepTypeRegistry) -> None:
    registry.add(HealthCheckStep)
