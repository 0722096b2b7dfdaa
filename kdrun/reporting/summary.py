"""``summary.json`` and the headline table printed at the end of a run."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import kdrun
from kdrun.models import count_params


def versions() -> dict[str, Any]:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(kdrun.__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    import torchvision

    return {"kdrun": kdrun.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__, "git_sha": sha}


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / "summary.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


# A forward faster than this is mostly framework overhead: its time says little about the model.
MIN_TIMEABLE_S = 1e-4


@torch.no_grad()
def time_in_turns(forwards: dict[str, Callable[[], Any]], device: torch.device, budget_s: float = 1.0,
                  min_rounds: int = 15, max_rounds: int = 300) -> dict[str, list[float]]:
    """Seconds per call of each forward, timed in turns (one call of each per round, so load
    drifts hit all alike) after a warm-up, until ``budget_s`` is spent and at least ``min_rounds``
    rounds are done."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for forward in forwards.values():
        for _ in range(3):
            forward()
    sync()
    times: dict[str, list[float]] = {name: [] for name in forwards}
    spent = 0.0
    for rounds in range(1, max_rounds + 1):
        for name, forward in forwards.items():
            start = time.perf_counter()
            forward()
            sync()
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
        if rounds >= min_rounds and spent >= budget_s:
            break
    return times


def two_significant(value: float) -> str:
    """``717.3`` -> ``720``, ``27.13`` -> ``27``, ``1.234`` -> ``1.2``."""
    if value <= 0 or not math.isfinite(value):
        return f"{value:g}"
    digits = 1 - math.floor(math.log10(value))
    rounded = round(value, digits)
    return f"{rounded:,.{max(digits, 0)}f}"


