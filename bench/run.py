"""Run Shipyard's benchmarks, each beside its floor, and report them against their targets.

    python bench/run.py [--runs N] [--hyperfine] [--rebuild] [--json PATH] [NAME ...]
    python bench/run.py --peers DIR [--peer-runs N] noop-steps command-steps parallel history

NAMEs (default: all): see BENCHMARKS below or ``--list``. Prints a table and writes
bench/results.json. Exit status: 0 when every figure meets its target, 1 otherwise.
``--peers DIR``: also measure doit and Prefect 3 (virtualenvs under DIR, made on first use) on
the same scenarios, in the same run; each figure then has them under ``peers`` (bench/_peers.py).
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_analysis
import bench_canary
import bench_docker
import bench_fleet
import bench_history
import bench_http
import bench_memory
import bench_otel
import bench_postgres
import bench_serve
import bench_startup
import bench_stats
import bench_steps
from _common import BENCH
from _common import DEFAULT_RUNS
from _common import ROOT
from _common import Options
from _common import figure
from _common import shipyard_exe
from _peers import ensure as ensure_peers


def http_figures(opts: Options) -> dict[str, Any]:
    """Figure 10: health-check detection latency and probe cost; a hanging webhook sink."""
    out = bench_http.run()
    return {
        "figures": [
            figure(
                "10a",
                "health check: mean detection latency after turning healthy",
                measured=out["detect_mean_ms"],
                unit="ms",
                max_value=out["detect_mean_limit_ms"],
                details=out,
            ),
            figure(
                "10b",
                "health check: worst detection latency after turning healthy",
                measured=out["detect_worst_ms"],
                unit="ms",
                max_value=out["detect_worst_limit_ms"],
            ),
            figure(
                "10c",
                "health check: cost per probe (one reused client)",
                measured=out["probe_ms"],
                unit="ms",
                floor=out["urllib_ms"],
                floor_label="plain urllib request",
                max_ratio=out["probe_ratio_limit"],
            ),
            figure(
                "10d",
                "deployment with a hanging webhook sink: extra time",
                measured=out["hanging_sink_overhead_s"],
                unit="s",
                max_value=out["hanging_sink_timeout_s"],
            ),
        ]
    }


#: name -> (figures, function); run in this order.
BENCHMARKS: dict[str, tuple[str, Callable[[Options], dict[str, Any]]]] = {
    "startup": ("1", bench_startup.help_version),
    "list": ("2", bench_startup.list_pipelines),
    "help-rss": ("3", bench_memory.help_rss),
    "noop-steps": ("4", bench_steps.noop_steps),
    "command-steps": ("5", bench_steps.command_steps),
    "parallel": ("6", bench_steps.parallel_sleep),
    "history": ("7", bench_history.history_1m),
    "memory": ("8", bench_memory.deploy_rss),
    "http": ("10", http_figures),
    "docker-run": ("9", bench_docker.run),
    "postgres": ("11", bench_postgres.postgres),
    "stats": ("12", bench_stats.stats_1m),
    "otel-steps": ("13", bench_otel.otel_steps),
    "analysis": ("14", lambda opts: {"figures": bench_analysis.figures(opts)}),
    "serve": ("15", lambda opts: {"figures": bench_serve.run()}),
    "fleet": ("16", lambda opts: {"figures": bench_fleet.figures(opts)}),
    "canary": ("17", bench_canary.run),
}


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    digits = 3 if abs(value) < 1 else 2 if abs(value) < 10 else 1
    return f"{value:.{digits}f}{(' ' + unit) if unit else ''}"


def _peer_cell(name: str, peer: dict[str, Any], unit: str) -> str:
    if peer["measured"] is None:
        return f"{name} {peer['version']}: - ({peer.get('note', 'no equivalent')})"
    return f"{name} {peer['version']}: {_fmt(peer['measured'], peer.get('unit', unit))}"


def table(rows: list[dict[str, Any]]) -> str:
    header = ["#", "figure", "measured", "floor", "ratio", "target", "result"]
    body = [
        [
            r["id"],
            r["figure"],
            _fmt(r["measured"], r["unit"]),
            _fmt(r["floor"], r["unit"]),
            f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
            r["target"],
            "PASS" if r["pass"] else "FAIL",
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
        for row in body
    ]
    floors = [f"  {r['id']}: floor = {r['floor_label']}" for r in rows if r["floor_label"]]
    peers = [
        f"  {r['id']}: shipyard {_fmt(r['measured'], r['unit'])}; "
        + "; ".join(_peer_cell(name, p, r["unit"]) for name, p in r["peers"].items())
        for r in rows
        if r.get("peers")
    ]
    return "\n".join([*lines, "", "floors:", *floors, *(["", "peers:", *peers] if peers else [])])


def environment() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    version = subprocess.run(
        [shipyard_exe(), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "shipyard": version,
        "commit": git("rev-parse", "HEAD"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="runs per measurement")
    parser.add_argument("--hyperfine", action="store_true", help="time start-up with hyperfine")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the 1M-row history")
    parser.add_argument("--json", type=Path, default=BENCH / "results.json", help="results file")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--peers", type=Path, metavar="DIR", help="measure doit and Prefect too")
    parser.add_argument("--peer-runs", type=int, default=3, help="runs per peer measurement")
    args = parser.parse_args(argv)
    if args.list:
        for name, (_, fn) in BENCHMARKS.items():
            print(f"{name:<14} {((fn.__doc__ or '').strip().splitlines() or [''])[0]}")
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    if args.runs < 10:
        print(f"note: --runs {args.runs} is below the 10 runs the figures are defined with")
    opts = Options(runs=args.runs, hyperfine=args.hyperfine, rebuild=args.rebuild)
    env = environment()
    if args.peers:
        print("peers: installing or checking their virtualenvs", flush=True)
        opts.peers = ensure_peers(args.peers.resolve())
        opts.peer_runs = args.peer_runs
        opts.peer_state = args.peers.resolve() / "state"
        shutil.rmtree(opts.peer_state, ignore_errors=True)  # each run starts with no history
        env["peers"] = {p.name: p.version for p in opts.peers}
    print(f"shipyard benchmarks: {env['shipyard']} on Python {env['python']}, {env['cpus']} CPUs")
    load = env["loadavg_before"][0]
    if load > (env["cpus"] or 1):
        print(
            f"warning: the machine is busy (load average {load:.1f} on {env['cpus']} CPUs): "
            "wall times will be high and noisy; the CPU times in results.json are steadier"
        )
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    for name in args.names or list(BENCHMARKS):
        fig, fn = BENCHMARKS[name]
        print(f"- {name} (figure {fig}) ...", end=" ", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn(opts)
        except Exception:
            errors[name] = traceback.format_exc()
            print("ERROR")
            print(errors[name], file=sys.stderr)
            continue
        finally:
            seconds[name] = time.perf_counter() - t0
        rows += result["figures"]
        verdicts = ", ".join(
            f"{r['id']} {'PASS' if r['pass'] else 'FAIL'}" for r in result["figures"]
        )
        print(f"{seconds[name]:.1f}s: {verdicts}")
    total = time.perf_counter() - t_all
    print()
    print(table(rows))
    failed = [r["id"] for r in rows if not r["pass"]]
    print()
    print(
        f"{len(rows) - len(failed)} of {len(rows)} figures pass"
        + (f"; failing: {', '.join(failed)}" if failed else "")
        + (f"; errors in: {', '.join(errors)}" if errors else "")
        + f" ({total:.0f}s)"
    )
    env["loadavg_after"] = os.getloadavg()
    args.json.write_text(
        json.dumps(
            {
                "environment": env,
                "options": vars(opts)
                | {"peers": env.get("peers", {}), "peer_state": str(opts.peer_state or "")},
                "seconds": seconds,
                "total_seconds": total,
                "figures": rows,
                "errors": errors,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {args.json}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
