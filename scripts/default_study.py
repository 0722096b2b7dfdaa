"""What makes distillation pay on the embedded data: the study behind the default job.

    OMP_NUM_THREADS=1 python scripts/default_study.py            # runs every sweep, writes the tables and plot
    python scripts/default_study.py --only                        # tables and plot from the sweeps on disk
    python scripts/default_study.py --factors recipe temperature  # some of them

Each factor is one multirun over its settings and seeds 0, 1, 2, everything else at the default
job's settings (the sweeps land in outputs/study/<factor>/). For every setting: teacher, student
and scratch test accuracy (mean ± std), the paired gain (student - scratch of the same seed,
mean ± std) and how many seeds gained. The tables go into docs/default_job.md, the plot into
docs/default_study.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from docs_tables import REPO, environment, run_sweep, write_block  # noqa: E402
from kdrun.reporting.sweep import collect, spread  # noqa: E402

SEEDS = "seed=0,1,2"
# factor -> (what it varies, the key swept, its settings, fixed overrides)
FACTORS = {
    "recipe": ("loss recipe", "loss", ["kd", "kd_ls", "dist", "dkd", "rkd", "hidden_mse", "fitnet", "kd_fitnet"], []),
    "temperature": ("T (KD, alpha 0.9)", "T", [1, 2, 4, 8, 16], ["loss=kd"]),
    "alpha": ("alpha (KD, T 4)", "alpha", [0.5, 0.9, 1.0], ["loss=kd"]),
    "student": ("student family and size (KD)", "student",
                ["mlp_tiny", "mlp_small", "mnist1d_mlp", "cnn_small", "mnist1d_cnn"], ["loss=kd"]),
    "epochs": ("training length (KD)", "epochs", [20, 40, 100], ["loss=kd"]),
    "train_size": ("training set size (KD; 80% of the samples train)", "dataset.source.num_samples",
                   [1250, 2500, 5000], ["loss=kd"]),
    "labels": ("fewer labels: the share of the training set with labels, the rest distilled only (KD, strategy=unlabeled)",
               "strategy.labeled_fraction", [0.1, 0.25, 0.5], ["loss=kd", "strategy=unlabeled"]),
    "teacher": ("teacher strength: its training epochs (KD)", "teacher_training.epochs", [3, 10, 40], ["loss=kd"]),
    "consistent": ("function matching: the same shifted view for teacher and student, 100 epochs (KD, alpha 1)",
                   "dataset.source.max_shift", [0, 3], ["loss=kd", "alpha=1.0", "epochs=100"]),
}
PAGE = REPO / "docs" / "default_job.md"
PLOT = REPO / "docs" / "default_study.png"


def rows(sweep: Path, key: str) -> list[tuple[str, dict]]:
    """Per setting of ``key``: the completed jobs' numbers."""
    by_value: dict[str, list] = {}
    for job in collect(sweep):
        if job.status == "completed" and job.value("scratch") is not None:
            by_value.setdefault(job.overrides.get(key, "?"), []).append(job)
    out = []
    for value, jobs in by_value.items():
        jobs.sort(key=lambda job: int(job.overrides.get("seed", 0)))
        gains = [job.value("student") - job.value("scratch") for job in jobs]
        out.append((value, {
            "teacher": [job.value("teacher") for job in jobs if job.value("teacher") is not None],
            "student": [job.value("student") for job in jobs], "scratch": [job.value("scratch") for job in jobs],
            "gains": gains, "recipe": jobs[0].summary.get("recipe"),
        }))
    return out


def table(factor: str, sweep: Path) -> tuple[str, list[tuple[str, float, float]]]:
    title, key, values, fixed = FACTORS[factor]
    found = dict(rows(sweep, key))
    lines = [f"Varied: {title}. `kdrun -m {key}={','.join(map(str, values))} {SEEDS}{''.join(' ' + f for f in fixed)}`", "",
             f"| {key} | teacher % | student % | scratch % | gain (points) | per seed | seeds gaining |",
             "|---|---:|---:|---:|---:|---|---:|"]
    bars = []
    for value in map(str, values):
        numbers = found.get(value)
        if not numbers:
            lines.append(f"| {value} | - | - | - | - | not run | - |")
            continue
        gains = numbers["gains"]
        lines.append(f"| {value} | {spread(numbers['teacher'])} | {spread(numbers['student'])} | {spread(numbers['scratch'])} | "
                     f"{spread(gains, signed=True)} | {', '.join(f'{g:+.1f}' for g in gains)} | "
                     f"{sum(g > 0 for g in gains)}/{len(gains)} |")
        bars.append((f"{key.split('.')[-1]}={value}", statistics.mean(gains), statistics.stdev(gains) if len(gains) > 1 else 0.0))
    return "\n".join(lines), bars


def plot(groups: dict[str, list[tuple[str, float, float]]]) -> None:
    labels, means, errors, colours = [], [], [], []
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, bars in enumerate(groups.values()):
        for label, mean, error in bars:
            labels.append(label)
            means.append(mean)
            errors.append(error)
            colours.append(palette[i % len(palette)])
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) + 1.5))
    ax.barh(range(len(labels)), means, xerr=errors, color=colours, capsize=3)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.axvline(3, color="gray", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("gain from distillation, points (paired: student - scratch of the same seed), mean ± std over 3 seeds")
    ax.set_title("What makes KD pay on MNIST-1D (cnn teacher -> student)", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", nargs="+", choices=sorted(FACTORS), default=list(FACTORS))
    parser.add_argument("--only", action="store_true", help="tables and plot from the sweeps on disk; run nothing")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "study")
    args = parser.parse_args()
    groups = {}
    for factor in args.factors:
        _, key, values, fixed = FACTORS[factor]
        sweep = args.out / factor
        if not args.only:
            run_sweep(sweep, [f"{key}={','.join(map(str, values))}", SEEDS, *fixed])
        text, bars = table(factor, sweep)
        write_block(PAGE, f"study_{factor}", text)
        groups[factor] = bars
        print(text, "\n", flush=True)
    write_block(PAGE, "study_environment", f"Measured with {environment()}.")
    plot(groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
