"""The MNIST-1D tables of docs/baselines.md, measured: the dataset paper's model baselines and the
temperature study on the default job.

    OMP_NUM_THREADS=1 python scripts/baseline_tables.py            # runs both sweeps, writes the tables and plot
    python scripts/baseline_tables.py --only                        # from the sweeps on disk
    python scripts/baseline_tables.py --tables temperature_study    # one of them

The sweeps are ``kdrun -m experiment=mnist1d_baselines`` and ``kdrun -m
experiment=mnist1d_temperature_study`` (outputs/baselines/<name>/); a sweep whose jobs all
completed is reused. Each table is the sweep report's own (its summary.md), written between the
``<!-- table:NAME -->`` markers of docs/baselines.md under the command and the versions; the
temperature study's plot is copied to docs/temperature_study.png.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from docs_tables import REPO, provenance, run_sweep, write_block

PAGE = REPO / "docs" / "baselines.md"
TABLES = {"mnist1d_baselines": "experiment=mnist1d_baselines",
          "temperature_study": "experiment=mnist1d_temperature_study"}


def report_table(sweep: Path) -> str:
    """The mean ± std table of the sweep's report (summary.md), with its lines about the recipe."""
    text = (sweep / "summary.md").read_text().split("## Jobs that did not complete")[0]
    lines = [line for line in text.splitlines() if line.startswith(("|", "Recipe:", "Common overrides:"))]
    if not any(line.startswith("|") for line in lines):
        raise SystemExit(f"error: {sweep}/summary.md has no table; did the sweep run?")
    head = [line for line in lines if not line.startswith("|")]
    return "\n".join([*head, "", *(line for line in lines if line.startswith("|"))])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="store_true", help="tables from the sweeps on disk; run nothing")
    parser.add_argument("--tables", nargs="+", choices=sorted(TABLES), default=list(TABLES))
    parser.add_argument("--root", type=Path, default=Path("outputs/baselines"), help="where the sweeps go")
    args, kdrun_args = parser.parse_known_args()
    for name in args.tables:
        sweep = args.root / name
        if not args.only:
            run_sweep(sweep, [TABLES[name], *kdrun_args])
        write_block(PAGE, name, f"{provenance()}\n\n{report_table(sweep)}")
        plots = sorted(sweep.glob("*_vs_T.png"))
        if name == "temperature_study" and plots:
            shutil.copyfile(plots[0], REPO / "docs" / "temperature_study.png")
        print(f"{name}: {PAGE.relative_to(REPO)} <- {sweep}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
