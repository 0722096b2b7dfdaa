"""Every strategy against the scratch student and offline KD with the same student, over seeds.

    OMP_NUM_THREADS=1 python scripts/strategy_table.py --write docs/strategies.md
    python scripts/strategy_table.py --only DIR       # just the table, from a finished sweep
    python scripts/strategy_table.py --strategies offline,online

The sweep is one multirun, ``kdrun -m strategy=<each> seed=0,1,2 loss=kd`` on the default data,
teacher (cnn) and student (mlp_small) with each strategy's default settings. Every strategy
gets the same recipe, Hinton's KD, because ``online`` and ``self`` take logit recipes only.
Extra arguments go to kdrun (e.g. ``epochs=10``, or ``loss=dist`` instead of ``loss=kd``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

from docs_tables import provenance, write_block
from kdrun.reporting.sweep import spread
from loss_table import fmt

STRATEGIES = ["offline", "online", "born_again", "progressive", "self", "ensemble", "unlabeled"]

# What else each strategy trains, shown beside the student (label in summary["models"], caption).
OTHERS = {
    "online": [("ensemble", "peers' ensemble")],
    "born_again": [("gen1", "gen 1"), ("gen2", "gen 2"), ("gen3", "gen 3"), ("ensemble", "ensemble of gens")],
    "progressive": [("ta1", "assistant")],
    "self": [("head1", "aux head on stage1")],
    "ensemble": [("teacher_ensemble", "teacher ensemble")],
    "unlabeled": [("teacher", "teacher on 10% labels")],
}


def strategy_choice(job: Path) -> str:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("strategy=")), "offline")


def table(sweeps: list[Path]) -> str:
    by_strategy: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(p for sweep in sweeps for p in sweep.glob("*/summary.json")):
        by_strategy[strategy_choice(path.parent)].append(json.loads(path.read_text()))
    done = {name: [s for s in runs if s["status"] == "completed"] for name, runs in by_strategy.items()}
    offline = {s["seed"]: s["student"]["test_acc"] for s in done.get("offline", [])}
    scratch = {s["seed"]: s["scratch"]["test_acc"] for s in done.get("offline", []) if s.get("scratch")}
    if not offline or not scratch:
        raise SystemExit("error: the sweep needs finished offline jobs (with the scratch baseline) to compare against")
    rows = [
        "| strategy | student test acc % | gain over scratch | gain over offline KD | other models (test acc %) | seeds |",
        "|---|---|---|---|---|---|",
        f"| scratch (labels only) | {fmt(list(scratch.values()))} | 0 | | | {len(scratch)} |",
    ]
    for name in [s for s in STRATEGIES if s in by_strategy] + sorted(set(by_strategy) - set(STRATEGIES)):
        runs = done[name]
        if not runs:
            rows.append(f"| {name} | failed: {by_strategy[name][0].get('error')} | | | | 0 |")
            continue
        accs = [s["student"]["test_acc"] for s in runs]
        over_scratch = [s["student"]["test_acc"] - scratch[s["seed"]] for s in runs if s["seed"] in scratch]
        over_offline = [s["student"]["test_acc"] - offline[s["seed"]] for s in runs if s["seed"] in offline]
        others = []
        for label, caption in OTHERS.get(name, []):
            values = [s["models"][label]["test_acc"] for s in runs if label in s.get("models", {})]
            if values:
                others.append(f"{caption} {fmt(values)}")
        if name == "unlabeled":
            others.append(f"student on 10% labels alone {fmt([s['scratch']['test_acc'] for s in runs])}")
            over_own = [s["student"]["test_acc"] - s["scratch"]["test_acc"] for s in runs]
            others.append(f"gain over it {statistics.mean(over_own):+.2f}")
        rows.append(
            f"| {name} | {fmt(accs)} | {spread(over_scratch, signed=True)} | "
            f"{'' if name == 'offline' else spread(over_offline, signed=True)} | {'; '.join(others)} | {len(runs)} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=Path, nargs="+", help="finished sweep directories: print their table, run nothing")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--write", type=Path, help="a markdown page whose strategy_table block receives the table")
    args, kdrun_args = parser.parse_known_args()
    if not any(arg.startswith("loss=") for arg in kdrun_args):
        kdrun_args = ["loss=kd", *kdrun_args]
    sweeps = args.only
    if sweeps is None:
        sweeps = [Path("outputs/sweeps") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_strategy_table"]
        command = [sys.executable, "-m", "kdrun", "-m", f"strategy={args.strategies}", f"seed={args.seeds}",
                   f"hydra.sweep.dir={sweeps[0]}", *kdrun_args]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=False)
    result = table(sweeps)
    print(result)
    if args.write:
        write_block(args.write, "strategy_table", f"{provenance()}\n\n{result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
