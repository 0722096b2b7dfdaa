"""Sweepers and launchers: Optuna search, joblib jobs in parallel, the SLURM config, GPUs per job."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from helpers import CONF_DIR, FAST, kdrun_cli, read_summary
from kdrun.config import auto_device, metric_value, optimize_metrics


@pytest.mark.parametrize(
    "cuda_count, job_num, expected",
    [
        (0, None, "cpu"), (0, 3, "cpu"),          # no GPU: the CPU, in a multirun too
        (1, None, "cuda"), (1, 5, "cuda"),        # one GPU: every job on it
        (4, None, "cuda"),                        # a single run: the default GPU
        (4, 0, "cuda:0"), (4, 3, "cuda:3"), (4, 6, "cuda:2"), (3, 7, "cuda:1"),
    ],
)
def test_auto_device_spreads_multirun_jobs_over_gpus(cuda_count, job_num, expected):
    assert auto_device(cuda_count, job_num) == expected


def test_metric_value_reads_dotted_paths():
    summary = {"student": {"test_acc": 71.5, "best_val_acc": 72}, "figures": {"gain": None}}
    assert metric_value(summary, "student.test_acc") == 71.5
    assert metric_value(summary, "student.best_val_acc") == 72.0
    assert metric_value(summary, "figures.gain") is None
    assert metric_value(summary, "scratch.test_acc") is None
    allowed = optimize_metrics("kdrun.tasks.Classification")
    assert {"student.test_acc", "student.best_val_acc", "figures.gain", "scratch.test_loss"} <= set(allowed)
    assert "student.best_val_ppl" in optimize_metrics("kdrun.tasks.language.CausalLM")


@pytest.mark.slow
def test_optuna_search_maximises_the_named_metric(tmp_path):
    sweep = tmp_path / "optuna"
    result = kdrun_cli(
        "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "optimize_metric=student.best_val_acc",
        *FAST, "epochs=1", "scratch=false", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    summaries = [read_summary(job) for job in jobs]
    assert all(s["status"] == "completed" for s in summaries)
    chosen = [yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) for job in jobs]
    for overrides in chosen:  # each trial got a T from the choice and an alpha from the interval
        values = dict(o.split("=", 1) for o in overrides)
        assert float(values["T"]) in (1, 2, 4, 8, 16) and 0.1 <= float(values["alpha"]) <= 1.0
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(s["student"]["best_val_acc"] for s in summaries)
    assert set(results["best_params"]) == {"T", "alpha"}
    assert (sweep / "summary.md").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [False, True])
def test_unknown_optimize_metric_is_one_line_and_exit_2_before_any_job(tmp_path, sweep):
    args = ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2"] if sweep else []
    result = kdrun_cli(*args, "optimize_metric=student.nope", *FAST, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "kdrun: error: optimize_metric=student.nope is not a known metric" in lines[0]
    assert "student.test_acc, student.test_loss, student.best_val_acc, figures.gain" in lines[0]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").glob("*/*/*/summary.json"))


LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def log_span(run_dir: Path) -> tuple[datetime, datetime]:
    """First and last timestamp of a job's kdrun.log."""
    stamps = [LOG_TIME.match(line) for line in (run_dir / "kdrun.log").read_text().splitlines()]
    times = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") for m in stamps if m]
    return times[0], times[-1]


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel(tmp_path):
    sweep = tmp_path / "joblib"
    result = kdrun_cli(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optim.lr=0.003,1e30", "seed=31,32", *FAST,
        "epochs=1", "optim=sgd", "teacher_training.epochs=3", "scratch=false", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )
    # lr=1e30 fails (non-finite loss) in a worker process; the exit status still says that a job failed.
    assert result.returncode == 1, result.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [read_summary(job)["status"] for job in jobs] == ["completed", "completed", "failed", "failed"]
    hydra_cfg = yaml.safe_load((jobs[0] / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert hydra_cfg["launcher"]["_target_"].endswith("JoblibLauncher")
    # Each of the first two jobs trains its own teacher (seeds differ) for seconds: run one after
    # the other, one job's log would end before the other's begins.
    (start_a, end_a), (start_b, end_b) = log_span(jobs[0]), log_span(jobs[1])
    assert start_a < end_b and start_b < end_a, ((start_a, end_a), (start_b, end_b))
    assert "4 jobs: 2 completed, 2 failed." in (sweep / "summary.md").read_text()  # written in the main process


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min > 0
    assert launcher.cpus_per_task >= 1 and launcher.mem_gb >= 1
    assert launcher.submitit_folder.startswith("outputs/sweeps/") and launcher.submitit_folder.endswith("/.submitit/%j")
    plugin = instantiate(launcher)  # the plugin takes every key (nothing is submitted)
    assert type(plugin).__name__ == "SlurmLauncher"
