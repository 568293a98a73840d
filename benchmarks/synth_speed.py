"""How long `metaseg synth` takes for the demo-sized phantom (10 patients x 20 slices), best and median of a few runs.

    python benchmarks/synth_speed.py            # 3 runs

Writes benchmarks/results/synth_speed.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from metaseg.files import write_json_atomic  # noqa: E402
from metaseg.data.phantom import synthesize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "synth_speed.json")
    args = parser.parse_args()
    seconds = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            synthesize(Path(folder), 10, 20)
            seconds.append(round(time.perf_counter() - start, 2))
    result = {"command": "python benchmarks/synth_speed.py", "patients": 10, "slices": 20, "seconds": seconds,
              "best_s": min(seconds), "median_s": statistics.median(seconds),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "load_average_at_start": os.getloadavg()[0]}}
    write_json_atomic(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
