"""Figure A1: what an ``analysis`` step adds to each measurement beyond the provider's request.

Marginal cost per measurement = (median wall time of a deployment whose metric takes LARGE
measurements - one that takes SMALL) / (LARGE - SMALL), whole ``shipyard deploy`` processes with
an ``http_json`` metric against a loopback HTTP server (interval 1 µs: no waiting), history in a
temporary directory. From it we subtract the floor: the same difference for a plain Python
process doing the same GETs with one httpx client (the provider's own request). What remains is
the analysis's work: the hook call, classification, the log line, the artifact write.

Run alone: ``python bench/bench_analysis.py [RUNS]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from _common import Options
from _common import figure
from _common import interleaved
from _common import median
from _common import python
from _common import run_process
from _common import shipyard_exe
from _common import spread
from _common import tmpdir
from _common import walls_ms

_TESTS = Path(__file__).resolve().parent.parent / "tests"
SMALL, LARGE = 20, 220

PIPELINES = """
import shipyard as sy

@sy.pipeline
def measure(d):
    return [sy.stage("verify", sy.analysis(sy.metric(
        "ratio", sy.http_json("{url}", path="ratio"), success=sy.above(0.5),
        interval=0.000001, count={n})))]
"""

FLOOR = """
import asyncio, sys
import httpx

async def main(url, n):
    async with httpx.AsyncClient(verify=False) as client:
        for _ in range(n):
            (await client.get(url, follow_redirects=False)).json()["ratio"]

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def figures(opts: Options) -> list[dict[str, Any]]:
    if str(_TESTS) not in sys.path:
        sys.path.insert(0, str(_TESTS))
    from http_servers import LoopbackServer
    from http_servers import Reply
    from http_servers import always

    body = json.dumps({"ratio": 0.99})
    with LoopbackServer(always(Reply(200, body, {"Content-Type": "application/json"}))) as server:
        url = server.url("/metrics.json")
        with tmpdir("bench-analysis-") as t:
            tmp = Path(t)
            (tmp / "floor.py").write_text(FLOOR)
            commands = {}
            for n in (SMALL, LARGE):
                f = tmp / f"pipelines_{n}.py"
                f.write_text(PIPELINES.replace("{url}", url).replace("{n}", str(n)))
                argv = [shipyard_exe(), "-f", str(f), "--history", str(tmp / f"h{n}.db"),
                        "deploy", "measure", "1.0", "-e", "bench"]  # fmt: skip
                commands[f"shipyard{n}"] = lambda argv=argv: run_process(argv, cwd=tmp)
                floor = [python(), str(tmp / "floor.py"), url, str(n)]
                commands[f"floor{n}"] = lambda argv=floor: run_process(argv, cwd=tmp)
            ms = {k: walls_ms(v) for k, v in interleaved(commands, runs=opts.runs).items()}
    per = (median(ms[f"shipyard{LARGE}"]) - median(ms[f"shipyard{SMALL}"])) / (LARGE - SMALL)
    floor = (median(ms[f"floor{LARGE}"]) - median(ms[f"floor{SMALL}"])) / (LARGE - SMALL)
    overhead = per - floor
    return [
        figure(
            "14",
            "analysis overhead per measurement beyond the provider's HTTP request",
            measured=round(overhead, 3),
            unit="ms",
            max_value=2.0,
            details={
                "shipyard_ms_per_measurement": round(per, 3),
                "http_request_ms": round(floor, 3),
                **{k: spread(v) for k, v in ms.items()},
            },
        )
    ]


if __name__ == "__main__":
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(json.dumps(figures(Options(runs=runs)), indent=2))
