"""Every loss recipe against the scratch student and plain KD, mean and spread over seeds.

    OMP_NUM_THREADS=1 python scripts/loss_table.py --write docs/losses.md          # the image recipes
    OMP_NUM_THREADS=1 python scripts/loss_table.py --zoo --write docs/loss_zoo.md  # the zoo's
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

from docs_tables import provenance, write_block
from kdrun.reporting.sweep import spread

# The loss zoo (docs/loss_zoo.md): methods from mdistiller, torchdistill and later logit papers.
ZOO = ["ab", "ctkd", "cwd", "fsp", "ft", "kdsvd", "ktaad", "mlkd", "nkd", "nst", "ofd", "pad_l2", "reviewkd", "srd", "sskd"]
# Recipes for language models only (docs/language_models.md has their table).
LANGUAGE_ONLY = ["jsd", "minilm", "reverse_kl", "skew_kl", "tinybert", "token_kd"]

# Recipes that need overrides on the default CNN -> MLP pair; each runs as its own sweep.
PAIR_OVERRIDES = {
    # CRD's 16,384 negatives are more than MNIST-1D's 3,600 training samples (kdrun warns and draws with
    # replacement); 4,096 keeps each anchor's negatives mostly distinct.
    "crd": ["loss.crd.nce_k=4096"],
    "crd_kd": ["loss.crd.nce_k=4096"],
    "attention_map": ["loss.attention_map.student_taps=[last_stage]", "loss.attention_map.teacher_taps=[last_stage]"],
}


def loss_options() -> list[str]:
    """The image recipes: every loss option but the zoo's and the language models'."""
    conf = Path(str(importlib.resources.files("kdrun.conf"))) / "loss"
    return sorted(p.stem for p in conf.glob("*.yaml") if p.stem not in (*ZOO, *LANGUAGE_ONLY))


def loss_choice(job: Path) -> str:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("loss="))


def fmt(values: list[float]) -> str:
    return spread(values)


def training_seconds(run_dir: Path) -> float:
    """The student's training time in a run: its epochs and its pre-stages' (metrics.jsonl ``time_s``)."""
    rows = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return sum(r["time_s"] for r in rows if r["split"] == "train" and r["model"].split(".")[0] == "student")


def table(sweeps: list[Path]) -> str:
    by_loss: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for summary_path in sorted(p for sweep in sweeps for p in sweep.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        seconds = training_seconds(summary_path.parent) if summary["status"] == "completed" else 0.0
        by_loss[loss_choice(summary_path.parent)].append((summary, seconds))
    scratch = {s["seed"]: s["scratch"]["test_acc"] for runs in by_loss.values() for s, _ in runs if s.get("scratch")}
    if not scratch:
        raise SystemExit(f"error: no finished jobs with a scratch baseline under {', '.join(map(str, sweeps))}")
    rows = ["| recipe | formula | test acc % (mean ± std) | gain over scratch (paired, mean ± std) | train s | seeds |", "|---|---|---|---|---|---|"]
    rows.append(f"| scratch (labels only) | L = 1*CE | {fmt(list(scratch.values()))} | 0 | | {len(scratch)} |")
    order = sorted(by_loss, key=lambda name: (name != "kd", name))
    for name in order:
        runs = [(s, seconds) for s, seconds in by_loss[name] if s["status"] == "completed"]
        if not runs:
            rows.append(f"| {name} | | failed: {by_loss[name][0][0].get('error')} | | | 0 |")
            continue
        accs = [s["student"]["test_acc"] for s, _ in runs]
        gains = [s["student"]["test_acc"] - scratch[s["seed"]] for s, _ in runs]
        seconds = statistics.mean(seconds for _, seconds in runs)
        rows.append(f"| {name} | `{runs[0][0]['recipe']}` | {fmt(accs)} | {spread(gains, signed=True)} | {seconds:.0f} | "
                    f"{len(runs)} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=Path, nargs="+", help="finished sweep directories: print their table, run nothing")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--losses", default=None, help="comma-separated recipes (default: every conf/loss option)")
    parser.add_argument("--zoo", action="store_true", help="the zoo's recipes and kd (docs/loss_zoo.md)")
    parser.add_argument("--write", type=Path, help="a markdown page whose loss_table block receives the table")
    args, kdrun_args = parser.parse_known_args()
    sweeps = args.only
    if sweeps is None:
        chosen = args.losses.split(",") if args.losses else ["kd", *ZOO] if args.zoo else loss_options()
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
    result = table(sweeps)
    print(result)
    if args.write:
        write_block(args.write, "loss_table", f"{provenance()}\n\n{result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
