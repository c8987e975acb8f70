"""What the Docker steps of a killed deployment left, removed by the next command.

Both step types record what they are about to create before they create it (an artifact in the
history), and ``docker.service`` records when the new container took the traffic. The command
that finds the deployment's process dead (``shipyard_cleanup_interrupted``) then settles each
step the way the step itself would have, had it been able to:

- ``docker.run``: its one-off container is removed.
- ``docker.service`` before the switch: the new container never served; it is removed, and
  the router is left as it was, on the container that kept serving. Without a router, a
  container the step had stopped to free the port is started again.
- ``docker.service`` after the switch: the new container serves; the old one is removed, as
  the step would have done after draining.
- ``docker.service`` killed during the switch (a few milliseconds): either container may serve,
  so both are left running, and the log says which to check.
- ``docker.service`` with ``strategy=sy.canary(...)``: until the move to 100% is done the new
  container is removed (the router plugin puts 100% back on the old one from the step's
  ``route:<service>`` artifact); after it, the old one is removed.

Only containers carrying the step's ``shipyard.*`` labels are touched, as everywhere else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

from ._engine import API_TIMEOUT
from ._engine import docker_sdk
from ._labels import carries

if TYPE_CHECKING:
    from shipyard.sdk import ArtifactRow

#: Recorded by ``docker.service`` before it starts anything: service, new and old containers.
SERVICE_ARTIFACT: Final = "docker.service"
#: Recorded by ``docker.service`` just before it asks the router to switch (the new name).
SWITCHING_ARTIFACT: Final = "docker.service.switching"
#: Recorded by ``docker.service`` once the new container serves (its name).
SWITCHED_ARTIFACT: Final = "docker.service.switched"
#: Recorded by ``docker.run`` before it creates its container.
RUN_ARTIFACT: Final = "docker.run"

_SCOPE = ("shipyard.service", "shipyard.pipeline", "shipyard.environment")


def clean_up(artifacts: Sequence[ArtifactRow], log: Callable[[str], None]) -> None:
    """Settle every Docker step of an interrupted deployment (see the module's docstring)."""
    mine = [a for a in artifacts if a["name"] in (SERVICE_ARTIFACT, RUN_ARTIFACT)]
    if not mine:
        return
    client = docker_sdk().from_env(timeout=int(API_TIMEOUT))
    try:
        api = client.api

        def steps_with(name: str) -> set[tuple[int, int]]:
            return {(a["stage_idx"], a["step_idx"]) for a in artifacts if a["name"] == name}

        switched, switching = steps_with(SWITCHED_ARTIFACT), steps_with(SWITCHING_ARTIFACT)
        for a in mine:
            info = json.loads(a["content"])
            new, labels = info["container"], info["labels"]
            if a["name"] == RUN_ARTIFACT:
                if _remove(api, new, labels):
                    log(f"removed {new}, the container of step {a['step']!r}")
                continue
            service, old = info["service"], info["old"]
            scope = {k: labels[k] for k in _SCOPE if k in labels}
            step = (a["stage_idx"], a["step_idx"])
            canary = info.get("strategy") == "canary"
            if canary and _canary_finished(artifacts, step, service, info.get("port")):
                switched.add(step)
            if step in switched:
                if old and _remove(api, old, scope):
                    log(f"{new} already served {service}: removed the old container {old}")
                continue
            if canary:  # the router plugin puts 100% back on the old one (route:<service>)
                if _remove(api, new, labels):
                    log(f"removed {new}: the canary of {service} never reached 100%; {old} "
                        "serves all of it again")  # fmt: skip
                continue
            if step in switching:  # killed while the router switched: either may serve
                log(
                    f"killed while the router switched {service} to {new}: {new} and {old} "
                    "were both left running, since either may be serving; see which one the "
                    "router uses, then remove the other (docker rm -f NAME) before the next "
                    "deployment"
                )
                continue
            if _remove(api, new, labels):
                where = "the router still sends it to " + old if info["router"] and old else ""
                log(f"removed {new}: it never served {service}" + (f"; {where}" if where else ""))
            if old and not info["router"] and _start_if_stopped(api, old, scope):
                log(f"started {old} again: it was stopped to free the port for {new}")
    finally:
        client.close()


def _canary_finished(
    artifacts: Sequence[ArtifactRow], step: tuple[int, int], service: str, port: Any
) -> bool:
    """Whether a canary's last weight change (100% on the new ``port``) was done."""
    for a in artifacts:
        if (a["stage_idx"], a["step_idx"]) == step and a["name"] == f"route:{service}":
            route = json.loads(a["content"])
            settle = route.get("settle") or {}
            return route.get("state") == "set" and settle.get(str(port)) == 100
    return False


def _ours(api: Any, name: str, labels: Mapping[str, str]) -> dict[str, Any] | None:
    """Container ``name`` as the engine describes it, if it exists and carries ``labels``."""
    try:
        info: dict[str, Any] = api.inspect_container(name)
    except docker_sdk().errors.NotFound:
        return None
    return info if carries(info.get("Config", {}).get("Labels"), labels) else None


def _remove(api: Any, name: str, labels: Mapping[str, str]) -> bool:
    """Force-remove container ``name`` if it is ours."""
    info = _ours(api, name, labels)
    if info is None:
        return False
    try:
        api.remove_container(info["Id"], v=True, force=True)
    except docker_sdk().errors.NotFound:
        return False
    return True


def _start_if_stopped(api: Any, name: str, labels: Mapping[str, str]) -> bool:
    info = _ours(api, name, labels)
    if info is None or info.get("State", {}).get("Running"):
        return False
    api.start(info["Id"])
    return True
