"""A sweep's jobs read back from disk, and their tables: summary.csv, summary.md, run comparisons.

Everything here is rebuilt from the job directories (``.hydra/overrides.yaml``,
``summary.json``), so a sweep with failed or killed jobs still gets its report.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The figures every table shows: the task's selection metric (test accuracy, test perplexity, ...)
# of teacher, student and scratch baseline, and the gain of distillation (positive = it helped).
SCORES = ("teacher", "student", "scratch", "gain")


@dataclass(frozen=True)
class Score:
    """The metric a sweep's tables and plots show: the jobs' task selection metric."""

    name: str = "acc"
    title: str = "acc %"
    higher_is_better: bool = True

    @property
    def unit(self) -> str:
        return "%" if self.name == "acc" else self.name

    @property
    def gain_unit(self) -> str:
        return "points" if self.name == "acc" else self.name

    @property
    def label(self) -> str:
        return "accuracy" if self.name == "acc" else self.name


def score_of(jobs: list[Job]) -> Score:
    """The selection metric recorded in the first job's summary (accuracy for runs from before tasks)."""
    for job in jobs:
        task = job.summary.get("task")
        if task:
            metric = task["metrics"][task["select"]]
            return Score(task["select"], metric.get("title", task["select"]), bool(metric.get("higher_is_better", True)))
    return Score()


def csv_fields(score: Score) -> tuple[str, ...]:
    return ("status", "error", *(f"{role}_{score.name}" for role in SCORES[:3]), "gain", "student_params", "wall_time_s",
            "published_method_acc")


@dataclass
class Job:
    """One run directory, whatever state it was left in."""

    path: Path
    overrides: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def number(self) -> int | None:
        """The job number a sweep gave it (``003_T-4`` -> 3); None for a run outside a sweep."""
        head = self.path.name.partition("_")[0]
        return int(head) if head.isdigit() else None

    @property
    def status(self) -> str:
        """completed, failed, interrupted, or killed (no summary.json, or one still saying running)."""
        status = self.summary.get("status")
        return "killed" if status in (None, "running") else str(status)

    @property
    def error(self) -> str | None:
        if self.status == "killed":
            return "no final summary.json (the job was killed or is still running)"
        return self.summary.get("error")

    def _section(self, name: str) -> dict[str, Any]:
        return self.summary.get(name) or {}

    @property
    def metric(self) -> str:
        return (self.summary.get("task") or {}).get("select", "acc")

    def value(self, name: str) -> Any:
        """A reported number by its column name (None when the job did not produce it): ``teacher``,
        ``student``, ``scratch`` are the test value of the task's selection metric (also as
        ``student_acc``, ``student_ppl``, ...)."""
        role, _, metric = name.partition("_")
        if role in ("teacher", "student", "scratch") and metric in ("", self.metric):
            return self._section(role).get(f"test_{self.metric}")
        if name == "gain":
            return self._section("figures").get("gain")
        if name == "student_params":
            return self._section("student").get("params")
        if name == "published_method_acc":
            return self._section("published").get("method_acc")
        if name in ("status", "error"):
            return getattr(self, name)
        return self.summary.get(name)


def read_job(path: Path) -> Job:
    job = Job(Path(path))
    overrides_file = job.path / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        for override in yaml.safe_load(overrides_file.read_text()) or []:
            key, _, value = str(override).partition("=")
            job.overrides[key.lstrip("+~")] = value
    summary_file = job.path / "summary.json"
    if summary_file.is_file():
        try:
            job.summary = json.loads(summary_file.read_text())
        except json.JSONDecodeError:
            job.summary = {}
    return job


def is_run_dir(path: Path) -> bool:
    return (path / "summary.json").is_file() or (path / ".hydra" / "overrides.yaml").is_file()


def _job_number(path: Path) -> tuple[int, str]:
    number, _, _ = path.name.partition("_")
    return (int(number), path.name) if number.isdigit() else (math.inf, path.name)  # type: ignore[return-value]


def collect(sweep_dir: str | Path) -> list[Job]:
    """The jobs of a sweep, in job-number order."""
    jobs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and is_run_dir(p)]
    return [read_job(p) for p in sorted(jobs, key=_job_number)]


