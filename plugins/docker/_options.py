"""The options both docker steps share: checked when a pipelines file is loaded, shown by ``plan``.

Every check raises :class:`~shipyard.sdk.PipelineDefinitionError` naming the step type
(``kind``), so a mistake fails ``shipyard list`` and ``plan`` rather than a deployment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import Final
from typing import Literal
from typing import cast

from shipyard.sdk import PipelineDefinitionError

if TYPE_CHECKING:
    from shipyard.sdk import StepContext

PullPolicy = Literal["missing", "always", "never"]

PULL_POLICIES: Final = ("missing", "always", "never")


# -- checks ---------------------------------------------------------------------------------------


def str_list(value: Any, what: str, kind: str) -> list[str] | None:
    """``value`` as a list of strings (one string is a list of one); None stays None."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, Sequence) and all(
        isinstance(v, (str, int, float, os.PathLike)) for v in value
    ):
        return [os.fspath(v) if isinstance(v, os.PathLike) else str(v) for v in value]
    raise PipelineDefinitionError(
        f"{kind} step: {what} must be a string or a list of strings, got {value!r}"
    )


def check_command(value: Any, kind: str) -> str | list[str] | None:
    """The container's command: a string, a list of strings, or None for the image's own."""
    if isinstance(value, str):
        if not value.strip():
            raise PipelineDefinitionError(f"{kind} step: command is an empty string")
        return value  # split by the engine's rules (the SDK uses shlex)
    return str_list(value, "command", kind)


def check_env(value: Any, kind: str) -> dict[str, str]:
    """Extra environment variables; values stay as given (a secret's placeholder is a string)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise PipelineDefinitionError(
            f"{kind} step: env must map variable names to values, got {value!r}"
        )
    return {k: v if isinstance(v, str) else str(v) for k, v in value.items()}


def check_labels(value: Any, kind: str) -> dict[str, str]:
    """Extra container labels, values as strings."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k for k in value):
        raise PipelineDefinitionError(
            f"{kind} step: labels must map label keys to values, got {value!r}"
        )
    return {k: str(v) for k, v in value.items()}


def check_volumes(value: Any, kind: str) -> list[str]:
    """``{"./data": "/data:ro"}`` or ``["./data:/data:ro"]`` as ``host:container[:mode]`` strings."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        out = []
        for host, target in value.items():
            if not isinstance(host, (str, os.PathLike)) or not isinstance(target, str):
                raise PipelineDefinitionError(
                    f"{kind} step: volumes must map host paths (or volume names) to container "
                    f"paths, got {host!r}: {target!r}"
                )
            out.append(f"{os.fspath(host)}:{target}")
        return out
    items = str_list(value, "volumes", kind) or []
    for item in items:
        if ":" not in item:
            raise PipelineDefinitionError(
                f"{kind} step: volume {item!r} must read 'HOST:CONTAINER[:MODE]'"
            )
    return items


def check_pull(value: Any, kind: str) -> PullPolicy:
    """One of :data:`PULL_POLICIES`."""
    if value not in PULL_POLICIES:
        raise PipelineDefinitionError(
            f"{kind} step: pull must be 'missing', 'always' or 'never', got {value!r}"
        )
    return cast("PullPolicy", value)


def check_image(value: Any, kind: str) -> str:
    """An image reference: not empty, no whitespace (the engine checks the rest)."""
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
        raise PipelineDefinitionError(
            f"{kind} step: image must be an image reference such as 'web:1.2', got {value!r}"
        )
    return value


# -- at run time ----------------------------------------------------------------------------------


def resolve_binds(binds: list[str], context: StepContext) -> list[str]:
    """Relative host paths (``./data``, ``conf/x``) are relative to the pipelines file."""
    out = []
    for bind in binds:
        host, _, rest = bind.partition(":")
        if host.startswith(".") or ("/" in host and not host.startswith("/")):
            host = os.fspath((context.rootdir / host).resolve())
        out.append(f"{host}:{rest}")
    return out


# -- display --------------------------------------------------------------------------------------


def short(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters, ``...`` marking the cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_command(command: str | list[str] | None) -> str:
    """A command as a shell would read it; ``""`` for the image's default."""
    if command is None:
        return ""
    if isinstance(command, str):
        return command
    import shlex

    return shlex.join(command)


def show_env(env: Mapping[str, str]) -> str:
    """``K=V,K2=V2`` (secrets are placeholders here, masked by ``plan``)."""
    return ",".join(f"{k}={v}" for k, v in env.items())
