"""A typical pipelines file: every built-in step type, a secret and notification sinks.

Used by tests/test_imports.py (``list`` and ``plan`` must stay light) and tests/test_cli.py.
"""

from __future__ import annotations

import shipyard as sy


def check_metrics(threshold: float) -> None:
    """A python step."""
    assert threshold <= 1


@sy.pipeline(
    environments=["staging", "production"],
    rollback="auto",
    notify=[sy.jsonl("notifications.jsonl"), sy.console()],
)
def webapp(d: sy.Deployment):
    """Build, release and verify the web app."""
    return [
        sy.stage("build", sy.command("python", "-c", "print('built')", name="build")),
        sy.stage(
            "release",
            sy.command("python", "-c", "print('released')", env={"TOKEN": sy.secret("TOKEN")}),
            sy.wait(0, name="settle"),
        ),
        sy.stage(
            "verify",
            sy.command("python", "-c", "print('smoke')", name="smoke"),
            sy.python(check_metrics, threshold=0.99),
            parallel=True,
            continue_on_failure=True,
        ),
    ]


@sy.pipeline(name="docs", rollback=False)
def build_docs(d: sy.Deployment):
    """Publish the documentation."""
    return [sy.stage("publish", sy.command("true"))]
