"""PNG plots of a sweep: accuracy against T, a T x alpha heatmap, and learning curves per job.

Each plot is made only when the sweep has what it needs; otherwise a log line says why not.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kdrun.reporting.sweep import Job, Score, as_number, group_by, mean_std, score_of, swept_keys  # noqa: E402

log = logging.getLogger(__name__)

CURVES_PER_PAGE = 12
MAX_GRID = 12  # more distinct values than this: a search over an interval, not a grid
MAX_LINES = 8
TEST_ROLES = ("student", "scratch", "teacher")
MODEL_STYLE = {"student": "tab:blue", "scratch": "tab:green", "teacher": "tab:red"}
LEGEND_COLUMNS = 6


def _numeric_values(jobs: list[Job], key: str) -> list[float] | None:
    values = {job.overrides.get(key) for job in jobs}
    numbers = [as_number(v) for v in values]
    return None if any(n is None for n in numbers) else sorted(numbers)  # type: ignore[arg-type]


def _label(keys: list[str], values: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values)) or "student"


def _mean_of(jobs: list[Job], name: str) -> float | None:
    values = [job.value(name) for job in jobs if job.value(name) is not None]
    return statistics.mean(values) if values else None


def accuracy_vs_T(jobs: list[Job], path: Path) -> Path | None:
    """The student's test score (the task's selection metric) against T, one line per setting of the
    other swept keys, mean ± std over seeds."""
    keys, score = swept_keys(jobs), score_of(jobs)
    done = [job for job in jobs if job.status == "completed"]
    temperatures = _numeric_values(done, "T") if "T" in keys and done else None
    if not temperatures or len(temperatures) < 2:
        log.info("accuracy-vs-T plot skipped: T is not swept over two or more numeric values in completed jobs")
        return None
    series_keys = [key for key in keys if key not in ("T", "seed")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    log_scale = temperatures[0] > 0 and temperatures[-1] / temperatures[0] >= 8
    series = group_by(done, series_keys)
    if len(series) > MAX_LINES or len(temperatures) > MAX_GRID:
        _scatter_trials(ax, fig, done, series_keys)  # a random or Optuna search: one point per job
    else:
        for number, (values, members) in enumerate(series.items()):
            points = []
            for T_text, runs in group_by(members, ["T"]).items():
                stats = mean_std([job.value("student") for job in runs])
                points.append((as_number(T_text[0]), *stats))
            points.sort()
            # Each series is nudged sideways a little so that error bars do not hide each other.
            nudge = 0.015 * (number - (len(series) - 1) / 2)
            span = temperatures[-1] - temperatures[0]
            xs = [x * 2 ** (nudge * 4) if log_scale else x + nudge * span for x, _, _ in points]
            ax.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points] if "seed" in keys else None,
                        marker="o", capsize=4, linewidth=1.5, label=_label(series_keys, values))
    scratch = _mean_of(done, "scratch")
    if scratch is not None:
        ax.axhline(scratch, color="gray", linestyle="--", linewidth=1, label=f"scratch student ({scratch:.1f}{_unit(score)})")
    if log_scale:
        ax.set_xscale("log", base=2)
    if len(temperatures) <= MAX_GRID:
        ax.set_xticks(temperatures)
        ax.set_xticklabels([f"{t:g}" for t in temperatures])
        ax.minorticks_off()
    seeds = f", mean ± std over {len(set(j.overrides.get('seed') for j in done))} seeds" if "seed" in keys else ""
    teacher = _mean_of(done, "teacher")
    teacher_text = f"\nteacher test {score.label} {teacher:.1f}{_unit(score)}" if teacher is not None else ""
    ax.set_title(f"Student test {score.label} vs temperature{seeds}{teacher_text}", fontsize=11)
    ax.set_xlabel("temperature T")
    ax.set_ylabel(_axis(score))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _scatter_trials(ax, fig, done: list[Job], series_keys: list[str]) -> None:
    xs = [as_number(job.overrides["T"]) for job in done]
    ys = [job.value("student") for job in done]
    colour_key = next((key for key in series_keys if _numeric_values(done, key)), None)
    if colour_key is None:
        ax.scatter(xs, ys, s=30, label="one point per job")
        return
    points = ax.scatter(xs, ys, c=[as_number(job.overrides[colour_key]) for job in done], cmap="viridis", s=30,
                        label="one point per job")
    fig.colorbar(points, ax=ax, label=colour_key)


def heatmaps_T_alpha(jobs: list[Job], sweep_dir: Path) -> list[Path]:
    keys = swept_keys(jobs)
    done = [job for job in jobs if job.status == "completed"]
    if not ("T" in keys and "alpha" in keys) or not done:
        log.info("T x alpha heatmap skipped: it needs both T and alpha swept and a completed job")
        return []
    temperatures, alphas = _numeric_values(done, "T"), _numeric_values(done, "alpha")
    if not temperatures or not alphas:
        log.info("T x alpha heatmap skipped: T or alpha has non-numeric values")
        return []
    cells = {(job.overrides["T"], job.overrides["alpha"]) for job in done}
    if len(temperatures) > MAX_GRID or len(alphas) > MAX_GRID or len(cells) < 0.5 * len(temperatures) * len(alphas):
        log.info("T x alpha heatmap skipped: the jobs do not fill a T x alpha grid (a random or Optuna search?)")
        return []
    other_keys = [key for key in keys if key not in ("T", "alpha", "seed")]
    paths = []
    for values, members in group_by(done, other_keys).items():
        grid = [[math.nan] * len(temperatures) for _ in alphas]
        for (alpha_text, T_text), runs in group_by(members, ["alpha", "T"]).items():
            grid[alphas.index(as_number(alpha_text))][temperatures.index(as_number(T_text))] = mean_std(
                [job.value("student") for job in runs])[0]
        fig, ax = plt.subplots(figsize=(1.3 * len(temperatures) + 3, 0.8 * len(alphas) + 2.2))
        image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        finite = [v for row in grid for v in row if not math.isnan(v)]
        middle = (min(finite) + max(finite)) / 2
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                text = "n/a" if math.isnan(value) else f"{value:.1f}"
                ax.text(c, r, text, ha="center", va="center", fontsize=9,
                        color="black" if not math.isnan(value) and value > middle else "white")
        ax.set_xticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("temperature T")
        ax.set_ylabel("alpha (KD weight)")
        suffix = f", {_label(other_keys, values)}" if other_keys else ""
        over = " over seeds" if "seed" in keys else ""
        score = score_of(jobs)
        ax.set_title(f"Mean {_axis(score)}{over}{suffix}", fontsize=10)
        fig.colorbar(image, ax=ax, label=_axis(score))
        name = "heatmap_T_alpha" + ("_" + "_".join(f"{k}={v}" for k, v in zip(other_keys, values)) if other_keys else "")
        paths.append(_save(fig, sweep_dir / f"{_safe(name)}.png"))
    return paths


def categorical_bars(jobs: list[Job], sweep_dir: Path) -> list[Path]:
    """For each swept setting with non-numeric values (``loss=kd,dkd,dist``, ``strategy=...``,
    ``student=...``): the student's mean test score per value, with error bars over seeds (the
    other swept settings pooled), and the scratch baseline as a line."""
    keys, score = swept_keys(jobs), score_of(jobs)
    done = [job for job in jobs if job.status == "completed" and job.value("student") is not None]
    paths = []
    for key in keys:
        if key == "seed" or not done or _numeric_values(done, key) is not None:
            continue
        groups = group_by(done, [key])
        names = [values[0] for values in groups]
        stats = [mean_std([job.value("student") for job in members]) for members in groups.values()]
        seeds = len({job.overrides.get("seed") for job in done}) if "seed" in keys else 1
        fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(names) + 2), 4.2))
        ax.bar(range(len(names)), [m for m, _ in stats], yerr=[sd for _, sd in stats] if seeds > 1 else None,
               capsize=4, color="tab:blue", alpha=0.85, label="student (distilled)")
        scratch = _mean_of(done, "scratch")
        if scratch is not None:
            ax.axhline(scratch, color="gray", linestyle="--", linewidth=1, label=f"scratch student ({scratch:.1f}{_unit(score)})")
        ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
        low = min(m - sd for m, sd in stats)
        high = max(m + sd for m, sd in stats)
        pad = max(0.5, 0.15 * (high - low))
        ax.set_ylim(min(low, scratch if scratch is not None else low) - pad, max(high, scratch if scratch is not None else high) + pad)
        over = f", mean ± std over {seeds} seeds" if seeds > 1 else ""
        ax.set_title(f"Student test {score.label} by {key}{over}", fontsize=11)
        ax.set_xlabel(key)
        ax.set_ylabel(_axis(score))
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        paths.append(_save(fig, sweep_dir / f"{_safe(f'{score.label}_by_{key}')}.png"))
    return paths


def _unit(score: Score) -> str:
    return "%" if score.name == "acc" else ""


def _axis(score: Score) -> str:
    return f"student test {score.label}" + (" (%)" if score.name == "acc" else "")


def validation_curves(run_dir: Path, metric: str = "acc") -> dict[str, list[tuple[int, float]]]:
    """The validation ``metric`` per epoch of every model in the run's metrics.jsonl."""
    curves: dict[str, dict[int, float]] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if row.get("split") == "val" and isinstance(row.get(metric), (int, float)) and "epoch" in row:
            curves.setdefault(str(row.get("model", "student")), {})[int(row["epoch"])] = float(row[metric])
    return {model: sorted(points.items()) for model, points in curves.items()}