def speed_figures(task, student: nn.Module, teacher: nn.Module | None, batch,
                  timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Forward time of student (and teacher) on ``batch`` in eval mode, timed in turns (``timing``:
    the config's ``speed`` settings, ``budget_s`` and ``min_rounds``); the speed-up is the ratio of
    the medians, and a student too fast to time is flagged."""
    models = {"student": student, **({"teacher": teacher} if teacher is not None else {})}
    modes = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    device = batch.labels.device
    times = time_in_turns({name: (lambda m=model: task.forward(m, batch)) for name, model in models.items()}, device,
                          **(timing or {}))
    for name, model in models.items():
        model.train(modes[name])
    medians = {name: statistics.median(values) for name, values in times.items()}
    figures: dict[str, Any] = {
        "speed_device": str(device), "speed_batch_size": batch.size, "speed_rounds": len(times["student"]),
        "student_samples_per_s": batch.size / medians["student"],
        "speedup": None, "speedup_note": None,
    }
    if teacher is not None:
        figures["teacher_samples_per_s"] = batch.size / medians["teacher"]
        figures["speedup"] = float(two_significant(medians["teacher"] / medians["student"]).replace(",", ""))
    if medians["student"] < MIN_TIMEABLE_S:
        figures["speedup_note"] = "the student is too small to time reliably: its time is mostly framework overhead"
    return figures


def model_entry(model, task_metrics) -> dict[str, Any]:
    """A ``models`` entry of summary.json: role, arch, params, the test metrics, best validation
    value, where it came from and its checkpoint (plus what the strategy added)."""
    select = task_metrics.select
    entry = {
        "role": model.role, "arch": model.arch, "params": count_params(model.model),
        **{f"test_{name}": value for name, value in model.test.items()},
        f"best_val_{select}": model.best_val, "source": model.source,
        "checkpoint": None if model.checkpoint is None else str(model.checkpoint),
    }
    entry.update(model.info)
    return entry


def _metrics_of(entry: dict[str, Any], task) -> dict[str, Any]:
    keys = [f"test_{m.name}" for m in task.metrics] + [f"best_val_{task.select}"]
    return {key: entry.get(key) for key in keys}


def model_sections(result, scratch, task) -> dict[str, Any]:
    """``student``, ``teacher``, ``scratch`` and ``models`` of summary.json from a strategy's result."""
    models = {name: model_entry(model, task) for name, model in result.models.items()}
    if scratch is not None:
        models["scratch"] = model_entry(scratch, task)
    student = models.get(result.student.name) or model_entry(result.student, task)
    sections: dict[str, Any] = {
        "student": {"arch": student["arch"], "params": student["params"], **_metrics_of(student, task), "model": result.student.name},
        "teacher": None, "scratch": None, "models": models,
    }
    if result.teacher is not None:
        teacher = models.get(result.teacher.name) or model_entry(result.teacher, task)
        sections["teacher"] = {"arch": teacher["arch"], "params": teacher["params"], **_metrics_of(teacher, task),
                               "source": teacher["source"], "path": teacher["checkpoint"]}
        if "members" in teacher:
            sections["teacher"]["members"] = [models[name] for name in teacher["members"]]
            sections["teacher"]["weights"] = teacher.get("weights")
    if scratch is not None:
        sections["scratch"] = {**_metrics_of(models["scratch"], task), "source": scratch.source, **scratch.info}
    return sections


def name_test_selection(sections: dict[str, Any], task) -> None:
    """With ``dataset.val_fraction=0`` the validation split is the test split: the best
    "validation" value is a test-set number. It is then recorded as ``best_test_<metric>`` and
    ``best_val_<metric>`` is null, so nothing reads it as a validation figure."""
    old, new = f"best_val_{task.select}", f"best_test_{task.select}"
    entries = [sections.get(name) for name in ("student", "teacher", "scratch")] + list(sections["models"].values())
    for entry in entries:
        if entry and old in entry:
            entry[new], entry[old] = entry[old], None
    sections["selection"] = "test (dataset.val_fraction=0: best.pt was chosen on the test set)"


def strategy_sections(result, task) -> dict[str, Any]:
    """Sections a strategy's models imply, by their roles: the generations of born-again, the
    chain of a progressive run, self-distillation's heads, an ensemble of the trained models;
    plus the strategy's own details."""
    select = f"test_{task.select}"
    by_role: dict[str, list] = {}
    for model in result.models.values():
        by_role.setdefault(model.role, []).append(model)
    sections: dict[str, Any] = dict(result.details)
    generations = [m for m in result.models.values() if m.name.startswith("gen") and m.name[3:].isdigit()]
    if generations:
        sections["generations"] = [{"generation": int(m.name[3:]), select: m.test.get(task.select),
                                    f"best_val_{task.select}": m.best_val} for m in generations]
    if "assistant" in by_role:
        chain = [result.teacher, *by_role["assistant"], result.student]
        sections["chain"] = [{"model": m.name, "arch": m.arch, select: m.test.get(task.select)} for m in chain]
    if "auxiliary" in by_role:
        sections["heads"] = {m.name: {"tap": m.info.get("tap"), select: m.test.get(task.select)} for m in by_role["auxiliary"]}
    ensembles = [m for m in by_role.get("ensemble", []) if "members" in m.info]
    if ensembles:
        sections["ensemble"] = {select: ensembles[0].test.get(task.select), "members": ensembles[0].info["members"]}
    return sections


def recipe_sections(recipe, rows: list[dict], student_name: str) -> dict[str, Any]:
    """The recipe as a formula, its final weights, and the parts of the student's last training epoch."""
    if recipe is None:
        return {"recipe": None, "recipe_weights": None, "loss_parts": None}
    last_train = [r for r in rows if r.get("model") == student_name and r.get("split") == "train"][-1:]
    return {
        "recipe": str(recipe), "recipe_weights": dict(recipe.weights),
        "loss_parts": {k: v for row in last_train for k, v in row.items() if k.startswith("loss/")},
    }


def distillation_figures(summary: dict[str, Any], task, student: nn.Module, teacher: nn.Module | None,
                         batch, timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gain over scratch, compression, retention and inference speed-up of student over teacher.

    ``gain`` is positive when distillation helped: student minus scratch for a metric where
    higher is better (accuracy), scratch minus student where lower is (perplexity); likewise
    ``retention`` is the share of the teacher's figure the student keeps."""
    metric = task.selected
    key = f"test_{metric.name}"
    student_entry, teacher_entry, scratch_entry = summary["student"], summary.get("teacher"), summary.get("scratch")
    figures: dict[str, Any] = {"metric": metric.name, "gain": None, "compression": None, "retention": None, "speedup": None}
    sign = 1 if metric.higher_is_better else -1
    if scratch_entry and scratch_entry.get(key) is not None:
        figures["gain"] = sign * (student_entry[key] - scratch_entry[key])
    if teacher_entry and teacher is not None:
        figures["compression"] = teacher_entry["params"] / student_entry["params"]
        ratio = (student_entry[key], teacher_entry[key]) if metric.higher_is_better else (teacher_entry[key], student_entry[key])
        if ratio[1]:
            figures["retention"] = 100.0 * ratio[0] / ratio[1]
    figures.update(speed_figures(task, student, teacher if teacher_entry else None, batch, timing))
    return figures


@torch.no_grad()
def paired_test(task, student: nn.Module, scratch: nn.Module, loader, device: torch.device) -> dict[str, Any] | None:
    """Is the student's gain over the scratch student more than the test set's sampling noise?

    Both models score the same test items; McNemar's exact test counts the items only one of them
    gets right (``student_only``, ``scratch_only``) and gives the two-sided p-value of a split at
    least that uneven if the two were equally good. None for a task without right and wrong items."""
    from scipy.stats import binomtest

    from kdrun.engine.loop import Placement

    counts = {"student_only": 0, "scratch_only": 0, "items": 0}
    modes = (student.training, scratch.training)
    student.eval(), scratch.eval()
    try:
        for loaded in loader:
            batch = Placement(task, device)(loaded)
            right = [task.correct_items(*task.scored(task.forward(model, batch), batch)) for model in (student, scratch)]
            if right[0] is None:
                return None
            counts["student_only"] += int((right[0] & ~right[1]).sum())
            counts["scratch_only"] += int((right[1] & ~right[0]).sum())
            counts["items"] += right[0].numel()
    finally:
        student.train(modes[0]), scratch.train(modes[1])
    differing = counts["student_only"] + counts["scratch_only"]
    counts["p_value"] = binomtest(counts["student_only"], differing, 0.5).pvalue if differing else 1.0
    return counts


def significance_text(test: dict[str, Any] | None, seed: Any) -> str:
    if not test:
        return ""
    verdict = "beyond" if test["p_value"] < 0.05 else "within"
    p_value = "p < 0.001" if test["p_value"] < 0.001 else f"p = {test['p_value']:.2g}"
    return f" (seed {seed}; McNemar {p_value} on {test['items']:,} test items: {verdict} the test set's noise)"


def _fmt(value: Any, pattern: str, missing: str = "-") -> str:
    return missing if value is None else pattern.format(value)


def _published_method(published: dict[str, Any]) -> str:
    """The paper's number for the method run here. Experiments that list ``methods`` select
    ``method_acc`` by ``method``, the loss chosen on the command line (``choices.loss``)."""
    method, acc = published.get("method"), published.get("method_acc")
    if method is None:
        return f"this method {_fmt(acc, '{:.2f}')}"
    if acc is None:
        return f"this method ({method}): no published number"
    return f"this method ({method}) {acc:.2f}"


def _row(label: str, entry: dict[str, Any], key: str, fmt: str) -> tuple[str, str, str, str]:
    return (label, str(entry["arch"]), f"{entry['params']:,}", _fmt(entry.get(key), fmt))


def headline(summary: dict[str, Any]) -> str:
    """A short table of the run's outcome, for the terminal and the log: every model the strategy
    trained or was given (the student marked), the scratch baseline, and the figures."""
    task = summary.get("task") or {"select": "acc", "metrics": {"acc": {"title": "acc %"}}}
    metric = task["select"]
    key, fmt = f"test_{metric}", "{:.2f}"
    student, teacher, scratch, figures = summary["student"], summary.get("teacher"), summary.get("scratch"), summary["figures"]
    rows = [("model", "arch", "params", f"test {task['metrics'][metric]['title']}")]
    models = summary.get("models") or {}
    teacher_name = next((name for name, m in models.items() if teacher and m.get("checkpoint") == teacher.get("path")
                         and m.get("role") == "teacher"), None)
    if teacher:
        rows.append(_row("teacher", teacher, key, fmt))
    for name, entry in models.items():
        if name in ("scratch", teacher_name) or (teacher and name == "teacher"):
            continue
        if name == student.get("model"):
            label = ("student (distilled)" if teacher else "student") if name == "student" else f"{name} <- student"
        else:
            label = name
        rows.append(_row(label, entry, key, fmt))
    if not any(name not in ("scratch", teacher_name, "teacher") for name in models):
        rows.append(_row("student", student, key, fmt))
    if scratch:
        rows.append(_row(f"student (scratch{', ' + scratch['trained_on'] if scratch.get('trained_on') else ''})",
                         {**student, key: scratch.get(key)}, key, fmt))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", figures_line(figures, metric, significance_text(figures.get("gain_test"), summary.get("seed")))]
    if summary.get("generation"):
        lines.append(generation_line(summary["generation"]))
    if summary.get("selection"):
        lines.append(f"best checkpoints selected on: {summary['selection']}")
    published = summary.get("published")
    if published:
        lines.append(
            f"published ({published.get('source', 'paper')}): teacher {_fmt(published.get('teacher_acc'), '{:.2f}')}, "
            f"student {_fmt(published.get('student_acc'), '{:.2f}')}, {_published_method(published)}"
        )
    return "\n".join(lines)


def figures_line(figures: dict[str, Any], metric: str, significance: str = "") -> str:
    unit = "points" if metric == "acc" else metric
    speed = "-" if figures.get("speedup") is None else f"{two_significant(figures['speedup'])}x"
    batch = figures["speed_batch_size"]
    times = ", ".join(f"{name} {1e3 * batch / figures[f'{name}_samples_per_s']:.2g} ms" for name in ("teacher", "student")
                      if figures.get(f"{name}_samples_per_s"))
    note = f"; {figures['speedup_note']}" if figures.get("speedup_note") else ""
    return (
        f"gain from distillation: {_fmt(figures['gain'], '{:+.2f} ' + unit, 'n/a (scratch=false)')}{significance}\n"
        f"compression: {_fmt(figures['compression'], '{:.1f}x')}   "
        f"retention: {_fmt(figures['retention'], '{:.1f}%')}\n"
        f"inference speed-up: {speed} (batch of {batch} on {figures['speed_device']}: {times}, "
        f"median of {figures.get('speed_rounds', '?')} runs in turns{note})"
    )


def generation_line(generation: dict[str, Any]) -> str:
    """A language model's generation speed (new tokens/s) per model, and the student's speed-up."""
    speeds = ", ".join(f"{role} {value:,.0f}" for role, value in generation["tokens_per_s"].items())
    return (f"generation: {speeds} new tokens/s (batch {generation['batch']}); speed-up "
            f"{_fmt(generation.get('speedup'), '{:.2f}x')}; samples in {generation['samples']}")
