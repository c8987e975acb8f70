"""The ``docker.run`` and ``docker.service`` steps: containers on a Docker engine.

::

    sy.docker.run("shipyard/migrate:1.4", ["./migrate", "up"], env={"DB_URL": sy.secret("DB_URL")})
    sy.docker.service(
        "webapp", image=f"webapp:{d.version}",
        health_check=sy.health_check("/healthz"), router=sy.nginx("/etc/nginx/shipyard"),
    )

The engine is the one ``DOCKER_HOST`` names (``unix://``, ``ssh://user@host``, ``tcp://host:2376``
with ``DOCKER_TLS_VERIFY``/``DOCKER_CERT_PATH``), else the default socket: whatever the Docker SDK
for Python's ``docker.from_env()`` reaches. The SDK is imported when a docker step runs, never when
a pipelines file is loaded or planned; each step run opens one client and closes it at the end.

The SDK blocks, so its calls run in worker threads and the runner keeps streaming other steps;
container output is read by a thread of its own and logged on the event loop, line by line.
Everything Shipyard creates carries ``shipyard.*`` labels, and only containers with the labels of
the same pipeline, environment and service are ever stopped or removed.

The package uses only :mod:`shipyard.sdk`; its modules:

- ``_options``: the options both steps share, checked when the pipelines file loads;
- ``_engine``: where the engine is, the client of one step run, its errors in words;
- ``_labels``: container names and the ``shipyard.*`` labels;
- ``_logs``: streaming a container's output, and how it exited;
- ``_run``: the ``docker.run`` step;
- ``_health``: ``docker.service``'s health checks, and waiting for healthy;
- ``_service``: the ``docker.service`` step, its blue-green protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shipyard.sdk import hookimpl
from shipyard.sdk import lazy_exports

if TYPE_CHECKING:
    from collections.abc import Callable

    from shipyard.sdk import ArtifactRow
    from shipyard.sdk import StepTypeRegistry

__all__ = [
    "API_TIMEOUT",
    "DEFAULT_ENGINE",
    "LABEL_PREFIX",
    "MIN_UPTIME",
    "POLL_INTERVAL",
    "PULL_POLICIES",
    "DockerRunStep",
    "DockerServiceStep",
    "DockerSteps",
    "Engine",
    "LogPump",
    "docker",
    "engine_address",
    "engine_hostname",
    "shipyard_cleanup_interrupted",
    "shipyard_register_step_types",
]

#: Where each public name lives. Nothing is imported until it is used: loading the built-in
#: plugins (every ``deploy``, ``list`` and ``plan``) costs this module alone, not its modules.
_LAZY = {
    "API_TIMEOUT": "._engine",
    "DEFAULT_ENGINE": "._engine",
    "DockerRunStep": "._run",
    "DockerServiceStep": "._service",
    "DockerSteps": "._facade",
    "Engine": "._engine",
    "LABEL_PREFIX": "._labels",
    "LogPump": "._logs",
    "MIN_UPTIME": "._health",
    "POLL_INTERVAL": "._health",
    "PULL_POLICIES": "._options",
    "docker": "._facade",
    "engine_address": "._engine",
    "engine_hostname": "._engine",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)


@hookimpl
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    # By name: the step classes are imported when a pipeline builds such a step.
    registry.add("shipyard.plugins.docker._run:DockerRunStep", kind="docker.run")
    registry.add("shipyard.plugins.docker._service:DockerServiceStep", kind="docker.service")


@hookimpl
def shipyard_cleanup_interrupted(artifacts: list[ArtifactRow], log: Callable[[str], None]) -> None:
    """Remove what the Docker steps of a killed deployment left (see ``_cleanup``)."""
    from ._cleanup import clean_up

    clean_up(artifacts, log)
