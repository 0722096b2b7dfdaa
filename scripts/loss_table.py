"""Every loss recipe against the scratch student and plain KD, mean and spread over seeds.

    python scripts/loss_table.py                   # runs the sweep, then prints the table
    python scripts/loss_table.py --only DIR [DIR]  # just the table, from finished sweeps
    python scripts/loss_table.py --losses crd,crd_kd   # a subset of the recipes

The sweep is one multirun, ``kdrun -m loss=<every option> seed=0,1,2`` on the
default data, teacher and student; the teacher is trained once per seed and cached.
Extra arguments go to kdrun (e.g. ``epochs=10``).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

from kdrun.reporting.sweep import spread

# Recipes that need overrides on the default CNN -> MLP pair; each runs as its own sweep.
PAIR_OVERRIDES = {
    "attention_map": ["loss.attention_map.student_taps=[last_stage]", "loss.attention_map.teacher_taps=[last_stage]"],
}


def loss_options() -> list[str]:
    conf = Path(str(importlib.resources.files("kdrun.conf"))) / "loss"
    return sorted(p.stem for p in conf.glob("*.yaml"))


def loss_choice(job: Path) -> str:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("loss="))


def fmt(values: list[float]) -> str:
    return spread(values)


def table(sweeps: list[Path]) -> str:
    by_loss: dict[str, list[dict]] = defaultdict(list)
    for summary_path in sorted(p for sweep in sweeps for p in sweep.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        by_loss[loss_choice(summary_path.parent)].append(summary)
    scratch = {s["seed"]: s["scratch"]["test_acc"] for runs in by_loss.values() for s in runs if s.get("scratch")}
    if not scratch:
        raise SystemExit(f"error: no finished jobs with a scratch baseline under {', '.join(map(str, sweeps))}")
    rows = ["| recipe | formula | test acc % (mean ± std) | gain over scratch | seeds |", "|---|---|---|---|---|"]
    rows.append(f"| scratch (labels only) | L = 1*CE | {fmt(list(scratch.values()))} | 0 | {len(scratch)} |")
    order = sorted(by_loss, key=lambda name: (name != "kd", name))
    for name in order:
        runs = [s for s in by_loss[name] if s["status"] == "completed"]
        if not runs:
            rows.append(f"| {name} | | failed: {by_loss[name][0].get('error')} | | 0 |")
            continue
        accs = [s["student"]["test_acc"] for s in runs]
        gains = [s["student"]["test_acc"] - scratch[s["seed"]] for s in runs]
        rows.append(f"| {name} | `{runs[0]['recipe']}` | {fmt(accs)} | {statistics.mean(gains):+.2f} | {len(runs)} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=Path, nargs="+", help="finished sweep directories: print their table, run nothing")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--losses", default=None, help="comma-separated recipes (default: every conf/loss option)")
    args, kdrun_args = parser.parse_known_args()
    sweeps = args.only
    if sweeps is None:
        chosen = args.losses.split(",") if args.losses else loss_options()
        plain = [name for name in chosen if name not in PAIR_OVERRIDES]
        groups = ([(",".join(plain), [])] if plain else []) + [
            (name, PAIR_OVERRIDES[name]) for name in chosen if name in PAIR_OVERRIDES
        ]
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        sweeps = []
        for number, (losses, overrides) in enumerate(groups):
            sweeps.append(Path("outputs/sweeps") / f"{stamp}_loss_table_{number}")
            command = [sys.executable, "-m", "kdrun", "-m", f"loss={losses}", f"seed={args.seeds}",
                       f"hydra.sweep.dir={sweeps[-1]}", *overrides, *kdrun_args]
            print("$", " ".join(command), flush=True)
            subprocess.run(command, check=False)
    print(table(sweeps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
