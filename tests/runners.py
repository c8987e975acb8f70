"""CI runners for the tests: ``shipyard`` processes with a working folder and HOME of their own,
sharing with each other only the store URL (tests/test_postgres.py, tests/test_store_cli.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

SHIPYARD = Path(sys.executable).parent / "shipyard"

PIPELINES = textwrap.dedent(
    """
    import os
    import time

    import shipyard as sy


    def work(version, seconds, log):
        with open(log, "a") as f:
            f.write(f"start {version} {time.time()}\\n")
        if seconds.startswith("until:"):  # hold until the test creates that file
            end = time.monotonic() + 120
            while not os.path.exists(seconds[6:]) and time.monotonic() < end:
                time.sleep(0.02)
        else:
            time.sleep(float(seconds))
        with open(log, "a") as f:
            f.write(f"end {version} {time.time()}\\n")


    def after(log, version):
        with open(log, "a") as f:
            f.write(f"after {version} {time.time()}\\n")


    @sy.pipeline(rollback="manual")
    def web(d):
        log = os.environ["RACE_LOG"]
        if d.vars.get("fail") == "1":
            first = sy.command("false", name="work")
        else:
            first = sy.python(work, d.version, d.vars.get("sleep", "0"), log, name="work")
        return [
            sy.stage("release", first),
            sy.stage("after", sy.python(after, log, d.version, name="after")),
        ]
    """
)

#: The variables of CI systems, dropped so that each runner names itself (SHIPYARD_RUNNER).
_CI = ("CI", "GITHUB_RUN_ID", "GITHUB_REPOSITORY", "CI_JOB_URL", "BUILDKITE_BUILD_URL",
       "CIRCLE_BUILD_URL", "BUILD_URL")  # fmt: skip


class Runner:
    """One CI runner: a folder of its own with the pipelines file, its own HOME."""

    def __init__(self, root: Path, name: str, url: str, log: Path) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True)
        (self.dir / "pipelines.py").write_text(PIPELINES)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("SHIPYARD_") and k not in _CI}  # fmt: skip
        self.env |= {"HOME": str(self.dir), "SHIPYARD_STORE": url, "NO_COLOR": "1",
                     "SHIPYARD_RUNNER": f"https://ci.example/jobs/{name}",
                     "RACE_LOG": str(log)}  # fmt: skip

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([str(SHIPYARD), *args], cwd=self.dir, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SHIPYARD), *args], cwd=self.dir, env=self.env, text=True,
                              capture_output=True, timeout=timeout)  # fmt: skip

    def json(self, *args: str) -> Any:
        r = self.run(*args, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)


class Fleet:
    """The runners of one test, and the log their steps write (``start V T`` / ``end V T``)."""

    def __init__(self, root: Path, url: str) -> None:
        self.root, self.url = root, url
        self.log = root / "steps.log"
        self.log.touch()
        self.count = 0

    def runner(self, url: str | None = None) -> Runner:
        self.count += 1
        return Runner(self.root, f"r{self.count}", url or self.url, self.log)

    def events(self) -> list[tuple[str, str, float]]:
        out = []
        for line in self.log.read_text().splitlines():
            what, version, ts = line.split()
            out.append((what, version, float(ts)))
        return out

    def started(self, version: str) -> bool:
        return any(w == "start" and v == version for w, v, _ in self.events())


def out_of(r: subprocess.CompletedProcess[str]) -> str:
    """Everything a finished runner printed."""
    return r.stdout + r.stderr


def done(p: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    """Wait for a runner started in the background: its exit code and its whole output."""
    out, err = p.communicate(timeout=timeout)
    return p.returncode, "".join(getattr(p, "_seen", [])) + out + err
