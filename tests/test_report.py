"""Sweep reports (summary.csv, summary.md, plots), kdrun-report, failed jobs in a sweep, TensorBoard."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import FAST, kdrun_cli, make_cfg, read_metrics
from kdrun.reporting.report_cli import main as report_main
from kdrun.reporting.report_cli import write_report
from kdrun.reporting.sweep import collect
from kdrun.run import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def summary_json(status="completed", student=50.0, teacher=90.0, scratch=45.0, error=None, published=None):
    """A summary.json as kdrun writes it (the keys the report reads)."""
    done = status == "completed"
    return {
        "status": status, "error": error, "strategy": "offline", "recipe": "L = 0.1*CE + 0.9*KD(T=4)",
        "student": {"arch": "mlp_small", "params": 23050, "test_acc": student, "best_val_acc": student + 1} if done else None,
        "teacher": {"arch": "cnn", "params": 166250, "test_acc": teacher} if done else None,
        "scratch": {"test_acc": scratch} if done else None,
        "figures": {"gain": student - scratch} if done else None,
        "wall_time_s": 2.0, "seed": 0, "dataset": {"name": "mnist1d"}, **({"published": published} if published else {}),
    }


def make_job(sweep: Path, number: int, overrides: dict, summary: dict | None, val_curve=(), label="student") -> Path:
    """A job dir in the real on-disk layout: .hydra/overrides.yaml, summary.json, metrics.jsonl."""
    job = sweep / f"{number}_{','.join(f'{k}={v}' for k, v in overrides.items())}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"{k}={v}" for k, v in overrides.items()]))
    (job / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    rows = [{"epoch": e, "model": label, "split": "val", "acc": acc, "loss": 1.0} for e, acc in enumerate(val_curve, 1)]
    rows += [{"epoch": e, "model": label, "split": "train", "acc": 0.0, "loss": 1.0} for e in range(1, len(val_curve) + 1)]
    (job / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return job


@pytest.fixture
def grid_sweep(tmp_path) -> Path:
    """T x alpha x seed, 2x2x2, as a sweep leaves it: one job failed, one killed mid-run."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    accs = {(1, 0.5): (60.0, 62.0), (1, 0.9): (64.0, 66.0), (4, 0.5): (70.0, 74.0), (4, 0.9): (80.0, None)}
    number = 0
    for (T, alpha), per_seed in accs.items():
        for seed, acc in enumerate(per_seed):
            overrides = {"T": T, "alpha": alpha, "seed": seed, "epochs": 3}
            summary = summary_json(student=acc, scratch=50.0 + seed) if acc is not None else None
            if (T, alpha, seed) == (1, 0.9, 1):
                summary = summary_json(status="failed", error="student: loss became non-finite in epoch 2")
            make_job(sweep, number, overrides, summary, val_curve=[(acc or 30.0) - 20 + 10 * e for e in range(3)])
            number += 1
    return sweep


