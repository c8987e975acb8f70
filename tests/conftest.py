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


class PostgresBackend:
    """Fresh PostgreSQL stores: one schema each, in the session's cluster (tests/pg_cluster.py)."""

    def __init__(self, tmp_path: Path) -> None:
        self.cluster = postgres_cluster()
        self.schemas: list[str] = []

    def new_url(self) -> str:
        import uuid

        schema = f"t_{uuid.uuid4().hex[:12]}"
        self.cluster.psql(f"CREATE SCHEMA {schema} AUTHORIZATION shipyard")
        self.schemas.append(schema)
        return self.cluster.url(schema=schema)

    def open(self, url: str):
        from shipyard.sdk import open_store

        return open_store(url)

    def cleanup(self) -> None:
        if self.schemas:
            self.cluster.psql("; ".join(f"DROP SCHEMA {s} CASCADE" for s in self.schemas))


#: Every backend of the contract suite, by id: a class taking ``tmp_path`` with ``new_url()``
#: (the URL of a fresh, empty store, as ``--history`` accepts it), ``open(url)`` (a new
#: connection) and ``cleanup()``.
STORE_BACKENDS = [
    pytest.param(SQLiteBackend, id="sqlite"),
    pytest.param(PostgresBackend, id="postgresql"),
]


# -- one PostgreSQL cluster per test run ---------------------------------------------------------

_PG_ENV = "SHIPYARD_TEST_PG"


def pytest_configure(config: pytest.Config) -> None:
    """Start the run's PostgreSQL cluster in the main process (xdist workers inherit where it
    is through the environment). SHIPYARD_SKIP_POSTGRES=1 skips the tests that need it; CI
    never sets it, and there a cluster that cannot start fails them."""
    if hasattr(config, "workerinput") or os.environ.get(_PG_ENV):
        return
    if os.environ.get("SHIPYARD_SKIP_POSTGRES") == "1":
        return
    import json

    import pg_cluster

    try:
        cluster = pg_cluster.start()
    except Exception as exc:  # reported by every test that needs it
        os.environ[_PG_ENV] = json.dumps({"error": str(exc)})
        return
    config._shipyard_pg = cluster  # type: ignore[attr-defined]
    os.environ[_PG_ENV] = json.dumps(
        {"root": str(cluster.root), "port": cluster.port, "password": cluster.password}
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    cluster = getattr(config, "_shipyard_pg", None)
    if cluster is not None:
        import shutil

        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        os.environ.pop(_PG_ENV, None)


def postgres_cluster():
    """The run's cluster (tests/pg_cluster.py); fails the test when it could not start."""
    import json

    import pg_cluster

    if os.environ.get("SHIPYARD_SKIP_POSTGRES") == "1":
        pytest.skip("SHIPYARD_SKIP_POSTGRES=1: no PostgreSQL cluster is started")
    info = json.loads(os.environ.get(_PG_ENV) or "{}")
    if "error" in info or not info:
        pytest.fail(
            f"the test PostgreSQL cluster did not start: {info.get('error', 'not started')}"
        )
    return pg_cluster.Cluster(Path(info["root"]), int(info["port"]), info["password"])


@pytest.fixture
def pg():
    """The run's PostgreSQL cluster (``pg.url(...)``, ``pg.psql(...)``, ``pg.create_database``)."""
    return postgres_cluster()


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
