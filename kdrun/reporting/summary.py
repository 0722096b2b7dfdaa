"""``summary.json`` and the headline table printed at the end of a run."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import kdrun


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


@torch.no_grad()
def seconds_per_batch(model: nn.Module, batch: torch.Tensor, budget_s: float = 0.25, max_iters: int = 50) -> float:
    """Median forward time of ``model`` on ``batch`` in eval mode, after a warm-up pass."""
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if batch.device.type == "cuda" else (lambda: None)
    model(batch)
    sync()
    times: list[float] = []
    spent = 0.0
    while len(times) < max_iters and (spent < budget_s or len(times) < 3):
        start = time.perf_counter()
        model(batch)
        sync()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    model.train(was_training)
    return sorted(times)[len(times) // 2]


def distillation_figures(summary: dict[str, Any], student: nn.Module, teacher: nn.Module | None, batch: torch.Tensor) -> dict[str, Any]:
    """Gain over scratch, compression, retention and inference speed-up of student over teacher."""
    student_entry, teacher_entry, scratch_entry = summary["student"], summary.get("teacher"), summary.get("scratch")
    figures: dict[str, Any] = {"gain": None, "compression": None, "retention": None, "speedup": None}
    if scratch_entry:
        figures["gain"] = student_entry["test_acc"] - scratch_entry["test_acc"]
    student_s = seconds_per_batch(student, batch)
    figures["student_samples_per_s"] = batch.shape[0] / student_s
    if teacher_entry and teacher is not None:
        figures["compression"] = teacher_entry["params"] / student_entry["params"]
        if teacher_entry["test_acc"] > 0:
            figures["retention"] = 100.0 * student_entry["test_acc"] / teacher_entry["test_acc"]
        teacher_s = seconds_per_batch(teacher, batch)
        figures["teacher_samples_per_s"] = batch.shape[0] / teacher_s
        figures["speedup"] = teacher_s / student_s
    figures["speed_device"] = str(batch.device)
    figures["speed_batch_size"] = batch.shape[0]
    return figures


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


def headline(summary: dict[str, Any]) -> str:
    """A short table of the run's outcome, for the terminal and the log."""
    student, teacher, scratch, figures = summary["student"], summary.get("teacher"), summary.get("scratch"), summary["figures"]
    rows = [("model", "arch", "params", "test acc %")]
    if teacher:
        rows.append(("teacher", teacher["arch"], f"{teacher['params']:,}", f"{teacher['test_acc']:.2f}"))
    # Multi-model strategies list every model they trained; the student is marked.
    strategy = summary.get("strategy")
    student_name = ("student (KD)" if teacher else "student") if strategy in (None, "offline") else f"student ({strategy})"
    models = {label: m for label, m in (summary.get("models") or {}).items()
              if label not in ("teacher", "scratch") and not (teacher and m.get("checkpoint") == teacher.get("path"))}
    for label, model in models.items():
        name = student_name if label == "student" else f"{label} <- student" if label == student.get("model") else label
        rows.append((name, model["arch"], f"{model['params']:,}", f"{model['test_acc']:.2f}"))
    if not models:
        rows.append((student_name, student["arch"], f"{student['params']:,}", f"{student['test_acc']:.2f}"))
    if scratch:
        rows.append(("student (scratch)", student["arch"], f"{student['params']:,}", f"{scratch['test_acc']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        f"gain from distillation: {_fmt(figures['gain'], '{:+.2f} points', 'n/a (scratch=false)')}   "
        f"compression: {_fmt(figures['compression'], '{:.1f}x')}   "
        f"retention: {_fmt(figures['retention'], '{:.1f}%')}   "
        f"inference speed-up: {_fmt(figures['speedup'], '{:.2f}x')} on {figures['speed_device']} "
        f"(batch {figures['speed_batch_size']})"
    )
    published = summary.get("published")
    if published:
        lines.append(
            f"published ({published.get('source', 'paper')}): teacher {_fmt(published.get('teacher_acc'), '{:.2f}')}, "
            f"student {_fmt(published.get('student_acc'), '{:.2f}')}, {_published_method(published)}"
        )
    return "\n".join(lines)
