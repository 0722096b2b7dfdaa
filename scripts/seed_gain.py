"""Mean and spread of teacher, KD student, scratch student and gain over the jobs of a sweep.

    kdrun -m seed=0,1,2
    python scripts/seed_gain.py outputs/sweeps/<the sweep>
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    summaries = [json.loads(p.read_text()) for p in sorted(args.sweep_dir.glob("*/summary.json"))]
    done = [s for s in summaries if s["status"] == "completed" and s.get("scratch")]
    if not done:
        print(f"error: no completed jobs with a scratch baseline under {args.sweep_dir}", file=sys.stderr)
        return 2
    columns = {
        "teacher": [s["teacher"]["test_acc"] for s in done],
        "student (KD)": [s["student"]["test_acc"] for s in done],
        "student (scratch)": [s["scratch"]["test_acc"] for s in done],
        "gain": [s["student"]["test_acc"] - s["scratch"]["test_acc"] for s in done],
        "wall time (s)": [s["wall_time_s"] for s in done],
    }
    seeds = ", ".join(str(s["seed"]) for s in done)
    print(f"{len(done)} jobs (seeds {seeds})\n")
    print("| | mean | std | per seed |\n|---|---|---|---|")
    for name, values in columns.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.mean(values):.2f} | {spread:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
