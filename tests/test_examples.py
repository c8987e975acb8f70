"""examples/shipyard-example, built and installed the way a user installs a plugin, works.

The distribution is built as a wheel and installed into a folder of its own (``pip install
--target``) that commands see through ``PYTHONPATH``, so it never leaks into the environment the
rest of the suite runs in. Then:

- its own test suite, written with the ``shipyarder`` fixture, passes against the installed
  module (the copy it runs from has no source tree to import by accident);
- ``python -m shipyard`` loads it through its entry point, lists it, deploys with its step type
  and notifier, and ``-p no:example`` disables it.

tests/test_plugins.py builds a minimal third-party distribution of its own to test the plugin
manager; this module is about the example the documentation shows (docs/guides/plugin-authors.md).

The wheel is built offline (``--no-build-isolation``) when the test environment can build it
(setuptools >= 70.1, or an older setuptools with the ``wheel`` package, as in ``nox -s tests``);
otherwise pip builds it in an isolated environment, fetching setuptools from the package index.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "shipyard-example"
_IGNORE_NAMES = ("__pycache__", "build", "dist", "*.egg-info", ".pytest_cache")
_IGNORE = shutil.ignore_patterns(*_IGNORE_NAMES)


def _can_build_offline() -> bool:
    """Whether the installed setuptools can build a wheel without fetching anything."""
    try:
        import setuptools
    except ImportError:
        return False
    if importlib.util.find_spec("wheel") is not None:
        return True
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1)


def _pip(*args: str | os.PathLike[str]) -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"pip {' '.join(map(str, args))}:\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the example distribution is installed (for ``PYTHONPATH``)."""
    work = tmp_path_factory.mktemp("example")
    src = work / "shipyard-example"
    shutil.copytree(EXAMPLE, src, ignore=_IGNORE)
    isolation = () if not _can_build_offline() else ("--no-build-isolation", "--no-index")
    _pip("wheel", "--no-deps", *isolation, "--wheel-dir", work / "dist", src)
    (wheel,) = (work / "dist").glob("*.whl")
    assert wheel.name == "shipyard_example-1.0.0-py3-none-any.whl"
    site = work / "site"
    _pip("install", "--no-deps", "--no-index", "--target", site, wheel)
    return site


def test_the_example_passes_its_own_tests(example_site: Path, tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    # Without src/: the tests can only import the installed module.
    shutil.copytree(EXAMPLE, checkout, ignore=shutil.ignore_patterns("src", *_IGNORE_NAMES))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    env["PYTHONPATH"] = str(example_site)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=checkout, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "7 passed" in proc.stdout, proc.stdout


PIPELINES = """
    import shipyard as sy
    from shipyard_example import journal, template

    @sy.pipeline(environments=["production"], rollback="auto", notify=[journal("deploys.log")])
    def site(d):
        return [
            sy.stage("config", template("site.conf.in", "site.conf", port=d.vars.get("port", "80"))),
            sy.stage("publish", sy.command("cat", "site.conf")),
        ]
"""


def test_installed_example_is_loaded_and_deploys(shipyarder, example_site: Path) -> None:
    env = {"PYTHONPATH": str(example_site), "SHIPYARD_DISABLE_PLUGIN_AUTOLOAD": None}
    shipyarder.makepipelines(PIPELINES)
    shipyarder.makefile("site.conf.in", "server ${DEPLOYMENT_VERSION} on port ${port}\n")

    listed = shipyarder.spawn("plugins", env=env)
    assert listed.exit_code == 0, listed
    listed.fnmatch_lines(
        [
            "example 1.0.0  (entry point of shipyard?example)",
            "    step types: template",
            "    notifiers:  journal",
        ]
    )

    first = shipyarder.spawn("deploy", "site", "1.0.0", "-e", "production", env=env)
    assert first.exit_code == 0, first
    first.fnmatch_lines(
        ["*rendered site.conf.in -> site.conf (1 lines)", "*│ server 1.0.0 on port 80"]
    )
    second = shipyarder.spawn(
        "deploy", "site", "1.1.0", "-e", "production", "--var", "port=8080",
        "--notify", "journal:other.log", "--json", env=env,
    )  # fmt: skip
    assert second.exit_code == 0, second
    doc = json.loads(second.stdout)
    assert [s["steps"][0]["kind"] for s in doc["stages"]] == ["template", "command"]
    assert (shipyarder.path / "site.conf").read_text() == "server 1.1.0 on port 8080\n"
    journal = (shipyarder.path / "deploys.log").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in journal] == [
        "#1 site 1.0.0 -> production: succeeded",
        "#2 site 1.1.0 -> production: succeeded",
    ]
    assert (shipyarder.path / "other.log").read_text().count("\n") == 1

    # A template without a value fails the step; the pipeline rolls back to 1.1.0 by itself
    # (which fails too: it renders the same broken template, the working tree is not versioned).
    shipyarder.makefile("site.conf.in", "server ${DEPLOYMENT_VERSION} with ${workers} workers\n")
    failed = shipyarder.spawn("deploy", "site", "1.2.0", "-e", "production", env=env)
    assert failed.exit_code == 1, failed
    failed.fnmatch_lines(["*site.conf.in uses ${workers}, which has no value*"])
    assert journal != (lines := (shipyarder.path / "deploys.log").read_text().splitlines())
    assert lines[-2].endswith("#3 site 1.2.0 -> production: rolling back to 1.1.0")


def test_the_example_can_be_disabled(shipyarder, example_site: Path) -> None:
    env = {"PYTHONPATH": str(example_site), "SHIPYARD_DISABLE_PLUGIN_AUTOLOAD": None}
    shipyarder.makepipelines(PIPELINES)
    refused = shipyarder.spawn(
        "-p", "no:example", "plan", "site", "1.0.0", "-e", "production", env=env
    )
    assert refused.exit_code == 2
    assert "step type 'template' is not provided by any loaded plugin" in refused.stderr