def as_number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _sort_key(text: str) -> tuple:
    number = as_number(text)
    return (0, number, "") if number is not None else (1, 0.0, text)


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs, in the order they were given."""
    keys: list[str] = []
    for job in jobs:
        keys += [key for key in job.overrides if key not in keys]
    return [key for key in keys if len({job.overrides.get(key) for job in jobs}) > 1]


def common_overrides(jobs: list[Job]) -> dict[str, str]:
    """Overrides every job shares (``epochs=5`` given to the whole sweep)."""
    if not jobs:
        return {}
    swept = swept_keys(jobs)
    return {key: value for key, value in jobs[0].overrides.items() if key not in swept}


def write_csv(jobs: list[Job], path: str | Path) -> Path:
    keys, fields = swept_keys(jobs), csv_fields(score_of(jobs))
    with Path(path).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", *keys, *fields])
        for job in jobs:
            cells = [round(v, 4) if isinstance(v, float) else v for v in (job.value(name) for name in fields)]
            writer.writerow([job.name, *(job.overrides.get(k, "") for k in keys), *("" if c is None else c for c in cells)])
    return Path(path)


def _cell(value: Any, pattern: str = "{:.2f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return pattern.format(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _numeric(cell: str) -> bool:
    return cell == "-" or as_number(cell.split(" ")[0].replace(",", "")) is not None


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """Numeric columns right-aligned."""
    align = ["---:" if rows and all(_numeric(row[i]) for row in rows) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def spread(values: list[float], signed: bool = False) -> str:
    stats = mean_std(values)
    if stats is None:
        return "-"
    pattern = "{:+.2f}" if signed else "{:.2f}"
    return pattern.format(stats[0]) + (f" ± {stats[1]:.2f}" if len(values) > 1 else "")


def group_by(jobs: list[Job], keys: list[str]) -> dict[tuple[str, ...], list[Job]]:
    groups: dict[tuple[str, ...], list[Job]] = defaultdict(list)
    for job in jobs:
        groups[tuple(job.overrides.get(k, "") for k in keys)].append(job)
    return dict(sorted(groups.items(), key=lambda item: [_sort_key(v) for v in item[0]]))


def score_headers(score: Score) -> list[str]:
    return [f"{role} {score.unit}" for role in SCORES[:3]] + [f"gain ({score.gain_unit})"]


def _short(text: str) -> str:
    """Override values as a table shows them: 0.3453333447543775 -> 0.3453 (summary.csv keeps them whole)."""
    number = as_number(text)
    return f"{number:.4g}" if number is not None and len(text) > 8 else text


def _per_job_table(jobs: list[Job], keys: list[str]) -> str:
    header = ["job", *keys, "status", *score_headers(score_of(jobs)), "student params", "wall time (s)"]
    published = any(job.value("published_method_acc") is not None for job in jobs)
    header += ["published %"] if published else []
    rows = []
    for job in jobs:
        row = [str(job.number) if job.number is not None else job.name, *(_short(job.overrides.get(k, "")) for k in keys), job.status]
        row += [_cell(job.value(name), "{:+.2f}" if name == "gain" else "{:.2f}") for name in SCORES]
        row += [_cell(job.value("student_params"), "{:,}"), _cell(job.value("wall_time_s"), "{:.1f}")]
        row += [_cell(job.value("published_method_acc"))] if published else []
        rows.append(row)
    return markdown_table(header, rows)


def _seed_table(jobs: list[Job], keys: list[str]) -> str:
    """One row per setting of the other swept keys: mean ± std over the seeds that completed."""
    header = [*keys, "seeds (done/all)", *score_headers(score_of(jobs)), "student params", "wall time (s)"]
    published = any(job.value("published_method_acc") is not None for job in jobs)
    header += ["published %"] if published else []
    rows = []
    for values, members in group_by(jobs, keys).items():
        done = [job for job in members if job.status == "completed"]
        row = [*map(_short, values), f"{len(done)}/{len(members)}"]
        for name in SCORES:
            row.append(spread([job.value(name) for job in done if job.value(name) is not None], signed=name == "gain"))
        params = {job.value("student_params") for job in done} - {None}
        row.append(_cell(params.pop(), "{:,}") if len(params) == 1 else "-")
        row.append(_cell(statistics.mean(job.value("wall_time_s") for job in done), "{:.1f}") if done else "-")
        row += [_cell(next((job.value("published_method_acc") for job in members), None))] if published else []
        rows.append(row)
    return markdown_table(header, rows)


def summary_markdown(jobs: list[Job], title: str) -> str:
    keys = swept_keys(jobs)
    counts = defaultdict(int)
    for job in jobs:
        counts[job.status] += 1
    lines = [f"# Sweep {title}", ""]
    lines.append(f"{len(jobs)} jobs: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ".")
    common = common_overrides(jobs)
    if common:
        lines.append("Common overrides: " + " ".join(f"`{k}={v}`" for k, v in common.items()) + ".")
    recipes = {job.summary.get("recipe") for job in jobs} - {None}
    if len(recipes) == 1:
        lines.append(f"Recipe: `{recipes.pop()}`.")
    score = score_of(jobs)
    if score.name == "acc":
        lines += ["", "Accuracies are top-1 test accuracy in percent; gain = student (KD) - student trained from scratch."]
    else:
        better = "higher" if score.higher_is_better else "lower"
        lines += ["", f"Figures are test {score.title} ({better} is better); gain is positive where distillation helped."]
    if "seed" in keys:
        others = [key for key in keys if key != "seed"]
        lines += ["Mean ± std over seeds (completed jobs only).", "", _seed_table(jobs, others)]
    else:
        lines += ["", _per_job_table(jobs, keys)]
    failed = [job for job in jobs if job.status != "completed"]
    if failed:
        lines += ["", "## Jobs that did not complete", ""]
        for job in failed:
            setting = ", ".join(f"{key}={job.overrides.get(key, '')}" for key in keys)
            where = f"job {job.number} ({setting})" if job.number is not None and setting else f"`{job.name}`"
            lines.append(f"- {where}: {job.status}: {job.error or 'no error recorded'}")
    return "\n".join(lines) + "\n"


def _setting(job: Job, name: str) -> Any:
    """What a run was: its dataset, models and seed, as comparisons show them."""
    if name == "dataset":
        return (job.summary.get("dataset") or {}).get("name")
    if name in ("teacher_arch", "student_arch"):
        return job._section(name.split("_")[0]).get("arch")
    return job.summary.get(name)


SETTING_FIELDS = [("dataset", "dataset"), ("teacher", "teacher_arch"), ("student", "student_arch"),
                  ("strategy", "strategy"), ("recipe", "recipe"), ("seed", "seed")]


def comparison_fields(score: Score) -> list[tuple[str, str, str | None]]:
    return [
        ("status", "status", None),
        *((f"{role} test {score.title}", role, "{:.2f}") for role in SCORES[:3]),
        (f"gain ({score.gain_unit})", "gain", "{:+.2f}"),
        ("student params", "student_params", "{:,}"),
        ("wall time (s)", "wall_time_s", "{:.1f}"),
        ("published method acc %", "published_method_acc", "{:.2f}"),
    ]


def comparison_markdown(jobs: list[Job]) -> str:
    """Runs side by side: one column per run (numbered), one row per setting (dataset, models,
    recipe, seed) and figure; each run's full name and path below."""
    rows = [[label, *(_cell(None if _setting(job, name) is None else str(_setting(job, name))) for job in jobs)]
            for label, name in SETTING_FIELDS]
    for label, name, pattern in comparison_fields(score_of(jobs)):
        cells = [job.value(name) for job in jobs]
        if name == "published_method_acc" and all(c is None for c in cells):
            continue
        rows.append([label, *(_cell(c, pattern) if pattern else _cell(c) for c in cells)])
    if any(job.error for job in jobs):
        rows.append(["error", *(_cell(job.error) for job in jobs)])
    header = ["", *(f"run {i}" for i in range(1, len(jobs) + 1))]
    paths = "\n".join(f"- run {i}: {job.name} (`{job.path}`)" for i, job in enumerate(jobs, start=1))
    return markdown_table(header, rows) + "\n\nRuns:\n\n" + paths + "\n"
