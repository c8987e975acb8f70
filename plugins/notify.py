"""Built-in notification sinks: ``console``, ``jsonl`` (a JSON-lines file) and ``webhook``.

A sink is any object with ``send(payload: dict) -> None``, an optional ``close()``, a ``name``
and a ``timeout`` (seconds the deployment may wait for it at the end). Sinks run in their own
thread; an exception is logged and recorded, never fatal.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from shipyard._plugins import hookimpl

if TYPE_CHECKING:
    from shipyard._plugins import NotifierRegistry


class ConsoleNotifier:
    """One line per event on standard error."""

    name = "console"
    timeout = 2.0

    def send(self, payload: dict[str, Any]) -> None:
        d = payload["deployment"]
        what = payload["event"]
        subject = payload.get("step") or payload.get("stage") or ""
        status = payload.get("status") or ""
        print(
            f"[notify] {what} {d['pipeline']} {d['version']} -> {d['environment']} "
            f"#{d['id']} {subject} {status}".rstrip(),
            file=sys.stderr,
        )


class JsonLinesNotifier:
    """Appends one JSON object per event to ``path`` (created 0600)."""

    timeout = 5.0

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = f"jsonl:{self.path}"
        self._lock = threading.Lock()

    def send(self, payload: dict[str, Any]) -> None:
        line = json.dumps(payload, sort_keys=True) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


def console() -> ConsoleNotifier:
    """A sink that prints one line per event to standard error."""
    return ConsoleNotifier()


def jsonl(path: str | os.PathLike[str]) -> JsonLinesNotifier:
    """A sink that appends each event as one JSON line to ``path``."""
    return JsonLinesNotifier(path)


@hookimpl
def shipyard_register_notifiers(registry: NotifierRegistry) -> None:
    registry.add("console", lambda _value: ConsoleNotifier())
    registry.add("jsonl", jsonl)
