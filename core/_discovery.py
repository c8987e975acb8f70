"""Find and load pipelines.py; collect its ``Pipeline`` objects in definition order."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from types import TracebackType
from typing import Any

from ._exceptions import PipelineFileError
from ._exceptions import UsageError
from ._pipeline import Pipeline


def load_module(path: Path) -> ModuleType:
    """Import the pipelines file at ``path`` as a fresh module.

    :raises UsageError: the file does not exist.
    :raises PipelineFileError: importing it raised; names the file and line.
    """
    if not path.is_file():
        raise UsageError(
            f"no pipelines file at {path}; create one, or pass -f PATH (or set SHIPYARD_FILE)"
        )
    rootdir = str(path.parent)
    if rootdir not in sys.path:
        sys.path.insert(0, rootdir)
    name = "pipelines"
    n = 0
    while name in sys.modules and getattr(sys.modules[name], "__file__", None) != str(path):
        n += 1
        name = f"pipelines_{n}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        msg = f"SyntaxError: {exc.msg}"
        raise PipelineFileError(str(path), msg, lineno=exc.lineno, cause=exc) from exc
    except Exception as exc:
        sys.modules.pop(name, None)
        line = user_line(exc.__traceback__, str(path))
        raise PipelineFileError(
            str(path), f"{type(exc).__name__}: {exc}", lineno=line, cause=exc
        ) from exc
    return module


def user_line(tb: TracebackType | None, path: str) -> int | None:
    """The innermost line of ``path`` in the traceback ``tb``."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def collect(module: ModuleType, path: Path) -> list[Pipeline[Any]]:
    """The pipelines defined in ``module``, in definition order; duplicate names are an error."""
    found: list[Pipeline[Any]] = []
    seen_ids: set[int] = set()
    by_name: dict[str, Pipeline[Any]] = {}
    for value in vars(module).values():
        if not isinstance(value, Pipeline) or id(value) in seen_ids:
            continue
        seen_ids.add(id(value))
        if value.name in by_name:
            first = by_name[value.name]
            raise PipelineFileError(
                str(path),
                f"two pipelines are named {value.name!r} (the other at line {first.location[1]}); "
                "rename one, or pass @pipeline(name=...)",
                lineno=value.location[1],
            )
        by_name[value.name] = value
        found.append(value)
    return found