def test_sweep_report_tables_group_seeds_and_list_failures(grid_sweep):
    markdown = write_report(grid_sweep).read_text()
    jobs = collect(grid_sweep)
    assert [job.status for job in jobs] == ["completed"] * 3 + ["failed"] + ["completed"] * 3 + ["killed"]

    with (grid_sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert list(rows[0])[:4] == ["job", "T", "alpha", "seed"]  # epochs=3 is common to all, not swept
    assert rows[3]["status"] == "failed" and "non-finite" in rows[3]["error"]
    assert rows[7]["status"] == "killed" and rows[7]["student_acc"] == ""
    assert float(rows[4]["student_acc"]) == 70.0 and float(rows[4]["gain"]) == 20.0
    assert rows[0]["student_params"] == "23050" and float(rows[0]["teacher_acc"]) == 90.0

    # Mean ± sample std over the seeds that completed: (70, 74) -> 72 ± 2.83; gains (20, 23) -> +21.5 ± 2.12.
    assert "| 4 | 0.5 | 2/2 | 90.00 ± 0.00 | 72.00 ± 2.83 | 50.50 ± 0.71 | +21.50 ± 2.12 |" in markdown
    assert "| 1 | 0.9 | 1/2 | 90.00 | 64.00 |" in markdown
    assert "| 4 | 0.9 | 1/2 | 90.00 | 80.00 |" in markdown
    assert "Common overrides: `epochs=3`" in markdown
    assert "- job 3 (T=1, alpha=0.9, seed=1): failed: student: loss became non-finite in epoch 2" in markdown
    assert "- job 7 (T=4, alpha=0.9, seed=1): killed:" in markdown

    for name in ("accuracy_vs_T.png", "heatmap_T_alpha.png", "learning_curves.png"):
        assert (grid_sweep / name).read_bytes()[:8] == PNG_MAGIC, name


def test_plots_only_when_they_make_sense(tmp_path, caplog):
    sweep = tmp_path / "seeds"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    make_job(sweep, 0, {"seed": 0}, summary_json(student=60.0), val_curve=(40.0, 50.0), label="peer1")
    make_job(sweep, 1, {"seed": 1}, summary_json(student=62.0), val_curve=(41.0, 52.0), label="peer1")
    with caplog.at_level(logging.INFO):
        write_report(sweep)
    assert "accuracy-vs-T plot skipped" in caplog.text and "heatmap skipped" in caplog.text
    assert sorted(p.name for p in sweep.glob("*.png")) == ["learning_curves.png"]  # other model labels are drawn too
    markdown = (sweep / "summary.md").read_text()
    assert "| 2/2 | 90.00 ± 0.00 | 61.00 ± 1.41 |" in markdown


def test_published_number_is_a_column(tmp_path):
    sweep = tmp_path / "paper"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    published = {"source": "CRD (Tian et al., 2020)", "method_acc": 73.33}
    for number, T in enumerate((2, 4)):
        make_job(sweep, number, {"T": T}, summary_json(student=70.0 + T, published=published))
    write_report(sweep, plots=False)
    assert "published %" in (sweep / "summary.md").read_text()
    with (sweep / "summary.csv").open() as f:
        assert [row["published_method_acc"] for row in csv.DictReader(f)] == ["73.33", "73.33"]
    assert not list(sweep.glob("*.png"))


def test_report_cli_compares_runs_side_by_side(tmp_path, capsys):
    first = make_job(tmp_path, 0, {"T": 2}, summary_json(student=71.25))
    second = make_job(tmp_path, 1, {"T": 8}, summary_json(status="failed", error="alpha=1.5 is outside [0, 1]"))
    out = tmp_path / "tables" / "compare.md"
    assert report_main([str(first), str(second), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = out.read_text()
    assert table in printed
    lines = table.splitlines()
    assert lines[0] == "|  | run 1 | run 2 |"
    assert f"- run 1: {first.name} (`{first}`)" in lines and f"- run 2: {second.name} (`{second}`)" in lines
    assert "| status | completed | failed |" in lines
    assert "| dataset | mnist1d | mnist1d |" in lines and "| seed | 0 | 0 |" in lines
    assert "| student test acc % | 71.25 | - |" in lines
    assert "| gain (points) | +26.25 | - |" in lines
    assert "| error | - | alpha=1.5 is outside [0, 1] |" in lines


def test_report_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    plain = tmp_path / "plain"
    make_job(plain, 0, {"T": 2}, summary_json())
    (plain / "0_T=2" / ".hydra" / "hydra.yaml").unlink()  # runs side by side in a folder, not a sweep
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "nowhere")], "no such directory"),
        ([str(tmp_path / "empty")], "no kdrun runs in"),
        ([str(plain)], "is not a sweep dir"),
        ([], "the following arguments are required: DIR"),
    ]
    for argv, expected in cases:
        if argv:
            assert report_main(argv) == 2
        else:
            with pytest.raises(SystemExit) as exit_:
                report_main(argv)
            assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kdrun-report: error:") and expected in err[0], (argv, err)
    assert not (plain / "summary.md").exists()


