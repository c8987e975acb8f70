"""``shipyard stats``: the DORA figures of a constructed history with known answers.

Real ``shipyard`` processes, real SQLite and PostgreSQL stores (the history written through
the store's bulk writer, with chosen times), and a real git repository whose commits have
chosen committer dates (lead time reads them with ``git log``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from shipyard._reports import format_ts
from shipyard._stats import percentile
from shipyard._stats import span
from shipyard.sdk import open_store

SHIPYARD = Path(sys.executable).parent / "shipyard"
H = 3600.0
D = 86400.0
#: Every deployment here takes ten minutes.
TOOK = 600.0
UNKNOWN = "d" * 40

PIPELINES = """\
import shipyard as sy


@sy.pipeline
def web(d):
    return [sy.stage("go", sy.command("true"))]
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        yield str(tmp_path / "history.db")
        return
    pg = request.getfixturevalue("pg")
    name = f"s_{uuid.uuid4().hex[:12]}"
    pg.psql(f"CREATE SCHEMA {name} AUTHORIZATION shipyard")
    yield pg.url(schema=name)
    pg.psql(f"DROP SCHEMA {name} CASCADE")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHIPYARD_", "GIT_"))}
    env.update(HOME=str(tmp_path), SHIPYARD_DISABLE_PLUGIN_AUTOLOAD="1",
               GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")  # fmt: skip
    return env


def _git(repo: Path, env: dict[str, str], *args: str, date: str | None = None) -> str:
    extra = {"GIT_COMMITTER_DATE": date, "GIT_AUTHOR_DATE": date} if date else {}
    out = subprocess.run(
        ["git", "-c", "user.name=Tester", "-c", "user.email=t@example.com", *args],
        cwd=repo, env=env | extra, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def make_repo(path: Path, env: dict[str, str], dates: list[float]) -> list[str]:
    """A git repository with one commit per date (committer dates as given); their shas."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "pipelines.py").write_text(PIPELINES)
    _git(path, env, "init", "-q")
    shas = []
    for n, when in enumerate(dates):
        (path / "pipelines.py").write_text(PIPELINES + f"# {n}\n")
        _git(path, env, "add", "pipelines.py")
        _git(path, env, "commit", "-q", "-m", f"change {n}", date=format_ts(when))
        shas.append(_git(path, env, "rev-parse", "HEAD"))
    return shas


def write_history(url: str, deps: list[dict[str, Any]]) -> None:
    """Deployments with chosen times, written as ``shipyard store copy`` writes them."""
    store = open_store(url)
    try:
        bulk = store.bulk()  # type: ignore[attr-defined]
        with bulk.transaction():
            for i, d in enumerate(deps, 1):
                start, end = format_ts(d["at"]), format_ts(d["at"] + TOOK)
                bulk.insert_deployment({
                    "id": i, "pipeline": d.get("pipeline", "web"), "version": f"1.{i}",
                    "environment": d.get("env", "prod"), "status": d["status"],
                    "created_at": start, "started_at": start, "finished_at": end,
                    "heartbeat_at": end, "rollback_of": d.get("rollback_of"), "retry_of": None,
                    "error": None if d["status"] == "succeeded" else "x", "user": "alice",
                    "ci_actor": None, "host": "h", "pid": 1, "proc_start": None,
                    "pipelines_file": None, "file_hash": None, "git_commit": d.get("commit"),
                    "args": None, "vars": "{}", "shipyard_version": "0.1.0", "stages_total": 1,
                    "current_stage": 0, "cancel_requested": None,
                }, keep_id=True)  # fmt: skip
        bulk.done()
    finally:
        store.close()


def stats(cwd: Path, url: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SHIPYARD), "--store", url, "stats", *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture
def history(tmp_path: Path, store_url: str) -> dict[str, Any]:
    """The known history: three commits a day apart, ten days ago; deployments of them."""
    env = _env(tmp_path)
    t = (time.time() // D - 10) * D  # midnight UTC, ten days ago
    c1, c2, c3 = make_repo(tmp_path / "repo", env, [t, t + D, t + 2 * D])
    write_history(store_url, [
        {"at": t + 2 * H, "status": "succeeded", "commit": c1},  # 1: lead 2h10m
        {"at": t + D + H, "status": "failed", "commit": c2},  # 2: restored by 3 after 2h
        {"at": t + D + 3 * H, "status": "succeeded", "commit": c2},  # 3: lead 3h10m
        {"at": t + 2 * D + H, "status": "succeeded", "commit": c3 + "-dirty"},  # 4: lead 1h10m
        {"at": t + 2 * D + 2 * H, "status": "succeeded", "commit": c2, "rollback_of": 4},  # 5
        {"at": t + 3 * D, "status": "succeeded", "commit": UNKNOWN},  # 6: git knows it not
        {"at": t + 3 * D + H, "status": "succeeded"},  # 7: no commit recorded
        {"at": t + 4 * D, "status": "succeeded", "commit": c1, "env": "staging"},  # 8: 4d10m
        {"at": t + 5 * D, "status": "succeeded", "pipeline": "api"},  # 9
    ])  # fmt: skip
    return {"url": store_url, "env": env, "repo": tmp_path / "repo", "t": t}


def test_the_four_figures_of_a_known_history(history: dict[str, Any]) -> None:
    r = stats(history["repo"], history["url"], history["env"], "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["bands"] == "DORA 2019 (Accelerate State of DevOps report)"
    assert doc["window"]["days"] == 30
    # 8 changes (5 is a rollback); 7 succeeded over 30 days, on 6 distinct days.
    assert doc["deployment_frequency"] == {
        "deployments": 7, "days_with_deployments": 6, "per_day": 0.233, "per_week": 1.633,
        "band": "high",
    }  # fmt: skip
    # Per commit and environment: 4200 (c3, dirty), 7800 (c1), 11400 (c2), 346200 (c1 staging).
    lead = doc["lead_time"]
    assert lead == {
        "median_seconds": pytest.approx(9600, abs=0.2), "p90_seconds": pytest.approx(346200, abs=0.2),
        "commits": 4, "deployments_with_commit": 4, "deployments": 7, "band": "elite",
        "note": None,
    }  # fmt: skip
    # 2 failed; 4 rolled back by 5: 2 of 8.
    assert doc["change_failure_rate"] == {
        "rate": 0.25, "changes": 8, "failed": 1, "rolled_back": 1, "rollbacks": 1, "band": "low",
    }  # fmt: skip
    # 2 -> 3: 2h; 4 -> 5: 1h.
    assert doc["time_to_restore"] == {
        "median_seconds": pytest.approx(5400, abs=0.2), "p90_seconds": pytest.approx(7200, abs=0.2),
        "outages": 2, "unrestored": 0, "band": "high",
    }  # fmt: skip


def test_the_figures_for_people(history: dict[str, Any]) -> None:
    r = stats(history["repo"], history["url"], history["env"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("delivery metrics (all pipelines, all environments; since ")
    assert lines[0].endswith(", 30 days)")
    assert lines[1:] == [
        "  deployment frequency   0.233 a day (1.633 a week): 7 succeeded, on 6 day(s)  [high]",
        "  lead time for changes  median 2h 40m, p90 4d 0h (4 of 7 deployment(s) with a known "
        "commit)  [elite]",
        "  change failure rate    25.0% (2 of 8: 1 failed, 1 rolled back)  [low]",
        "  time to restore        median 1h 30m, p90 2h 0m (2 outage(s))  [high]",
        "bands: DORA 2019 (Accelerate State of DevOps report); definitions: docs/guides/dora.md",
    ]


def test_a_pipeline_without_commits_and_an_environment(history: dict[str, Any]) -> None:
    r = stats(history["repo"], history["url"], history["env"], "--pipeline", "api")
    assert r.returncode == 0, r.stderr
    assert "  lead time for changes  - (no commit recorded)" in r.stdout
    assert "  change failure rate    0.0% (0 of 1: 0 failed, 0 rolled back)  [elite]" in r.stdout
    assert "  time to restore        - (no outage restored)" in r.stdout
    doc = json.loads(stats(history["repo"], history["url"], history["env"], "--env", "staging",
                           "--json").stdout)  # fmt: skip
    assert doc["lead_time"]["median_seconds"] == pytest.approx(346200, abs=0.2)
    assert doc["window"]["environment"] == "staging"


def test_a_window_with_nothing_in_it(history: dict[str, Any]) -> None:
    r = stats(history["repo"], history["url"], history["env"], "--since", "2d")
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith("no deployments since ")
    assert r.stdout.endswith("; nothing to measure (try --since all)\n")
    doc = json.loads(stats(history["repo"], history["url"], history["env"], "--since", "2d",
                           "--json").stdout)  # fmt: skip
    assert doc["deployment_frequency"]["deployments"] == 0
    assert doc["change_failure_rate"]["rate"] is None
    assert [doc[k]["band"] for k in ("deployment_frequency", "lead_time", "change_failure_rate",
                                     "time_to_restore")] == [None] * 4  # fmt: skip
    # A date window: from the fourth day on, only 8 and 9 are in it.
    since = format_ts(history["t"] + 4 * D)[:10]
    doc = json.loads(stats(history["repo"], history["url"], history["env"], "--since",
                           since, "--json").stdout)  # fmt: skip
    assert doc["deployment_frequency"]["deployments"] == 2
    all_ = json.loads(stats(history["repo"], history["url"], history["env"], "--since", "all",
                            "--json").stdout)  # fmt: skip
    assert all_["change_failure_rate"]["changes"] == 8


def test_outside_a_git_repository_lead_time_is_unknown(history: dict[str, Any],
                                                       tmp_path: Path) -> None:  # fmt: skip
    elsewhere = tmp_path / "not-git"
    elsewhere.mkdir()
    (elsewhere / "pipelines.py").write_text(PIPELINES)
    r = stats(elsewhere, history["url"], history["env"])
    assert r.returncode == 0, r.stderr
    assert "  lead time for changes  - (not in a git repository: commit times unknown)" in r.stdout
    assert "  change failure rate    25.0%" in r.stdout


def test_shas_git_does_not_know_are_skipped(tmp_path: Path, store_url: str) -> None:
    env = _env(tmp_path)
    make_repo(tmp_path / "repo", env, [time.time() - D])
    now = time.time()
    write_history(store_url, [
        {"at": now - H, "status": "succeeded", "commit": UNKNOWN},
        {"at": now - H / 2, "status": "succeeded", "commit": "not a sha; --output=x"},
    ])  # fmt: skip
    r = stats(tmp_path / "repo", store_url, env)
    assert r.returncode == 0, r.stderr
    assert "  lead time for changes  - (git knows none of the recorded commits)" in r.stdout
    assert not (tmp_path / "repo" / "x").exists()


def test_no_history_at_all(tmp_path: Path) -> None:
    env = _env(tmp_path)
    (tmp_path / "pipelines.py").write_text(PIPELINES)
    r = subprocess.run([str(SHIPYARD), "stats"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith("no deployments since ")
    assert not (tmp_path / ".shipyard").exists()  # reading creates no store
    bad = subprocess.run([str(SHIPYARD), "stats", "--since", "soon"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2
    assert "--since 'soon': expected a duration such as 30d" in bad.stderr


def test_percentiles_and_spans() -> None:
    assert percentile([], 90) is None
    assert percentile([5.0], 90) == 5.0
    assert percentile([float(n) for n in range(1, 11)], 90) == 9.0
    assert [span(s) for s in (44.6, 720, 11400, 346200)] == ["45s", "12m", "3h 10m", "4d 0h"]
