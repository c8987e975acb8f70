"""Sessions: tests, lint, bench, demo, docs (``nox -l`` lists them)."""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
EXTRAS = ".[test,docker,kubernetes,postgres,serve,otel,ssh]"
CONSTRAINTS = Path(__file__).parent / ".ci" / "constraints.txt"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite (Docker tests need an engine: see .ci/docker-up.sh).

    The real Kubernetes tests form one xdist group, so one worker starts the control plane;
    SHIPYARD_SKIP_K8S_REAL=1 skips them (docs/dev/kubernetes-real.md). One PostgreSQL cluster
    is started for the run (tests/pg_cluster.py; Debian's postgresql, which .ci/run installs);
    SHIPYARD_SKIP_POSTGRES=1 skips the tests that need it.

    Dependencies are installed within .ci/constraints.txt, the versions the suite last passed
    with; SHIPYARD_LATEST_DEPS=1 installs the newest releases instead (to refresh that file).
    """
    pins = [] if os.environ.get("SHIPYARD_LATEST_DEPS") else ["-c", str(CONSTRAINTS)]
    session.install(*pins, "-e", EXTRAS)
    args = session.posargs or ["-n", "2", "--dist", "loadgroup"]
    session.run("python", "-m", "pytest", *args)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy strict on the installed package.

    mypy checks ``shipyard`` as installed (not editable): the package a user imports, with its
    built-in plugins and contrib modules in place, and its ``py.typed`` marker.
    """
    session.install(EXTRAS, "ruff", "mypy", "types-PyYAML")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    with session.chdir(session.create_tmp()):  # not the checkout: its core/ is not `shipyard`
        session.run("mypy", "--config-file", str(Path(__file__).parent / "pyproject.toml"),
                    "-p", "shipyard")  # fmt: skip


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks, each beside its floor; writes bench/results.json.

    Installed as a regular (not editable) package: an editable install adds an import hook
    that every Python start-up pays for, which would distort the start-up figures.
    """
    session.install(EXTRAS, "pytest-benchmark")
    session.run("python", "bench/run.py", *session.posargs)


@nox.session(python=PYTHON, name="bench-peers")
def bench_peers(session: nox.Session) -> None:
    """Figures 4 to 7 with doit and Prefect 3 beside Shipyard, in one run (bench/results.json).

    The peers get virtualenvs of their own (under .nox/peers, made on first use), so that none
    of their dependencies is installed beside Shipyard's. Prefect runs take seconds each: the
    whole session takes about ten minutes on 2 cores.
    """
    session.install(EXTRAS, "pytest-benchmark")
    peers = Path(__file__).parent / ".nox" / "peers"
    names = session.posargs or ["noop-steps", "command-steps", "parallel", "history"]
    session.run("python", "bench/run.py", "--peers", str(peers), *names)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation into site/; a broken link, anchor or reference fails the build.

    docs/gen_reference.py (an MkDocs hook) regenerates the CLI and hook references first. The
    code samples of the docs are run by tests/test_docs.py, in the tests session.
    ``nox -s docs -- serve`` serves the site with live reload instead.
    """
    session.install("-e", ".", "mkdocs", "mkdocs-material")
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:])
    else:
        session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Deploy the demo pipeline twice, show the history, stop the app."""
    session.install("-e", ".")
    session.run("shipyard", "deploy", "demo", "1.0.0", "-e", "local")
    session.run("shipyard", "deploy", "demo", "1.0.1", "-e", "local")
    session.run("shipyard", "history")
    session.run("python", "demo/serve.py", "stop")
