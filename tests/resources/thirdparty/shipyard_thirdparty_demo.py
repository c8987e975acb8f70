"""A third-party Shipyard plugin from its own distribution: the ``greet`` step and a notifier.

Pipelines import the step like any library (``from shipyard_thirdparty_demo import greet``);
the notifier is used with ``shipyard deploy ... --notify demo-file:PATH``.
"""

from __future__ import annotations

import json
from typing import Any

import shipyard as sy

__version__ = "0.3.0"


class GreetStep(sy.Step):
    """Logs a greeting; fails when asked to greet nobody."""

    kind = "greet"

    def __init__(
        self, who: str, *, name: str | None = None, timeout: float | None = None, retries: int = 0
    ) -> None:
        self.who = who
        super().__init__(name=name, timeout=timeout, retries=retries)

    def default_name(self) -> str:
        return f"greet {self.who}"

    async def run(self, context: sy.StepContext) -> sy.StepResult:
        if not self.who:
            raise sy.StepFailed("nobody to greet")
        context.log(f"hello, {self.who}, from {context.deployment.environment}")
        return sy.StepResult()


greet = GreetStep


class FileNotifier:
    """Appends one JSON line per event to a file."""

    name = "demo-file"
    timeout = 5.0

    def __init__(self, path: str) -> None:
        self.path = path

    def send(self, payload: dict[str, Any]) -> None:
        record = {"event": payload["event"], "status": payload.get("status"),
                  "step": payload.get("step"), "version": payload["deployment"]["version"]}  # fmt: skip
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


@sy.hookimpl
def shipyard_register_step_types(registry: Any) -> None:
    registry.add(GreetStep)


@sy.hookimpl
def shipyard_register_notifiers(registry: Any) -> None:
    registry.add("demo-file", FileNotifier)
