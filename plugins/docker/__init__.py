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
from typing import Final
from typing import final

from shipyard.sdk import hookimpl

from ._engine import API_TIMEOUT
from ._engine import DEFAULT_ENGINE
from ._engine import Engine
from ._engine import engine_address
from ._engine import engine_hostname
from ._health import MIN_UPTIME
from ._health import POLL_INTERVAL
from ._labels import LABEL_PREFIX
from ._logs import LogPump
from ._options import PULL_POLICIES
from ._run import DockerRunStep
from ._service import DockerServiceStep

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


# Reprs, tracebacks and pickles keep naming the import path they had before the split into
# private modules: shipyard.plugins.docker.DockerRunStep, not ..._run.DockerRunStep.
for _cls in (DockerRunStep, DockerServiceStep, Engine, LogPump):
    _cls.__module__ = __name__
del _cls


@final
class DockerSteps:
    """``shipyard.docker``: the Docker step types, ``docker.run`` and ``docker.service``."""

    run: Final = DockerRunStep
    service: Final = DockerServiceStep

    def __repr__(self) -> str:
        return "<shipyard.docker: run, service>"


docker: Final = DockerSteps()


@hookimpl
def shipyard_register_step_types(registry: StepTypeRegistry) -> None:
    registry.add(DockerRunStep)
    registry.add(DockerServiceStep)


@hookimpl
def shipyard_cleanup_interrupted(artifacts: list[ArtifactRow], log: Callable[[str], None]) -> None:
    """Remove what the Docker steps of a killed deployment left (see ``_cleanup``)."""
    from ._cleanup import clean_up

    clean_up(artifacts, log)
