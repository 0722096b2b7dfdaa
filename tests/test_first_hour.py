"""What a new user meets in the first hour: what kdrun says is true, little noise, names that match."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import FAST, kdrun_cli, make_cfg
from kdrun.reporting.summary import MIN_TIMEABLE_S, speed_figures, two_significant
from kdrun.run import run
from kdrun.tasks import Batch, Classification


def run_in_terminal(*args: str, cwd: Path, timeout: float = 300, **env: str) -> str:
    """kdrun with its output on a pseudo-terminal, as in an interactive shell; returns what it printed."""
    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "kdrun", *args], cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                               env={**os.environ, "COLUMNS": "160", "LINES": "50", **env})
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    process.wait(timeout=30)
    os.close(master)
    assert process.returncode == 0
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_a_run_in_a_terminal_fits_on_one_screen(tmp_path):
    # An empty cache of its own: the teacher is trained here, whatever other tests cached before.
    printed = run_in_terminal(*FAST, "epochs=5", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                              KDRUN_CACHE_DIR=str(tmp_path / "cache"))
    # Progress bars redraw one line (\r); what stays on the screen is the newline-ended lines.
    lines = [line for line in re.sub(r"[^\n]*\r(?!\n)", "", printed).splitlines() if line.strip()]
    assert len(lines) <= 30, "\n".join(lines)
    assert not any(" epoch 3/5 " in line for line in lines)  # per-epoch lines stay in kdrun.log
    assert "student (distilled)" in printed and "gain from distillation" in printed
    log = (tmp_path / "run" / "kdrun.log").read_text()
    assert "student epoch 3/5" in log and "teacher epoch 4/4" in log
    verbose = run_in_terminal(*FAST, "epochs=5", "verbose=true", f"hydra.run.dir={tmp_path / 'verbose'}", cwd=tmp_path)
    assert "student epoch 3/5" in verbose


@pytest.mark.slow
def test_without_a_terminal_every_epoch_line_is_printed(tmp_path):
    result = kdrun_cli(*FAST, "epochs=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0
    assert "student epoch 1/2" in result.stderr and "student epoch 2/2" in result.stderr


def test_the_formula_shows_schedules_in_the_log_and_summary(tmp_path):
    summary = run(make_cfg(*FAST, "schedule.T.kind=linear", "schedule.T.start=10", "schedule.T.end=1",
                           "schedule.alpha.kind=linear", "schedule.alpha.start=0.5", "schedule.alpha.end=1"), tmp_path)
    formula = "L = (1-alpha)*CE + alpha*KD(T: linear 10->1); alpha: linear 0.5->1"
    assert summary["recipe"] == formula and formula in (tmp_path / "kdrun.log").read_text()


@pytest.mark.slow
def test_settings_that_do_nothing_are_named_once(tmp_path):
    result = kdrun_cli(*FAST, "epochs=1", "loss=dkd", "alpha=0.3", f"hydra.run.dir={tmp_path / 'dkd'}", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr.count("alpha=0.3 has no effect: the recipe (L = 1*CE + 1*DKD(a=1,b=8,T=4)) does not use it") == 1
    assert "alpha 0.3" not in result.stderr  # not logged per epoch either
    crd = kdrun_cli(*FAST, "epochs=1", "loss=crd", "scratch=false", f"hydra.run.dir={tmp_path / 'crd'}", cwd=tmp_path)
    assert crd.returncode == 0
    assert crd.stderr.count("loss.crd.nce_k=16384 is not below the 1440 samples the memory holds") == 1


def test_speed_up_is_timed_in_turns_and_flags_models_too_small_to_time():
    assert [two_significant(x) for x in (717.3, 27.13, 1.234, 12345)] == ["720", "27", "1.2", "12,000"]
    task = Classification()
    batch = Batch(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    tiny, big = torch.nn.Linear(3, 2), torch.nn.Sequential(torch.nn.Linear(3, 512), torch.nn.Linear(512, 2))
    figures = speed_figures(task, tiny, big, batch)
    assert figures["speed_rounds"] >= 15 and figures["speed_batch_size"] == 4
    assert figures["speedup"] == float(two_significant(figures["speedup"]))
    assert 1e6 * 4 / figures["student_samples_per_s"] < 1e6 * MIN_TIMEABLE_S
    assert "too small to time reliably" in figures["speedup_note"]


@pytest.mark.slow
def test_a_test_set_used_for_selection_is_named_so(tmp_path):
    summary = run(make_cfg(*FAST, "epochs=1", "dataset.val_fraction=0"), tmp_path)
    student = summary["student"]
    assert student["best_val_acc"] is None and student["best_test_acc"] is not None
    assert summary["selection"].startswith("test") and "selected on: test" in (tmp_path / "kdrun.log").read_text()


@pytest.mark.slow
def test_a_sweep_whose_jobs_meet_the_same_missing_dataset_stops_after_saying_it_once(tmp_path):
    result = kdrun_cli("-m", "dataset=cifar10", "seed=1,2,3", f"dataset.root={tmp_path / 'none'}", f"hydra.sweep.dir={tmp_path / 's'}",
                       cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "kdrun: error:" in line]
    assert len(errors) == 2 and "cifar-10-python.tar.gz" in errors[0] and "stopping the sweep" in errors[1]
    assert len([p for p in (tmp_path / "s").iterdir() if p.is_dir()]) == 2  # the third job never started


@pytest.mark.slow
def test_log_files_hold_no_terminal_colour_codes(tmp_path):
    sweep = tmp_path / "optuna"
    result = kdrun_cli("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *FAST, "epochs=1", "scratch=false",
                       f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for path in sweep.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".md", ".yaml", ".csv", ".jsonl"):
            assert "\x1b[" not in path.read_text(errors="replace"), path


def test_one_name_per_model_as_teacher_or_student(tmp_path):
    cfg = make_cfg("teacher=mlp_small", "student=mlp_tiny")
    assert (cfg.teacher.arch, cfg.student.arch) == ("mlp_small", "mlp_tiny")
    assert make_cfg("student=small").student.arch == "mlp_small"  # the quick-start alias
    summary = run(make_cfg(*FAST, "epochs=1", "teacher=mlp_small", "student=mlp_tiny", "teacher_training.epochs=1"), tmp_path)
    assert (summary["teacher"]["arch"], summary["student"]["arch"]) == ("mlp_small", "mlp_tiny")


@pytest.mark.slow
def test_every_model_option_is_named_by_its_arch():
    import importlib.resources

    for path in (Path(str(importlib.resources.files("kdrun.conf"))) / "model").glob("*.yaml"):
        cfg = make_cfg(f"student={path.stem}")
        if "defaults" in path.read_text():
            continue  # an alias (small, tiny)
        assert cfg.student.arch in (path.stem, cfg.student.get("name")), path.name


@pytest.mark.slow
def test_a_missing_dataset_says_where_to_get_it_and_where_to_put_it(tmp_path):
    result = kdrun_cli("dataset=mnist", f"dataset.root={tmp_path}/nowhere", cwd=tmp_path)
    assert result.returncode == 2
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in result.stderr and f"under {tmp_path}/nowhere" in result.stderr
