"""The real ``kdrun`` command line: help, errors and exit codes, interrupt and resume, sweeps."""

from __future__ import annotations


import pytest
import torch

from helpers import sigterm_when_logged, FAST, kdrun_cli, make_cfg, read_metrics, read_summary
from kdrun.run import run


def test_help_lists_groups_and_options(tmp_path):
    result = kdrun_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for line in ("dataset: cifar10, cifar100, digits, fake", "sched: cosine, multistep, none"):
        assert line in result.stdout
    strategy_line = next(line for line in result.stdout.splitlines() if line.startswith("strategy: "))
    assert {"offline", "online", "born_again", "progressive", "self", "ensemble", "unlabeled"} <= set(strategy_line[10:].split(", "))
    loss_line = next(line for line in result.stdout.splitlines() if line.startswith("loss: "))
    assert {"ce", "kd", "dkd", "fitnet", "crd", "rkd", "hidden_cosine"} <= set(loss_line[6:].split(", "))
    assert "student: " in result.stdout and "small" in result.stdout and "resnet8x4" in result.stdout


@pytest.mark.slow
def test_cfg_job_prints_the_composed_config(tmp_path):
    result = kdrun_cli("--cfg", "job", "T=2", "student=tiny", cwd=tmp_path)
    assert result.returncode == 0
    assert "T: 2" in result.stdout and "arch: mlp_tiny" in result.stdout and "alpha: 0.9" in result.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.fixture(scope="module")
def corrupt_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "teacher.pt"
    path.write_bytes(b"\x00garbage")
    return path


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["alpha=1.5"], "alpha=1.5 is outside [0, 1]"),
        (["T=0"], "T=0 must be > 0"),
        (["epochs=0"], "epochs=0 must be >= 1"),
        (["student=nope"], "available options for 'student': bert_student, bert_tiny, cnn,"),
        (["nosuchkey=1"], "nosuchkey"),
        (["teacher.checkpoint=/does/not/exist.pt"], "teacher.checkpoint=/does/not/exist.pt does not exist"),
        (["teacher.checkpoint=CORRUPT"], "is corrupt or not a PyTorch checkpoint"),
        (["dataset=cifar10"], "cifar10 not found"),
        (["dataset=cifar10", "dataset.download=true"], "cifar10"),
        (["device=cuda:7"] if not torch.cuda.is_available() else ["device=cuda:99"], "device=cuda"),
        (["dataset.val_fraction=1.5"], "dataset.val_fraction=1.5 must be in [0, 1)"),
    ],
)
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tmp_path, overrides, expected, corrupt_checkpoint):
    overrides = [o.replace("CORRUPT", str(corrupt_checkpoint)) for o in overrides]
    result = kdrun_cli(*overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "kdrun: error:" in lines[0] and expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
def test_missing_dataset_error_names_the_path(tmp_path):
    result = kdrun_cli("dataset=mnist", f"dataset.root={tmp_path}/nowhere", cwd=tmp_path)
    assert result.returncode == 2
    assert f"{tmp_path}/nowhere" in result.stderr and "dataset.download=true" in result.stderr


@pytest.mark.slow
def test_interrupt_then_resume_matches_an_uninterrupted_run(tmp_path):
    overrides = [*FAST, "epochs=30", "seed=11"]
    reference = run(make_cfg(*overrides), tmp_path / "reference")  # also caches the teacher

    run_dir = tmp_path / "interrupted"
    returncode, rest = sigterm_when_logged("student epoch 3/30", *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert returncode == 130, rest
    assert f"kdrun resume={run_dir}" in rest
    stopped = read_summary(run_dir)
    assert stopped["status"] == "interrupted"
    epochs_done = max(r["epoch"] for r in read_metrics(run_dir) if r["model"] == "student")
    assert 3 <= epochs_done < 30

    resumed = kdrun_cli(f"resume={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming student" in resumed.stderr
    final = read_summary(run_dir)
    assert final["status"] == "completed"
    assert final["student"]["test_acc"] == reference["student"]["test_acc"]
    assert final["student"]["best_val_acc"] == reference["student"]["best_val_acc"]

    def student_curve(rows):
        return [(r["epoch"], r["split"], r["acc"], r["loss"]) for r in rows if r["model"] == "student"]

    assert student_curve(read_metrics(run_dir)) == student_curve(read_metrics(tmp_path / "reference"))
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()  # the original Hydra record is kept


@pytest.mark.slow
def test_resume_refuses_other_overrides(tmp_path):
    run_dir = tmp_path / "r"
    run(make_cfg(*FAST), run_dir)
    result = kdrun_cli(f"resume={run_dir}", "T=8", cwd=tmp_path)
    assert result.returncode == 2 and "drop the other overrides (T=8)" in result.stderr


@pytest.mark.slow
def test_sweep_makes_four_complete_jobs_and_trains_the_teacher_once(tmp_path):
    result = kdrun_cli("-m", "T=1,4", "alpha=0.5,0.9", *FAST, "seed=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = sorted(p for p in (tmp_path / "outputs" / "sweeps").glob("*/*") if p.is_dir())
    assert len(jobs) == 4
    sources = []
    for job in jobs:
        summary = read_summary(job)
        assert summary["status"] == "completed"
        for name in ("config_resolved.yaml", "kdrun.log", "metrics.jsonl", "checkpoints/last.pt", "checkpoints/best.pt", ".hydra/overrides.yaml"):
            assert (job / name).is_file(), (job, name)
        sources.append(summary["teacher"]["source"])
    assert sources.count("trained") == 1 and sources.count("cache") == 3
    for pair in ("T-1_alpha-0.5", "T-1_alpha-0.9", "T-4_alpha-0.5", "T-4_alpha-0.9"):
        assert sum(pair in job.name for job in jobs) == 1, pair
    assert [job.name[:4] for job in jobs] == ["000_", "001_", "002_", "003_"]
    # A job's directory resumes as printed (no quoting): it is complete, so the answer is that.
    resumed = kdrun_cli(f"resume={jobs[1]}", cwd=tmp_path)
    assert resumed.returncode == 2 and "that run completed; there is nothing to carry on" in resumed.stderr


@pytest.mark.slow
def test_sigterm_stops_a_whole_sweep_not_just_one_job(tmp_path):
    returncode, rest = sigterm_when_logged("student epoch 2/30", "-m", "seed=21,22,23", *FAST, "epochs=30", cwd=tmp_path)
    assert returncode == 130, rest
    jobs = sorted(p for p in (tmp_path / "outputs" / "sweeps").glob("*/*") if p.is_dir())
    assert len(jobs) == 1 and read_summary(jobs[0])["status"] == "interrupted"
    # The job carries on with the command it printed, as printed (its directory name needs no quoting).
    printed = next(line for line in rest.splitlines() if "carry on with: kdrun resume=" in line)
    assert printed.endswith(f"kdrun resume={jobs[0].resolve()}") or printed.endswith(f"kdrun resume={jobs[0]}")
    resumed = kdrun_cli(printed.split("carry on with: kdrun ", 1)[1], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert read_summary(jobs[0])["status"] == "completed"
