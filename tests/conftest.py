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


# -- history stores: the backends the contract suite (tests/store_contract.py) runs against -------


class SQLiteBackend:
    """Fresh SQLite stores: one file each, in the test's temporary directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "stores"
        self.count = 0

    def new_url(self) -> str:
        self.count += 1
        return str(self.root / f"store-{self.count}" / "history.db")

    def open(self, url: str):
        from shipyard.sdk import open_store

        return open_store(url)

    def cleanup(self) -> None:
        """Nothing to drop: the files go with the temporary directory."""


#: Every backend of the contract suite, by id. A new store (PostgreSQL) is one more entry here:
#: a class taking ``tmp_path`` with ``new_url()`` (the URL of a fresh, empty store, as
#: ``--history`` accepts it), ``open(url)`` (a new connection) and ``cleanup()``.
STORE_BACKENDS = [pytest.param(SQLiteBackend, id="sqlite")]


@pytest.fixture(params=STORE_BACKENDS)
def store_factory(request, tmp_path):
    """``store_factory()``: a fresh, empty store; ``store_factory.reopen(store)``: a second
    connection to the same one (as a second process opens it). See tests/store_contract.py."""
    from store_contract import StoreFactory

    factory = StoreFactory(request.param(tmp_path))
    try:
        yield factory
    finally:
        factory.close_all()
