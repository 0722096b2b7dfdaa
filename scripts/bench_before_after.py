"""Step times and ratios of ``scripts/bench.py`` at an earlier commit and now, measured in turns.

    python scripts/bench_before_after.py --before 441d49f --write docs/performance.md
    python scripts/bench_before_after.py --before 441d49f --rounds 3 -- --preset cifar --epochs 2

Checks out ``--before`` into a temporary git worktree and runs that commit's own
``scripts/bench.py`` (its code on ``PYTHONPATH``, in this environment) and today's, alternately
``--rounds`` times each (so drifts in the machine's load hit both alike), with the same bench
arguments (after ``--``; default ``--repeats 3 --no-e2e --switches teacher_cache``). The table gives
the median over rounds of each figure, before and now, and now / before. It is written between
the ``<!-- table:bench_before_after -->`` markers of the page given with ``--write``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from docs_tables import REPO, provenance, write_block

FIGURES = [
    ("kdrun_step_s", "kdrun KD step, defaults (ms)", 1e3),
    ("kdrun_step_s_no_cache", "kdrun KD step, teacher cache off (ms)", 1e3),
    ("student_ce_step_s", "student CE step (ms)", 1e3),
    ("teacher_forward_s", "teacher forward (ms)", 1e3),
    ("hand_kd_step_s", "hand-written KD step (ms)", 1e3),
    ("kd_overhead_ratio", "(a) KD overhead ratio, defaults", 1),
    ("kd_overhead_ratio_no_cache", "(a) KD overhead ratio, teacher cache off", 1),
    ("throughput_vs_hand_loop", "(b) throughput / hand-written loop, defaults", 1),
    ("throughput_vs_hand_loop_no_cache", "(b) throughput / hand-written loop, teacher cache off", 1),
]


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=REPO, check=True, capture_output=True)
    package_conf = where / "kdrun" / "conf"
    if not package_conf.exists() and (where / "conf").is_dir():  # older layouts ship conf/ through pyproject only
        package_conf.symlink_to(where / "conf")
    return where


def bench(root: Path, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'scripts'}"}
    command = [sys.executable, str(root / "scripts" / "bench.py"), *args, "--out", str(out)]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def table(before: list[dict], now: list[dict], rev: str) -> str:
    lines = [f"| figure | before ({rev}) | now | now / before |", "|---|---:|---:|---:|"]
    for key, title, scale in FIGURES:
        if key not in before[0] or key not in now[0]:
            continue
        old = statistics.median(run[key] for run in before) * scale
        new = statistics.median(run[key] for run in now) * scale
        lines.append(f"| {title} | {old:.3f} | {new:.3f} | {new / old:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the earlier commit")
    parser.add_argument("--rounds", type=int, default=3, help="bench runs of each, in turns")
    parser.add_argument("--write", type=Path, help="a markdown page whose bench_before_after block receives the table")
    args, rest = parser.parse_known_args()
    bench_args = [a for a in rest if a != "--"] or ["--repeats", "3", "--no-e2e", "--switches", "teacher_cache"]
    with tempfile.TemporaryDirectory() as tmp:
        old_root = worktree(args.before, Path(tmp) / "before")
        try:
            before, now = [], []
            for number in range(args.rounds):
                before.append(bench(old_root, bench_args, Path(tmp) / f"before_{number}.json"))
                now.append(bench(REPO, bench_args, Path(tmp) / f"now_{number}.json"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_root)], cwd=REPO, check=False)
    head = (f"{provenance()} Medians over {args.rounds} bench runs of each, taken in turns; each run: "
            f"`python scripts/bench.py {' '.join(bench_args)}` (batch {now[0]['batch_size']}, "
            f"{now[0]['steps_per_epoch']} steps/epoch, preset {now[0]['preset']}).")
    text = f"{head}\n\n{table(before, now, args.before)}"
    print(text)
    if args.write:
        write_block(args.write, "bench_before_after", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
