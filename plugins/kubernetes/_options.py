"""What both steps share: their options checked when the pipelines file loads, and their timing.

Every check raises :class:`~shipyard.sdk.PipelineDefinitionError` naming the step kind, so a
mistake in the pipelines file shows up in ``list`` and ``plan``, long before a cluster is asked.
"""

from __future__ import annotations

import re
from typing import Any
from typing import Final

from shipyard.sdk import PipelineDefinitionError

#: ``(connect, read)`` seconds of one API call, unless a step sets ``request_timeout``.
DEFAULT_REQUEST_TIMEOUT: Final = (5.0, 30.0)
#: The longest pause between two looks at a rollout or a Job (they start at 0.1 s and grow).
MAX_POLL_INTERVAL: Final = 1.0

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")


def is_dns_label(value: str) -> bool:
    """Whether ``value`` is a DNS label: lowercase letters, digits and ``-``, not at the ends."""
    return _DNS_LABEL.match(value) is not None


def check_request_timeout(value: Any, kind: str) -> tuple[float, float]:
    """``request_timeout`` as a ``(connect, read)`` pair of seconds.

    A single number is the read timeout, and the connect timeout when it is shorter than the
    default one.
    """

    def number(x: Any) -> bool:
        return not isinstance(x, bool) and isinstance(x, (int, float)) and x > 0

    if number(value):
        return (min(float(value), DEFAULT_REQUEST_TIMEOUT[0]), float(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(number(x) for x in value):
        return (float(value[0]), float(value[1]))
    raise PipelineDefinitionError(
        f"{kind} step: request_timeout must be seconds or a (connect, read) pair of seconds, "
        f"got {value!r}"
    )


def check_optional_name(value: Any, what: str, kind: str) -> str | None:
    """A non-empty string or None; a ``namespace`` must be a DNS label (or a secret)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise PipelineDefinitionError(
            f"{kind} step: {what} must be a non-empty string, got {value!r}"
        )
    if what == "namespace" and "{{shipyard.secret:" not in value and not is_dns_label(value):
        raise PipelineDefinitionError(
            f"{kind} step: namespace must be a DNS label (lowercase letters, digits and '-'), "
            f"got {value!r}"
        )
    return value


def check_flag(value: Any, what: str, kind: str) -> bool:
    """``True`` or ``False``, nothing merely truthy."""
    if not isinstance(value, bool):
        raise PipelineDefinitionError(f"{kind} step: {what} must be True or False, got {value!r}")
    return value


def short(text: str, limit: int = 60) -> str:
    """``text``, cut to ``limit`` characters with ``...`` when longer."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def deadline_margin(timeout: float) -> float:
    """How much earlier than the runner's timeout a step gives up by itself, with its reasons."""
    return min(2.0, timeout * 0.2)
