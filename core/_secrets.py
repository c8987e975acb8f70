"""``secret(name)``: values read when a deployment runs, masked everywhere else.

A :class:`Secret` is a ``str`` holding a placeholder, so it can stand wherever a step takes a
string, also inside f-strings. Steps call ``context.resolve(value)`` just before using a value;
everything that leaves the runner (console, history, notifications, errors) goes through
:func:`mask`, which replaces each resolved value and its common encodings by ``***``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import types
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

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


#: Types walked no further: scalars, and functions (callables are never walked into).
_OPAQUE = frozenset({int, float, bool, bytes, type(None), types.FunctionType,
                     types.BuiltinFunctionType, types.MethodType})  # fmt: skip


def names_in(obj: Any) -> set[str]:
    """Every secret name referenced by placeholders inside ``obj`` (walks containers and objects)."""
    found: set[str] = set()
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        kind = type(item)
        # Exact types first: a pipeline of a thousand steps walks tens of thousands of these.
        if kind in _OPAQUE:
            continue
        if kind is str or isinstance(item, str):
            if "{{shipyard.secret:" in item:
                found.update(_PLACEHOLDER.findall(item))
            continue
        if isinstance(item, (int, float)) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type) and not callable(item):
            stack.extend(vars(item).values())
    return found


def hide_placeholders(text: Any) -> Any:
    """``text`` with secret placeholders (not values) replaced by ``***``; non-strings as they are."""
    if isinstance(text, str) and "{{shipyard.secret:" in text:
        return _PLACEHOLDER.sub(MASK, str.__str__(text))
    return text


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
        # Output is recorded line by line, so "abc\n" would show as the line "abc": what counts
        # is the value without surrounding whitespace.
        short = [n for n in names if len(env[n].strip()) < MIN_LENGTH]
        if short:
            raise SecretMissing(
                f"{where}secret {short[0]} is shorter than {MIN_LENGTH} characters (not counting "
                "surrounding whitespace); such a value cannot be masked safely, use a longer one"
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
_state: _Table | None = None

_JSON_SHORT = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n",
               "\r": "\\r", "\t": "\\t"}  # fmt: skip


def _hex(number: int, width: int) -> str:
    """``number`` in hex as a regex that accepts either letter case."""
    return "".join(f"[{c}{c.upper()}]" if c.isalpha() else c for c in f"{number:0{width}x}")


def _url_pattern(value: str) -> str:
    """``value`` percent-encoded in any way (``quote``, ``quote_plus``, httpx, a mix, any case)."""
    parts = []
    for ch in value:
        if ch.isascii() and ch.isalnum():  # no encoder escapes these
            parts.append(ch)
            continue
        raw = _utf8(ch)
        alts = ["".join("%" + _hex(b, 2) for b in raw), re.escape(ch)]
        if ch == " ":
            alts.append(r"\+")
        parts.append("(?:" + "|".join(alts) + ")")
    return "".join(parts)


def _json_pattern(value: str) -> str:
    """``value`` inside a JSON string, escaped by any encoder (``ensure_ascii`` or not, ``\\/``)."""
    parts = []
    for ch in value:
        if ch.isascii() and ch.isalnum():
            parts.append(ch)
            continue
        alts = []
        if ch not in '"\\' and ch >= " ":
            alts.append(re.escape(ch))
        if ch in _JSON_SHORT:
            alts.append(re.escape(_JSON_SHORT[ch]))
        code = ord(ch)
        units = [code] if code <= 0xFFFF else [0xD800 + ((code - 0x10000) >> 10),
                                                 0xDC00 + ((code - 0x10000) & 0x3FF)]  # fmt: skip
        alts.append("".join(r"\\u" + _hex(u, 4) for u in units))
        parts.append("(?:" + "|".join(alts) + ")")
    return "".join(parts)


def _base64_forms(raw: bytes) -> set[str]:
    """The base64 text of ``raw`` alone, and the part of it that is the same wherever ``raw``
    sits inside longer data: at byte offset ``3k + pad`` the characters that encode only bits
    of ``raw`` (the first and last one or two mix in the neighbours' bits and vary)."""
    import base64

    forms = set()
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        forms.add(enc(raw).decode())
        forms.add(enc(raw).decode().rstrip("="))
        for pad in range(3):
            text = enc(b"\0" * pad + raw + b"\0\0").decode()
            forms.add(text[(8 * pad + 5) // 6 : 8 * (pad + len(raw)) // 6])
    return forms


def _utf8(value: str) -> bytes:
    """The bytes a process receives for ``value`` (undecodable bytes from the environment kept)."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


class _Table(NamedTuple):
    """What :func:`mask` looks for, swapped as one object so that readers need no lock."""

    #: Exact forms (the value, its base64 texts, each line of a multi-line value), found with
    #: ``str.find``.
    literals: tuple[str, ...]
    #: ``(anchor, regex)``: a regex (inside a lookahead, to find overlapping occurrences) for the
    #: URL- or JSON-encoded forms of one value, tried only on text that contains ``anchor``, a
    #: run of letters and digits every such form contains as is ("" when the value has none).
    patterns: tuple[tuple[str, re.Pattern[str]], ...]
    #: The most characters one occurrence can span.
    reach: int


def _anchor(value: str) -> str:
    runs = re.findall(r"[A-Za-z0-9]+", value)
    return max(runs, key=len) if runs else ""


def _table(values: Iterable[str]) -> _Table:
    literals: set[str] = set()
    patterns: dict[str, str] = {}
    for value in values:
        # A value from the environment may hold bytes that are not UTF-8 (surrogate escapes); a
        # step printing it is decoded with U+FFFD in their place.
        for v in {value, _utf8(value).decode("utf-8", "replace")}:
            literals.add(v)
            literals |= _base64_forms(_utf8(v))
            # Output is recorded line by line: each line of a multi-line secret on its own.
            if "\n" in v or "\r" in v:
                literals.update(p.strip() for p in re.split(r"[\r\n]+", v))
            for regex in (_url_pattern(v), _json_pattern(v)):
                if regex != re.escape(v):  # else the literal finds it
                    patterns[regex] = _anchor(v)
    return _Table(
        literals=tuple(sorted(lit for lit in literals if len(lit) >= MIN_LENGTH)),
        patterns=tuple((a, re.compile(f"(?=({r}))")) for r, a in sorted(patterns.items())),
        # A character is at most 12 characters once encoded (4 UTF-8 bytes as %XX, or a
        # surrogate pair of \uXXXX escapes).
        reach=12 * max(len(v) for v in values),
    )


def register(values: Iterable[str]) -> None:
    """Mask these values (and their encodings) in everything :func:`mask` sees from now on.

    Values shorter than :data:`MIN_LENGTH` are ignored (:meth:`SecretValues.load` refuses them).
    """
    global _state
    with _lock:
        new = {v for v in values if isinstance(v, str) and len(v) >= MIN_LENGTH} - _values
        if not new:
            return
        _values.update(new)
        _state = _table(_values)


def registered() -> list[str]:
    """The values :func:`register` was given, sorted: what a CI log is told to hide too
    (``::add-mask::`` on GitHub Actions, issue #19)."""
    with _lock:
        return sorted(_values)


def _spans(text: str, table: _Table) -> list[list[int]]:
    """Where masked forms occur in ``text``, overlapping occurrences merged, in order."""
    found: list[tuple[int, int]] = []
    for lit in table.literals:
        i = text.find(lit)
        while i >= 0:
            found.append((i, i + len(lit)))
            i = text.find(lit, i + 1)
    for anchor, regex in table.patterns:
        if anchor in text:
            found += [(m.start(), m.end(1)) for m in regex.finditer(text)]
    merged: list[list[int]] = []
    for start, end in sorted(found):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def mask(text: str) -> str:
    """``text`` with secrets, their encodings and secret placeholders replaced by ``***``.

    Overlapping occurrences (of two secrets, or two forms of one) are masked as one; if masking
    itself forms a new occurrence (a secret made of ``*``), that is masked too.
    """
    if "{{shipyard.secret:" in text:
        text = _PLACEHOLDER.sub(MASK, text)
    table = _state
    if table is None:
        return text
    while spans := _spans(text, table):
        out, pos = [], 0
        for start, end in spans:
            out += [text[pos:start], MASK]
            pos = end
        out.append(text[pos:])
        text = "".join(out)
    return text


def mask_reach() -> int:
    """The most characters one masked occurrence can span (0 when nothing is masked)."""
    table = _state
    return 0 if table is None else table.reach


def cut_point(text: str, limit: int) -> int:
    """Where to cut ``text`` near ``limit`` without splitting a masked occurrence.

    ``limit`` itself, or the start of the occurrence that spans it (its end if it starts at 0).
    Cutting a long line of output there keeps every secret whole in one piece, so it is masked.
    """
    table = _state
    if table is None:
        return limit
    for start, end in _spans(text, table):
        if start >= limit:
            break
        if start < limit < end:
            return start if start > 0 else end
    return limit


def mask_url(url: str) -> str:
    """``url`` with the password of its user-info part, and a ``password=`` parameter, shown
    as ``***`` (``postgresql://app:s3cret@db/x`` -> ``postgresql://app:***@db/x``), then
    :func:`mask`."""
    scheme, sep, rest = url.partition("://")
    if sep:
        authority, slash, path = rest.partition("/")
        userinfo, at, hostport = authority.rpartition("@")
        if at and ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            url = f"{scheme}://{user}:***@{hostport}{slash}{path}"
        import re

        url = re.sub(r"([?&]password=)[^&#]*", r"\1***", url)
    return mask(url)


def mask_any(obj: Any) -> Any:
    """:func:`mask` applied to every string inside JSON-like data (keys too)."""
    if isinstance(obj, str):
        return mask(obj)
    if isinstance(obj, dict):
        return {mask(k) if isinstance(k, str) else k: mask_any(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mask_any(v) for v in obj]
    return obj


class MaskedStream:
    """A text stream that masks secrets on their way to ``stream`` (the CLI's stdout/stderr).

    It catches what bypasses the reporter: a ``python`` step's ``print()``, a logging handler, a
    plugin's warning. Text is written as it comes, except the last :func:`mask_reach` characters
    of an unfinished line (they may be the start of a secret written in pieces): those wait for
    the end of the line, for more text, or for :meth:`drain`.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._pending = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # click probes with b"" to tell text from binary streams
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._lock:
            pending = self._pending + text
            limit = max(pending.rfind("\n") + 1, len(pending) - mask_reach())
            cut = cut_point(pending, limit) if 0 < limit < len(pending) else limit
            self._pending = pending[cut:]
            if cut:
                self.stream.write(mask(pending[:cut]))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.stream.flush()

    def drain(self) -> None:
        """Write what was held back (masked) and flush."""
        with self._lock:
            pending, self._pending = self._pending, ""
            if pending:
                self.stream.write(mask(pending))
        self.stream.flush()

    def isatty(self) -> bool:
        return bool(self.stream.isatty())

    @property
    def buffer(self) -> _MaskedBuffer:
        """Bytes written here are decoded and masked too (``sys.stdout.buffer.write(...)``)."""
        return _MaskedBuffer(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class _MaskedBuffer:
    """The binary side of a :class:`MaskedStream`: bytes are decoded, masked and written."""

    def __init__(self, text: MaskedStream) -> None:
        self._text = text

    def write(self, data: bytes) -> int:
        encoding = getattr(self._text.stream, "encoding", None) or "utf-8"
        self._text.write(bytes(data).decode(encoding, "replace"))
        return len(data)

    def flush(self) -> None:
        self._text.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._text.stream.buffer, name)


@contextlib.contextmanager
def masked_stdio() -> Iterator[None]:
    """Mask secrets in everything written to ``sys.stdout`` and ``sys.stderr`` meanwhile; what a
    step capturing its output writes there goes to its log (:mod:`shipyard._capture`)."""
    from ._capture import StepStreams

    saved = sys.stdout, sys.stderr
    out, err = MaskedStream(saved[0]), MaskedStream(saved[1])
    routed = StepStreams(out, "stdout"), StepStreams(err, "stderr")
    sys.stdout, sys.stderr = routed
    try:
        yield
    finally:
        if sys.stdout is routed[0]:
            sys.stdout = saved[0]
        if sys.stderr is routed[1]:
            sys.stderr = saved[1]
        for s in (out, err):
            try:
                s.drain()
            except (OSError, ValueError):  # a closed pipe or terminal
                pass
