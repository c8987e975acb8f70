"""``secret(name)``: values read when a deployment runs, masked everywhere else.

A :class:`Secret` is a ``str`` holding a placeholder, so it can stand wherever a step takes a
string, also inside f-strings. Steps call ``context.resolve(value)`` just before using a value;
everything that leaves the runner (console, history, notifications, errors) goes through
:func:`mask`, which replaces each resolved value and its common encodings by ``***``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

from ._exceptions import PipelineDefinitionError
from ._exceptions import SecretMissing

MASK = "***"
#: Secrets shorter than this would mask everything; they are refused.
MIN_LENGTH = 4

_PLACEHOLDER = re.compile(r"\{\{shipyard\.secret:([A-Za-z_][A-Za-z0-9_]*)\}\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Secret(str):
    """A value read from the environment variable ``name`` when the deployment runs."""

    name: str

    def __new__(cls, name: str) -> Secret:
        if not isinstance(name, str) or not _NAME.match(name):
            raise PipelineDefinitionError(
                f"secret({name!r}): the name must be an environment variable name "
                "(letters, digits and _)"
            )
        self = super().__new__(cls, f"{{{{shipyard.secret:{name}}}}}")
        self.name = name
        return self

    def __repr__(self) -> str:
        return f"secret({self.name!r})"


Secret.__module__ = "shipyard"


def secret(name: str) -> Secret:
    """A secret read from the environment variable ``name`` when the deployment starts.

    The real value reaches the step; everywhere else it shows as ``***``.
    """
    return Secret(name)


def names_in(obj: Any, _seen: set[int] | None = None) -> set[str]:
    """Every secret name referenced by placeholders inside ``obj`` (walks containers and objects)."""
    found: set[str] = set()
    seen = _seen if _seen is not None else set()
    if id(obj) in seen:
        return found
    seen.add(id(obj))
    if isinstance(obj, str):
        found.update(_PLACEHOLDER.findall(obj))
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            found |= names_in(k, seen) | names_in(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            found |= names_in(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        found |= names_in(vars(obj), seen)
    return found


class SecretValues:
    """The secrets of one deployment, read once when it starts."""

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self.values: dict[str, str] = dict(values or {})

    @classmethod
    def load(
        cls, names: Iterable[str], environ: Mapping[str, str] | None = None, where: str = ""
    ) -> SecretValues:
        """Read ``names`` from ``environ``; refuse missing and too-short values before any step runs."""
        env = os.environ if environ is None else environ
        names = sorted(set(names))
        missing = [n for n in names if not env.get(n)]
        if missing:
            plural = "s" if len(missing) > 1 else ""
            raise SecretMissing(
                f"{where}secret{plural} {', '.join(missing)} not set; export the environment "
                f"variable{plural} (or pass --secret-file) before deploying; no step has run"
            )
        short = [n for n in names if len(env[n]) < MIN_LENGTH]
        if short:
            raise SecretMissing(
                f"{where}secret {short[0]} is shorter than {MIN_LENGTH} characters; such a value "
                "cannot be masked safely, use a longer one"
            )
        values = {n: env[n] for n in names}
        register(values.values())
        return cls(values)

    def resolve(self, value: Any) -> Any:
        """``value`` with every placeholder replaced by its real secret (containers too)."""
        if isinstance(value, str):
            if "{{shipyard.secret:" not in value:
                return value
            return _PLACEHOLDER.sub(lambda m: self.values[m.group(1)], str.__str__(value))
        if isinstance(value, dict):
            return {self.resolve(k): self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self.resolve(v) for v in value)
        return value


# --- masking ----------------------------------------------------------------------------------
# One process-wide table: a value once resolved stays masked in anything this process prints,
# including tracebacks shown by ``--debug``.

_lock = threading.Lock()
_values: set[str] = set()
_pattern: re.Pattern[str] | None = None


def _encodings(value: str) -> set[str]:
    import base64
    import json
    from urllib.parse import quote
    from urllib.parse import quote_plus

    raw = value.encode()
    forms = {value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1]}
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        forms.add(enc(raw).decode().rstrip("="))
        # The value inside a longer base64 text: its encoding depends on the offset modulo 3.
        for pad in (1, 2):
            text = enc(b"\0" * pad + raw).decode().rstrip("=")
            inner = text[4 : len(text) - 4]
            if len(inner) >= MIN_LENGTH:
                forms.add(inner)
    return {f for f in forms if len(f) >= MIN_LENGTH}


def register(values: Iterable[str]) -> None:
    """Mask these values (and their encodings) in everything :func:`mask` sees from now on."""
    global _pattern
    with _lock:
        new = {v for v in values if v} - _values
        if not new:
            return
        _values.update(new)
        forms: set[str] = set()
        for v in _values:
            forms |= _encodings(v)
        alts = sorted(forms, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(a) for a in alts))


def mask(text: str) -> str:
    """``text`` with secrets, their encodings and secret placeholders replaced by ``***``."""
    if "{{shipyard.secret:" in text:
        text = _PLACEHOLDER.sub(MASK, text)
    pattern = _pattern
    if pattern is None:
        return text
    return pattern.sub(MASK, text)


def mask_any(obj: Any) -> Any:
    """:func:`mask` applied to every string inside JSON-like data."""
    if isinstance(obj, str):
        return mask(obj)
    if isinstance(obj, dict):
        return {k: mask_any(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mask_any(v) for v in obj]
    return obj
