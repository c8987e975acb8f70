"""Names and ``shipyard.*`` labels of the containers Shipyard creates.

The labels are how Shipyard recognises its own containers: only those carrying the labels of
the same pipeline, environment (and service) are ever stopped or removed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

if TYPE_CHECKING:
    from shipyard.sdk import StepContext

#: Label keys Shipyard puts on every container it creates.
LABEL_PREFIX: Final = "shipyard."

_UNSAFE_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_.-]")


def container_name(*parts: str) -> str:
    """A valid container name from ``parts`` joined by ``-`` (unsafe characters become ``_``)."""
    name = "-".join(_UNSAFE_NAME_CHARS.sub("_", p) for p in parts if p)
    return name if name[:1].isalnum() else "c" + name


def base_labels(context: StepContext) -> dict[str, str]:
    """The labels of every container a deployment creates."""
    d = context.deployment
    return {
        "shipyard.pipeline": d.pipeline,
        "shipyard.environment": d.environment,
        "shipyard.version": d.version,
        "shipyard.deployment": str(d.id),
    }


def carries(labels: Mapping[str, str] | None, wanted: Mapping[str, str]) -> bool:
    """Whether ``labels`` has every label of ``wanted``: Shipyard touches only such containers."""
    have = labels or {}
    return all(have.get(k) == v for k, v in wanted.items())


def name_of(container: Mapping[str, Any]) -> str:
    """The name of a container as the engine lists it (``/web-1.2`` is ``web-1.2``)."""
    names = container.get("Names") or [container.get("Id", "?")[:12]]
    return str(names[0]).lstrip("/")


def port_of(container: Mapping[str, Any] | None) -> int | None:
    """The port (slot) a service container was started on, from its ``shipyard.port`` label."""
    if container is None:
        return None
    try:
        return int((container.get("Labels") or {})["shipyard.port"])
    except (KeyError, ValueError):
        return None
