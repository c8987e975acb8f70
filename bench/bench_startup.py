"""Figures 1 and 2: start-up of ``shipyard --help``, ``--version`` and ``list``.

Floor: ``python -c "import click"`` on the same interpreter - the least any click CLI can cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _hyperfine
from _common import Options
from _common import cpu_ms
from _common import figure
from _common import interleaved
from _common import median
from _common import python
from _common import run_process
from _common import shipyard_exe
from _common import spread
from _common import tmpdir
from _common import walls_ms

FLOOR = "python -c 'import click'"

#: A realistic pipelines file: a few pipelines using every built-in step type, and a hook
#: implementation written in the file itself (registered like a conftest.py plugin).
PIPELINES = '''\
from __future__ import annotations

import shipyard as sy


def check_metrics(threshold: float = 0.9) -> None:
    """Would query the metrics backend."""


def shipyard_configure(config):
    """A hook in pipelines.py: registered as a plugin, like a conftest.py."""


@sy.pipeline(environments=["staging", "production"], rollback="auto")
def webapp(d: sy.Deployment):
    """Build, release and verify the web app."""
    return [
        sy.stage("build", sy.command("python", "-m", "build", "--wheel")),
        sy.stage("release", sy.command("./release.sh", d.version), sy.wait(2)),
        sy.stage(
            "verify",
            sy.command("./smoke.sh", d.environment),
            sy.python(check_metrics, threshold=0.99),
            parallel=True,
            continue_on_failure=True,
        ),
    ]


@sy.pipeline(environments=["staging"], rollback="manual")
def worker(d: sy.Deployment):
    """Roll the background workers."""
    return [sy.stage("roll", sy.command("./roll.sh", d.version, timeout=300), sy.python(check_metrics))]


@sy.pipeline(rollback=False)
def migrate(d: sy.Deployment):
    """Database migrations."""
    return [sy.stage("migrate", sy.command("alembic", "upgrade", "head", retries=2))]


@sy.pipeline(name="docs-site", environments=["production"])
def docs(d: sy.Deployment):
    """Publish the documentation."""
    return [sy.stage("publish", sy.command("rsync", "-a", "site/", f"docs:/srv/{d.version}/"))]
'''


def _measure(
    commands: dict[str, list[str]], opts: Options, cwd: str | None = None
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Wall times in ms of each command (by hyperfine or by the interleaved timer), and details."""
    if opts.hyperfine and _hyperfine.available():
        secs = _hyperfine.times(commands, runs=max(opts.runs, 20), warmup=3, cwd=cwd)
        ms = {k: [s * 1000 for s in v] for k, v in secs.items()}
        return ms, {k: spread(v) for k, v in ms.items()} | {"timer": "hyperfine"}
    runs = interleaved(
        {name: (lambda argv=argv: run_process(argv, cwd=cwd)) for name, argv in commands.items()},
        runs=max(opts.runs, 20),  # cheap: more runs make the medians of ~50 ms steadier
        warmup=3,
    )
    ms = {k: walls_ms(v) for k, v in runs.items()}
    details = {k: spread(v) for k, v in ms.items()}
    return ms, details | {"timer": "interleaved", "cpu_ms_median": cpu_ms(runs)}


def help_version(opts: Options) -> dict[str, Any]:
    """Figure 1: ``shipyard --help`` and ``--version`` <= 1.5x ``python -c 'import click'``."""
    exe = shipyard_exe()
    with tmpdir("startup") as tmp:  # no pipelines.py, no pyproject.toml around
        ms, details = _measure(
            {
                "floor": [python(), "-c", "import click"],
                "help": [exe, "--help"],
                "version": [exe, "--version"],
            },
            opts,
            cwd=tmp,
        )
    floor = median(ms["floor"])
    return {
        "figures": [
            figure(
                "1a",
                "shipyard --help (whole process)",
                measured=median(ms["help"]),
                unit="ms",
                floor=floor,
                floor_label=FLOOR,
                max_ratio=1.5,
                details=details,
            ),
            figure(
                "1b",
                "shipyard --version (whole process)",
                measured=median(ms["version"]),
                unit="ms",
                floor=floor,
                floor_label=FLOOR,
                max_ratio=1.5,
                details=details,
            ),
        ]
    }


def list_pipelines(opts: Options) -> dict[str, Any]:
    """Figure 2: ``shipyard list`` of a pipelines.py with a few pipelines <= 2x the floor."""
    exe = shipyard_exe()
    with tmpdir("list") as tmp:
        Path(tmp, "pipelines.py").write_text(PIPELINES)
        run_process([exe, "list"], cwd=tmp)  # fails loudly if the file does not load
        ms, details = _measure(
            {"floor": [python(), "-c", "import click"], "list": [exe, "list"]}, opts, cwd=tmp
        )
    return {
        "figures": [
            figure(
                "2",
                "shipyard list, 4 pipelines + plugins (whole process)",
                measured=median(ms["list"]),
                unit="ms",
                floor=median(ms["floor"]),
                floor_label=FLOOR,
                max_ratio=2.0,
                details=details,
            ),
        ]
    }