def _model_colours(models: list[str]) -> dict[str, str]:
    """One colour per model label across a figure: the usual ones fixed, the others (peers,
    generations, assistants) from the rest of the palette."""
    colours = {model: MODEL_STYLE[model] for model in models if model in MODEL_STYLE}
    fixed = {matplotlib.colors.to_hex(c) for c in MODEL_STYLE.values()}
    cycle = [matplotlib.colors.to_hex(c) for c in plt.rcParams["axes.prop_cycle"].by_key()["color"]]
    spare = [c for c in cycle if c not in fixed]
    spare = spare or ["tab:gray"]
    for index, model in enumerate(m for m in models if m not in colours):
        colours[model] = spare[index % len(spare)]
    return colours


def learning_curves(jobs: list[Job], sweep_dir: Path) -> list[Path]:
    """Small multiples, one panel per job, up to CURVES_PER_PAGE panels per PNG."""
    keys, score = swept_keys(jobs), score_of(jobs)
    with_curves = [(job, validation_curves(job.path, score.name)) for job in jobs]
    with_curves = [(job, curves) for job, curves in with_curves if curves]
    if not with_curves:
        log.info("learning curves skipped: no job has validation rows in metrics.jsonl")
        return []
    pages = [with_curves[i:i + CURVES_PER_PAGE] for i in range(0, len(with_curves), CURVES_PER_PAGE)]
    paths = []
    for number, page in enumerate(pages, start=1):
        columns = min(4, len(page))
        rows = math.ceil(len(page) / columns)
        colours = _model_colours(sorted({model for _, curves in page for model in curves}))
        legend_rows = math.ceil(len(colours) / LEGEND_COLUMNS)
        height = 3.1 * rows + 0.5 + 0.25 * legend_rows
        fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, height), sharey=True, squeeze=False)
        for ax, (job, curves) in zip(axes.flat, page):
            for model, points in sorted(curves.items()):
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 15 else None,
                        markersize=3, label=f"{model} (val)", color=colours[model])
            title = f"#{job.number} " if job.number is not None else ""
            title += ", ".join(f"{k}={job.overrides.get(k, '')}" for k in keys) or job.name[:40]
            title += "" if job.status == "completed" else f" [{job.status}]"
            tests = [(role, job.value(role)) for role in TEST_ROLES if job.value(role) is not None]
            if tests:
                title += f"\ntest {score.unit}: " + ", ".join(f"{role} {value:.1f}" for role, value in tests)
            ax.set_title(title, fontsize=8.5)
            ax.grid(True, alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.tick_params(labelsize=8)
        for ax in axes.flat[len(page):]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel(f"val {score.label}" + (" (%)" if score.name == "acc" else ""), fontsize=9)
        for ax in axes[-1, :]:
            ax.set_xlabel("epoch", fontsize=9)
        handles, labels = {}, []
        for ax in axes.flat[:len(page)]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        labels = list(handles)
        fig.legend([handles[label] for label in labels], labels, loc="lower center", fontsize=8,
                   ncol=min(LEGEND_COLUMNS, len(labels)), frameon=False)
        page_text = f" (page {number} of {len(pages)})" if len(pages) > 1 else ""
        fig.suptitle(f"Validation {score.label} per epoch, one panel per job{page_text}", fontsize=11, x=0.01, ha="left")
        fig.tight_layout(rect=(0, (0.25 * legend_rows + 0.1) / height, 1, 1 - 0.3 / height))
        name = "learning_curves.png" if len(pages) == 1 else f"learning_curves_{number}.png"
        paths.append(_save(fig, sweep_dir / name, tight=False))
    return paths


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._=-" else "_" for ch in name)


def _save(fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(jobs: list[Job], sweep_dir: Path) -> list[Path]:
    """Every plot that makes sense for this sweep; returns the files written."""
    written = []
    acc_path = accuracy_vs_T(jobs, sweep_dir / f"{score_of(jobs).label}_vs_T.png")
    written += [acc_path] if acc_path else []
    written += heatmaps_T_alpha(jobs, sweep_dir)
    written += categorical_bars(jobs, sweep_dir)
    written += learning_curves(jobs, sweep_dir)
    return written
