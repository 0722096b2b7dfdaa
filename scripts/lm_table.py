"""The language-model tables of docs/language_models.md, measured: the default LM job over three
seeds, and the temperature and loss-family study.

    python scripts/lm_table.py                    # runs both sweeps, then writes the tables into the docs
    python scripts/lm_table.py --only SEEDS STUDY  # just the tables, from finished sweep directories
    python scripts/lm_table.py --print            # print the tables instead of writing the docs

The sweeps are ``kdrun -m experiment=lm_tiny seed=0,1,2`` and ``kdrun -m experiment=lm_tiny
loss=token_kd,reverse_kl,jsd,skew_kl T=1,2,4`` (the teacher is trained once and cached). Extra
arguments go to kdrun. Each table is written between ``<!-- table:lm_NAME -->`` markers, under the
command that regenerates it and the versions and thread count it ran with.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import transformers
import yaml

from docs_tables import write_block

DOCS = Path(__file__).resolve().parent.parent / "docs" / "language_models.md"
SWEEPS = {
    "seeds": ["experiment=lm_tiny", "seed=0,1,2"],
    "study": ["experiment=lm_tiny", "loss=token_kd,reverse_kl,jsd,skew_kl", "T=1,2,4"],
}


def summaries(sweep: Path) -> list[tuple[dict, dict]]:
    """(summary, the job's overrides as a dict) for every finished job of a sweep."""
    jobs = []
    for path in sorted(sweep.glob("*/summary.json")):
        overrides = yaml.safe_load((path.parent / ".hydra" / "overrides.yaml").read_text())
        jobs.append((json.loads(path.read_text()), dict(o.split("=", 1) for o in overrides)))
    return jobs


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def seeds_table(sweep: Path) -> str:
    done = [s for s, _ in summaries(sweep) if s["status"] == "completed"]
    if not done:
        raise SystemExit(f"error: no completed job under {sweep}")
    rows = ["| seed | teacher ppl | student ppl (KD) | student ppl (scratch) | gain (ppl) | wall time (s) |",
            "|---|---|---|---|---|---|"]
    for s in sorted(done, key=lambda s: s["seed"]):
        rows.append(f"| {s['seed']} | {s['teacher']['test_ppl']:.2f} | {s['student']['test_ppl']:.2f} | "
                    f"{s['scratch']['test_ppl']:.2f} | {s['figures']['gain']:+.2f} | {s['wall_time_s']:.0f} |")
    columns = [[s[k]["test_ppl"] for s in done] for k in ("teacher", "student", "scratch")]
    rows.append(f"| mean ± std | {' | '.join(mean_std(c) for c in columns)} | "
                f"{mean_std([s['figures']['gain'] for s in done])} | {mean_std([s['wall_time_s'] for s in done])} |")
    wins = sum(s["student"]["test_ppl"] < s["scratch"]["test_ppl"] for s in done)
    return "\n".join(rows) + f"\n\nThe distilled student's test perplexity is below the scratch student's in {wins} of {len(done)} seeds."


def study_table(sweep: Path) -> str:
    cells: dict[str, dict[str, dict]] = defaultdict(dict)
    for summary, overrides in summaries(sweep):
        cells[overrides.get("loss", "token_kd")][overrides.get("T", "1")] = summary
    temperatures = sorted({t for row in cells.values() for t in row}, key=float)
    rows = ["| loss | recipe | " + " | ".join(f"T={t}: student ppl (gain)" for t in temperatures) + " |",
            "|---|---|" + "---|" * len(temperatures)]
    for loss in ("token_kd", "reverse_kl", "jsd", "skew_kl"):
        if loss not in cells:
            continue
        first = next(iter(cells[loss].values()))
        shown = []
        for t in temperatures:
            s = cells[loss].get(t)
            ok = s is not None and s["status"] == "completed"
            shown.append(f"{s['student']['test_ppl']:.2f} ({s['figures']['gain']:+.2f})" if ok else "-")
        recipe = re.sub(r"T=[0-9.]+", "T", first.get("recipe") or "")
        rows.append(f"| {loss} | `{recipe}` | " + " | ".join(shown) + " |")
    scratch = [s["scratch"]["test_ppl"] for row in cells.values() for s in row.values() if s.get("scratch")]
    return "\n".join(rows) + f"\n\nScratch student (labels only): test ppl {statistics.mean(scratch):.2f}; gain = scratch ppl - student ppl."


def header(name: str, sweep: Path) -> str:
    command = f"python scripts/lm_table.py  # runs kdrun -m {' '.join(SWEEPS[name])}"
    device = "cuda" if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return (f"Regenerate: `{command}`  \nMeasured {time.strftime('%Y-%m-%d')} with kdrun at "
            f"{subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
            f"{device}, {threads} thread(s); sweep {sweep.name}.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=Path, nargs=2, metavar=("SEEDS", "STUDY"), help="finished sweeps: tables only")
    parser.add_argument("--print", action="store_true", help="print the tables, leave the docs alone")
    args, kdrun_args = parser.parse_known_args()
    sweeps = dict(zip(SWEEPS, args.only)) if args.only else {}
    for name, overrides in SWEEPS.items():
        if name in sweeps:
            continue
        sweeps[name] = Path("outputs/sweeps") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_lm_{name}"
        command = [sys.executable, "-m", "kdrun", "-m", *overrides, f"hydra.sweep.dir={sweeps[name]}", *kdrun_args]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=False)
    for name, make in (("seeds", seeds_table), ("study", study_table)):
        text = header(name, sweeps[name]) + "\n\n" + make(sweeps[name])
        print(text, "\n") if args.print else write_block(DOCS, f"lm_{name}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
