"""An example Shipyard plugin: the ``template`` step type and the ``journal`` notifier.

Registered through the ``shipyard`` entry-point group (see pyproject.toml)::

    [project.entry-points.shipyard]
    example = "shipyard_example"

Use it in a pipelines file::

    from shipyard_example import journal, template

    @sy.pipeline(notify=[journal("deploys.log")])
    def site(d):
        return [sy.stage("config", template("nginx.conf.in", "nginx.conf", port=8080))]
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

import shipyard

__version__ = "1.0.0"


class TemplateStep(shipyard.Step):
    """Render the file ``src`` into ``dest``, replacing ``${name}`` placeholders.

    The values are the keyword arguments, plus ``DEPLOYMENT_VERSION``, ``DEPLOYMENT_ENVIRONMENT``
    and the other ``DEPLOYMENT_*`` values. Paths are relative to the folder of the pipelines file.
    ``dest`` is replaced atomically, so a reader never sees half a file.
    """

    #: The step type's name: unique among all plugins, shown by ``plan`` and ``shipyard plugins``.
    kind = "template"

    def __init__(
        self,
        src: str | os.PathLike[str],
        dest: str | os.PathLike[str],
        *,
        name: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        **variables: Any,
    ) -> None:
        # Check what can be checked now: `shipyard plan` reports it with the file and line.
        if not str(src) or not str(dest):
            raise shipyard.PipelineDefinitionError("template step: src and dest must be paths")
        self.src = os.fspath(src)
        self.dest = os.fspath(dest)
        # Values may be shipyard.secret(...): keep them as they are, resolve them in run().
        self.variables = {k: v if isinstance(v, str) else str(v) for k, v in variables.items()}
        super().__init__(name=name, timeout=timeout, retries=retries)

    def default_name(self) -> str:
        return f"render {self.dest}"

    def describe(self) -> str:
        # Shown by `shipyard plan`; secrets are masked by Shipyard.
        values = " ".join(f"{k}={v}" for k, v in self.variables.items())
        return f"{self.src} -> {self.dest}" + (f" ({values})" if values else "")

    async def run(self, context: shipyard.StepContext) -> shipyard.StepResult:
        values = {**context.deployment_env, **context.resolve(self.variables)}
        src = context.rootdir / self.src
        dest = context.rootdir / self.dest
        try:
            text = src.read_text(encoding="utf-8")
        except OSError as exc:
            raise shipyard.StepFailed(
                f"cannot read the template {self.src}: {exc.strerror}"
            ) from None
        try:
            rendered = string.Template(text).substitute(values)
        except KeyError as exc:
            raise shipyard.StepFailed(
                f"{self.src} uses ${{{exc.args[0]}}}, which has no value; "
                f"pass it to template(..., {exc.args[0]}=...)"
            ) from None
        except ValueError as exc:
            raise shipyard.StepFailed(f"{self.src} is not a valid template: {exc}") from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_text(rendered, encoding="utf-8")
        os.replace(tmp, dest)
        context.log(f"rendered {self.src} -> {self.dest} ({len(rendered.splitlines())} lines)")
        return shipyard.StepResult()


#: What pipelines files call: ``template("app.conf.in", "app.conf", port=8080)``.
template = TemplateStep


class Journal:
    """A notifier: appends one line per finished deployment and per automatic rollback.

    Shipyard calls ``send(payload)`` from a thread of its own for every deployment event, in
    order; an exception is reported as a warning and never fails the deployment.
    """

    #: Seconds Shipyard waits for the last events when the deployment ends.
    timeout = 5.0

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        #: How warnings about this notifier name it.
        self.name = f"journal:{self.path}"

    def send(self, payload: dict[str, Any]) -> None:
        d = payload["deployment"]
        what = f"#{d['id']} {d['pipeline']} {d['version']} -> {d['environment']}"
        if payload["event"] == "deployment_finished":
            line = f"{payload['ts']} {what}: {payload['status']}"
            if payload.get("error"):
                line += f" ({payload['error']})"
        elif payload["event"] == "rollback_started":
            line = f"{payload['ts']} {what}: rolling back to {payload['target_version']}"
        else:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")


def journal(path: str | os.PathLike[str]) -> Journal:
    """A notifier appending to ``path``: ``@sy.pipeline(notify=[journal("deploys.log")])``."""
    return Journal(path)


@shipyard.hookimpl
def shipyard_register_step_types(registry: Any) -> None:
    registry.add(TemplateStep)


@shipyard.hookimpl
def shipyard_register_notifiers(registry: Any) -> None:
    # `shipyard deploy ... --notify journal:deploys.log` calls journal("deploys.log").
    registry.add("journal", journal)
