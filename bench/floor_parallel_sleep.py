"""The floor of figure 6: 50 ``sleep 1`` processes at once from a thread pool.

python bench/floor_parallel_sleep.py [N]
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: subprocess.run(["sleep", "1"]), range(n)))
    sys.exit(max(r.returncode for r in results))


if __name__ == "__main__":
    main()
