"""Module attributes imported on first use (PEP 562), for ``shipyard``, ``shipyard.sdk`` and the
built-in plugin packages: importing them costs the module alone, not what it exports."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any


def lazy_exports(
    module: str, names: Mapping[str, str], listed: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``module``.

    :param names: each lazy name and where it lives: ``"pkg.mod"`` (the same name there) or
        ``"pkg.mod:attr"``; a relative ``".mod"`` is taken inside ``module``.
    :param listed: the other names ``dir()`` shows (defined in the module itself).
    """

    def __getattr__(name: str) -> Any:
        where = names.get(name)
        if where is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        path, _, attr = where.partition(":")
        value = getattr(importlib.import_module(path, module), attr or name)
        setattr(sys.modules[module], name, value)  # found at once the next time
        return value

    shown = sorted({*names, *listed})

    def __dir__() -> list[str]:
        return shown

    return __getattr__, __dir__