def test_report_command_is_installed_and_helps():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("kdrun-report") == "kdrun.reporting.report_cli:main"
    result = subprocess.run([sys.executable, "-m", "kdrun.reporting.report_cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "sweep dir" in result.stdout and "--out" in result.stdout and "examples:" in result.stdout


@pytest.mark.slow
def test_a_sweep_with_bad_input_is_refused_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = kdrun_cli("-m", "alpha=1.5,0.5", "T=4,inf", *FAST, "epochs=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("kdrun: error: alpha=1.5 is outside [0, 1]") and "(jobs 0, 1 of 4)" in line
    assert "T=inf must be a finite number (job 3 of 4)" in line  # job 1 has alpha=1.5 too; its first error counts
    assert not sweep.exists()  # nothing written


@pytest.mark.slow
def test_a_sweep_whose_jobs_share_one_bad_value_prints_it_once(tmp_path):
    result = kdrun_cli("-m", "seed=1,2,3", "optim.lr=-1", *FAST, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "kdrun: error: optim.lr=-1 must be >= 0 (the learning rate)"
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_failed_jobs_do_not_stop_the_sweep_and_the_report_lists_them(tmp_path):
    # lr=1e30 makes the loss non-finite (TrainingError, in two jobs); the others are fine.
    sweep = tmp_path / "sweep"
    result = kdrun_cli(
        "-m", "alpha=0.9,0.5", "optim.lr=1e30,0.01", "optim=sgd", *FAST, "loss=ce", "epochs=1", "scratch=false",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr  # a failed job's exit status
    jobs = collect(sweep)
    assert [job.status for job in jobs] == ["failed", "completed", "failed", "completed"]
    assert "non-finite" in jobs[0].error and "non-finite" in jobs[2].error
    assert [job.name[:4] for job in jobs] == ["000_", "001_", "002_", "003_"]
    assert "alpha-0.9" in jobs[0].name and "optim.lr-1e-30" not in jobs[0].name and "=" not in jobs[0].name
    markdown = (sweep / "summary.md").read_text()  # written by the end-of-multirun callback
    assert "4 jobs: 2 completed, 2 failed." in markdown
    assert "- job 2 (alpha=0.5, optim.lr=1e+30): failed: student: loss became non-finite" in markdown
    assert f"Sweep table: {sweep / 'summary.md'}" in result.stdout + result.stderr
    assert (sweep / "learning_curves.png").read_bytes()[:8] == PNG_MAGIC

    # A job killed before it wrote its final summary: kdrun-report rebuilds the report from disk.
    summary_file = jobs[3].path / "summary.json"
    summary_file.write_text(json.dumps({**json.loads(summary_file.read_text()), "status": "running"}))
    rebuilt = subprocess.run([sys.executable, "-m", "kdrun.reporting.report_cli", str(sweep), "--no-plots"],
                             capture_output=True, text=True)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "4 jobs: 1 completed, 2 failed, 1 killed." in rebuilt.stdout
    with (sweep / "summary.csv").open() as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["failed", "completed", "failed", "killed"]


def test_tensorboard_logger_mirrors_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(make_cfg(*FAST, "epochs=2", "scratch=false", "logger=tensorboard"), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    expected = {}
    for row in read_metrics(tmp_path):
        for key, value in row.items():
            if key not in ("epoch", "model", "split") and isinstance(value, (int, float)):
                expected.setdefault(f"{row['model']}/{row['split']}/{key}", {})[row["epoch"]] = value
    assert {"student/val/acc", "student/train/loss", "student/train/loss/kd", "teacher/test/acc"} <= set(expected)
    assert set(scalars) == set(expected)
    for tag, points in expected.items():
        assert scalars[tag] == pytest.approx(points, rel=1e-6), tag


def test_paired_test_counts_the_items_only_one_model_gets_right():
    import torch
    from torch import nn

    from kdrun.reporting.summary import paired_test, significance_text
    from kdrun.tasks import Classification

    class Fixed(nn.Module):  # predicts class 1 on the first `right` items, class 0 elsewhere
        def __init__(self, right):
            super().__init__()
            self.right = right

        def forward(self, x):
            hit = (x[:, 0] < self.right).long()
            return nn.functional.one_hot(hit, 2).float()

    items = torch.arange(40.0).unsqueeze(1)
    labels = torch.ones(40, dtype=torch.long)
    loader = [(items[:20], labels[:20]), (items[20:], labels[20:])]
    task = Classification()
    test = paired_test(task, Fixed(30), Fixed(18), loader, torch.device("cpu"))
    assert (test["student_only"], test["scratch_only"], test["items"]) == (12, 0, 40)
    assert test["p_value"] == pytest.approx(2 * 0.5**12)  # exact two-sided binomial, 12 of 12
    assert "McNemar p < 0.001 on 40 test items: beyond" in significance_text(test, 0)
    even = paired_test(task, Fixed(18), Fixed(18), loader, torch.device("cpu"))
    assert even["p_value"] == 1.0 and "within" in significance_text(even, 0)
