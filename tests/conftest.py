"""Shared configuration of Shipyard's own tests.

The ``shipyarder`` fixture comes from the installed pytest plugin ``shipyard.testing`` (entry point
``pytest11``), exactly as users get it; it is not redefined here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

#: Example pipelines files, plugins and distributions used by the tests.
RESOURCES = Path(__file__).parent / "resources"


@pytest.fixture
def resources() -> Path:
    """The folder of example files (``tests/resources``)."""
    return RESOURCES


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs; a zombie waiting to be reaped counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


@pytest.fixture
def alive():
    """``alive(pid)``: whether the process runs (zombies count as gone)."""
    return _alive
