"""Figures 4, 5 and 6: what the runner adds to each step, and to a parallel stage.

Marginal cost per step = (median time of a deployment of 1,000 steps - median time of one of
100 steps) / 900, whole ``shipyard deploy`` processes, output to /dev/null, history in a temporary
directory (created by a warm-up run, so both sizes write to an existing history). The start-up,
the plugin loading and the history opening cancel out; what remains is the per-step work:
events, history commits, console lines, the step itself.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from _common import BENCH
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

SMALL, LARGE = 100, 1000

_HEADER = '''\
from __future__ import annotations

import shipyard as sy


def noop() -> None:
    """Does nothing: the step whose cost is pure orchestration."""

'''


def steps_pipelines(kind: str, n: int, *, parallel: bool = False) -> str:
    """A pipelines file with one pipeline, ``steps``: one stage of ``n`` steps of ``kind``."""
    step = {
        "python": 'sy.python(noop, name=f"noop {i}")',
        "true": 'sy.command("true", name=f"true {i}")',
        "sleep": 'sy.command("sleep", "1", name=f"sleep {i}")',
    }[kind]
    return _HEADER + (
        "\n@sy.pipeline()\n"
        "def steps(d: sy.Deployment):\n"
        f'    """One stage of {n} {kind} steps."""\n'
        f'    return [sy.stage("run", *[{step} for i in range({n})], parallel={parallel})]\n'
    )


def deploy_argv(pipelines: Path, history: Path) -> list[str]:
    return [
        shipyard_exe(),
        "-f",
        str(pipelines),
        "--history",
        str(history),
        "deploy",
        "steps",
        "1.0.0",
        "-e",
        "bench",
    ]


def _marginal(walls: dict[str, list[float]], prefix: str) -> float:
    """ms per step between the SMALL and LARGE runs of ``prefix``."""
    return (median(walls[f"{prefix}{LARGE}"]) - median(walls[f"{prefix}{SMALL}"])) / (LARGE - SMALL)


def peer_state(opts: Options, peer: Any, tmp: Path) -> Path:
    """The directory ``peer`` keeps its state in (its history, doit's dependency file)."""
    state = (opts.peer_state or tmp) / peer.name
    state.mkdir(parents=True, exist_ok=True)
    return state


def peer_walls(
    opts: Options, peer: Any, state: Path, argvs: dict[str, list[str]]
) -> dict[str, list[float]]:
    """Wall ms of each of ``peer``'s commands (by key), run round-robin in ``state``."""
    env = peer.env(state)
    commands = {key: partial(run_process, argv, cwd=state, env=env) for key, argv in argvs.items()}
    return {k: walls_ms(v) for k, v in interleaved(commands, runs=opts.peer_runs, warmup=1).items()}


def _peer_steps(kind: str, opts: Options, tmp: Path) -> dict[str, dict[str, Any]]:
    """The marginal cost per step of each peer doing ``kind`` (SMALL and LARGE steps)."""
    out: dict[str, dict[str, Any]] = {}
    for peer in opts.peers:
        state = peer_state(opts, peer, tmp)
        argvs = {f"{peer.name}{n}": peer.steps_argv(kind, n, state) for n in (SMALL, LARGE)}
        ms = peer_walls(opts, peer, state, argvs)
        out[peer.name] = {
            "version": peer.version,
            "measured": round(_marginal(ms, peer.name), 4),
            "unit": "ms/step",
            "runs": opts.peer_runs,
            "details": {k: spread(v) for k, v in ms.items()},
        }
    return out


def _step_runs(
    kind: str, floor_mode: str, opts: Options, tmp: Path, context_mode: str | None = None
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Wall ms of shipyard and of the floor at SMALL and LARGE steps; and the details.

    ``context_mode``: another mode of floor_steps.py measured alongside, for the details only.
    """
    commands = {}
    for n in (SMALL, LARGE):
        f = tmp / f"pipelines_{kind}_{n}.py"
        f.write_text(steps_pipelines(kind, n))
        argv = deploy_argv(f, tmp / f"history_{n}.db")
        commands[f"shipyard{n}"] = lambda argv=argv, cwd=tmp: run_process(argv, cwd=cwd)
        floor = [
            python(),
            str(BENCH / "floor_steps.py"),
            floor_mode,
            str(n),
            str(tmp / f"floor_{n}.db"),
        ]
        commands[f"floor{n}"] = lambda argv=floor, cwd=tmp: run_process(argv, cwd=cwd)
        if context_mode:
            ctx = [python(), str(BENCH / "floor_steps.py"), context_mode, str(n),
                   str(tmp / f"context_{n}.db")]  # fmt: skip
            commands[f"context{n}"] = lambda argv=ctx, cwd=tmp: run_process(argv, cwd=cwd)
    runs = interleaved(commands, runs=opts.runs, warmup=1)
    ms = {k: walls_ms(v) for k, v in runs.items()}
    cpu = cpu_ms(runs)
    details: dict[str, Any] = {k: spread(v) for k, v in ms.items()}
    details["cpu_ms_median"] = cpu
    who = ("shipyard", "floor", "context") if context_mode else ("shipyard", "floor")
    details["cpu_ms_per_step"] = {
        p: round((cpu[f"{p}{LARGE}"] - cpu[f"{p}{SMALL}"]) / (LARGE - SMALL), 4) for p in who
    }
    details["wall_ms_per_step_from_minimums"] = {
        p: round((min(ms[f"{p}{LARGE}"]) - min(ms[f"{p}{SMALL}"])) / (LARGE - SMALL), 4)
        for p in who
    }
    if context_mode:
        details[f"context_{context_mode}_ms_per_step"] = round(_marginal(ms, "context"), 4)
    return ms, details


def noop_steps(opts: Options) -> dict[str, Any]:
    """Figure 4: marginal cost of a no-op ``python`` step, history included: <= 0.1 ms."""
    with tmpdir("noop") as tmp:
        ms, details = _step_runs("python", "python", opts, Path(tmp))
        peers = _peer_steps("python", opts, Path(tmp))
    per_step = _marginal(ms, "shipyard")
    floor = _marginal(ms, "floor")
    return {
        "figures": [
            figure(
                "4",
                "no-op python step, marginal per step (history included)",
                measured=per_step,
                unit="ms/step",
                floor=floor,
                floor_label="plain loop: call noop(), insert a row, commit",
                max_value=0.1,
                details=details,
                peers=peers,
            ),
        ]
    }


def command_steps(opts: Options) -> dict[str, Any]:
    """Figure 5: marginal cost of ``command("true")`` <= 1.5x a plain subprocess+SQLite loop."""
    with tmpdir("command") as tmp:
        ms, details = _step_runs("true", "command", opts, Path(tmp), "command-session")
        peers = _peer_steps("true", opts, Path(tmp))
    per_step = _marginal(ms, "shipyard")
    floor = _marginal(ms, "floor")
    return {
        "figures": [
            figure(
                "5",
                'command("true") step, marginal per step (output captured+recorded)',
                measured=per_step,
                unit="ms/step",
                floor=floor,
                floor_label="plain loop: subprocess.run(capture_output=True), insert, commit",
                max_ratio=1.5,
                details=details,
                peers=peers,
            ),
        ]
    }


def parallel_sleep(opts: Options) -> dict[str, Any]:
    """Figure 6: a parallel stage of 50 ``sleep 1`` <= 1.05x a ThreadPoolExecutor(50) script."""
    with tmpdir("parallel") as tmp_:
        tmp = Path(tmp_)
        f = tmp / "pipelines.py"
        f.write_text(steps_pipelines("sleep", 50, parallel=True))
        argv = deploy_argv(f, tmp / "history.db")
        floor = [python(), str(BENCH / "floor_parallel_sleep.py"), "50"]
        runs = interleaved(
            {
                "shipyard": lambda: run_process(argv, cwd=tmp),
                "floor": lambda: run_process(floor, cwd=tmp),
            },
            runs=opts.runs,
            warmup=1,
        )
        peers: dict[str, dict[str, Any]] = {}
        for peer in opts.peers:
            state = peer_state(opts, peer, tmp)
            walls = peer_walls(opts, peer, state, {"run": peer.steps_argv("sleep", 50, state)})[
                "run"
            ]
            peers[peer.name] = {"version": peer.version, "measured": round(median(walls), 1),
                                "unit": "ms", "runs": opts.peer_runs, "details": spread(walls)}  # fmt: skip
    ms = {k: walls_ms(v) for k, v in runs.items()}
    details = {k: spread(v) for k, v in ms.items()} | {"cpu_ms_median": cpu_ms(runs)}
    return {
        "figures": [
            figure(
                "6",
                "parallel stage of 50 sleep 1 (whole process)",
                measured=median(ms["shipyard"]),
                unit="ms",
                floor=median(ms["floor"]),
                floor_label="ThreadPoolExecutor(50) x subprocess.run(sleep 1)",
                max_ratio=1.05,
                details=details,
                peers=peers,
            ),
        ]
    }
