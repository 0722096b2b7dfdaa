"""The worked example of docs/sweeps.md, measured: a small sweep's report and two of its runs side
by side with ``kdrun-report``.

    OMP_NUM_THREADS=1 python scripts/sweep_example.py     # runs the sweep, writes both blocks
    python scripts/sweep_example.py --only                 # from the sweep on disk

The sweep is ``kdrun -m T=1,4 alpha=0.5,0.9 seed=0,1 epochs=5 loss=kd`` (outputs/examples/T_alpha_sweep/,
reused when all its jobs completed); its summary.md goes into the ``sweep_example`` block and
``kdrun-report <job A> <job B>`` into ``report_compare``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from docs_tables import REPO, provenance, run_sweep, write_block
from kdrun.reporting.sweep import collect

PAGE = REPO / "docs" / "sweeps.md"
OVERRIDES = ["T=1,4", "alpha=0.5,0.9", "seed=0,1", "epochs=5", "loss=kd"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="store_true", help="from the sweep on disk; run nothing")
    parser.add_argument("--sweep", type=Path, default=Path("outputs/examples/T_alpha_sweep"))
    args = parser.parse_args()
    if not args.only:
        run_sweep(args.sweep, OVERRIDES)
    jobs = collect(args.sweep)
    wall = sum(job.value("wall_time_s") or 0 for job in jobs)
    report = (args.sweep / "summary.md").read_text().strip()
    quoted = "\n".join(f"> {line}" if line else ">" for line in report.splitlines())
    write_block(PAGE, "sweep_example", f"{provenance()} The {len(jobs)} jobs took {wall:.0f} s together, the "
                f"teachers and scratch students trained by the first jobs included.\n\n```bash\nkdrun -m "
                f"{' '.join(OVERRIDES)}\n```\n\n`summary.md`:\n\n{quoted}")
    pair = [job.path for job in jobs if job.overrides.get("T") == "4" and job.overrides.get("seed") == "0"]
    compare = subprocess.run([sys.executable, "-m", "kdrun.reporting.report_cli", *map(str, pair)],
                             capture_output=True, text=True, check=True).stdout.strip()
    write_block(PAGE, "report_compare", f"`kdrun-report {' '.join(p.name for p in pair)}` (two jobs of the sweep "
                f"above, in its directory):\n\n```text\n{compare}\n```")
    print(f"{PAGE.relative_to(REPO)} <- {args.sweep}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
