"""Hostile inputs and faults (docs/reliability.md): every case a hostile tryout found, each one
line and exit status 2 (or a clean recovery), nothing on disk changed or lost."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import FAST, kdrun_cli, make_cfg, read_summary, sigterm_when_logged
from kdrun.provision import cache_key
from kdrun.run import run

ONE_EPOCH = [*FAST, "epochs=1", "teacher_training.epochs=2"]


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``kdrun: error:`` line of a refused command (and nothing that looks like a traceback)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("kdrun: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


class Touch:
    """Unpickling this creates a file: the marker that code from a run directory ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A completed run, made through the command line (so it has .hydra/)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = kdrun_cli(*ONE_EPOCH, "seed=41", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    return run_dir


def stopped_copy(finished: Path, tmp_path: Path) -> Path:
    """A copy of a finished run that says it was interrupted (what resume carries on)."""
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    summary = read_summary(copy)
    (copy / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    return copy


# 1. A run directory is data: resume never instantiates a target kdrun's configs do not define.

def test_resume_refuses_a_tampered_config_and_runs_none_of_its_code(finished_run, tmp_path):
    run_dir = stopped_copy(finished_run, tmp_path)
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as f:
        pickle.dump({"payload": Touch(str(marker))}, f)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["strategy"]["runner"] = {"_target_": "torch.load", "f": str(evil), "weights_only": False}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    before = snapshot(run_dir)
    line = error_line(kdrun_cli(f"resume={run_dir}", cwd=tmp_path))
    assert "strategy.runner._target_='torch.load'" in line and "does not run code" in line
    assert not marker.exists()
    assert snapshot(run_dir) == before  # not even .hydra/resumed_* was written


# 2. Ctrl-C while a cached model (the teacher) trains: the printed command carries on.

@pytest.mark.slow
def test_interrupt_while_the_teacher_trains_then_the_printed_resume_works(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*FAST, "seed=43", "epochs=1", "teacher_training.epochs=12", f"hydra.run.dir={run_dir}"]
    returncode, rest = sigterm_when_logged("teacher epoch 2/12", *overrides, cwd=tmp_path)
    assert returncode == 130, rest
    printed = next(line for line in rest.splitlines() if "carry on with: kdrun resume=" in line)
    command = printed.split("carry on with: kdrun ", 1)[1].split()
    assert "work/last.pt holds epoch" in printed  # the file that holds the teacher's progress, in the cache
    resumed = kdrun_cli(*command, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming teacher" in resumed.stderr
    assert read_summary(run_dir)["status"] == "completed"


# 4. A refused run changes nothing on disk, not even an earlier run's .hydra record.

@pytest.mark.slow
def test_a_refused_run_in_a_finished_runs_directory_changes_nothing(finished_run, tmp_path):
    before = snapshot(finished_run)
    line = error_line(kdrun_cli("alpha=0.1", "epochs=1", f"hydra.run.dir={finished_run}", cwd=tmp_path))
    assert "already holds a run" in line and f"resume={finished_run}" in line
    assert snapshot(finished_run) == before


# 5 and 6. Non-finite numbers and wrong types: one line naming the field, before anything is written.

@pytest.mark.parametrize("override, expected", [
    ("T=inf", "T=inf must be a finite number"),
    ("T=nan", "T=nan must be a finite number"),
    ("loss.ce.weight=nan", "loss.ce.weight=nan must be a finite number"),
    ("loss.kd.weight=inf", "loss.kd.weight=inf must be a finite number"),
    ("grad_clip=nan", "grad_clip=nan must be a finite number"),
    ("optim.lr=-1", "optim.lr=-1 must be >= 0"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1 must be >= 0"),
    ("dataset.num_workers=-1", "dataset.num_workers=-1 must be >= 0"),
    ("strategy=progressive strategy.chain=cnn", "strategy.chain='cnn' must be a list of model options"),
    ("strategy=online strategy.peers=small", "strategy.peers='small' must be a list of model options"),
    ("strategy=ensemble strategy.teachers=cnn", "strategy.teachers='cnn' must be a list of model options"),
    ("strategy=born_again strategy.generations=abc", "strategy.generations='abc' must be an integer"),
    ("alpah=0.5", "alpah is not a kdrun setting; did you mean alpha?"),
    ("+alpah=0.5", "alpah is not a kdrun setting; did you mean alpha?"),
    ("name=../../../x", "name='../../../x' must be a single directory name"),
    ("alpha=0.5 schedule.alpha.start=0.2", "schedule.alpha.start=0.2 conflicts with alpha=0.5"),
])
@pytest.mark.slow
def test_bad_values_are_one_line_before_anything_is_written(tmp_path, override, expected):
    cache = tmp_path / "cache"
    result = kdrun_cli(*override.split(), *ONE_EPOCH, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                       env={"KDRUN_CACHE_DIR": str(cache)})
    assert expected in error_line(result)
    assert not (tmp_path / "run").exists() and not cache.exists() and not (tmp_path / "outputs").exists()


# 7. A read-only cache: reading a cached model needs no write access; writing says where and what to do.

@contextmanager
def read_only(root: Path):
    """``root`` and everything in it read-only for this process: by permissions, or (as root, whom
    permissions do not stop) with the immutable attribute; skips the test where neither works."""
    paths = [root, *root.rglob("*")]
    if os.geteuid() != 0:
        for path in paths:
            path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            for path in paths:
                path.chmod(0o755 if path.is_dir() else 0o644)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "-R", "+i", str(root)], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: a read-only directory cannot be made here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(root)], check=True)


@pytest.mark.slow
def test_a_read_only_cache_serves_cached_models_and_names_itself_when_it_must_be_written(tmp_path):
    cache = tmp_path / "cache"
    env = {"KDRUN_CACHE_DIR": str(cache)}
    warm = kdrun_cli(*ONE_EPOCH, "seed=44", f"hydra.run.dir={tmp_path / 'warm'}", cwd=tmp_path, env=env)
    assert warm.returncode == 0, warm.stderr  # caches the data, the teacher and the scratch student
    with read_only(cache):
        reused = kdrun_cli(*ONE_EPOCH, "seed=44", f"hydra.run.dir={tmp_path / 'reuse'}", cwd=tmp_path, env=env)
        assert reused.returncode == 0, reused.stderr
        assert "reusing cached cnn" in reused.stderr and "reusing cached mlp_small" in reused.stderr
        refused = kdrun_cli(*ONE_EPOCH, "seed=45", f"hydra.run.dir={tmp_path / 'new'}", cwd=tmp_path, env=env)
        line = error_line(refused)
        assert f"cannot write to the model cache at {cache}/models/" in line and "paths.cache=" in line


# 8. An output directory that cannot be made: the path and the fix.

@pytest.mark.slow
def test_a_run_directory_under_a_file_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("x")
    line = error_line(kdrun_cli(*ONE_EPOCH, f"hydra.run.dir={tmp_path / 'a-file' / 'run'}", cwd=tmp_path))
    assert f"{tmp_path / 'a-file'} is a file, not a directory; choose another hydra.run.dir" in line


@pytest.mark.slow
def test_a_run_directory_in_a_read_only_folder_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        result = kdrun_cli(*ONE_EPOCH, f"hydra.run.dir={locked / 'run'}", cwd=tmp_path)
        assert f"{locked} is not writable; choose a writable hydra.run.dir" in error_line(result)


# 10. Corrupt caches: moved aside and rebuilt, with the path in the log.

@pytest.mark.slow
def test_a_truncated_cached_teacher_is_moved_aside_and_trained_again(tmp_path):
    first = run(make_cfg(*ONE_EPOCH, "seed=46"), tmp_path / "a")
    cached = Path(first["teacher"]["path"])
    cached.write_bytes(cached.read_bytes()[:100])
    again = run(make_cfg(*ONE_EPOCH, "seed=46"), tmp_path / "b")
    assert again["status"] == "completed" and again["teacher"]["source"] == "trained"
    assert again["teacher"]["test_acc"] == first["teacher"]["test_acc"]
    log = (tmp_path / "b" / "kdrun.log").read_text()
    assert "the cached cnn could not be read" in log and str(cached.parent) in log
    assert list(cached.parent.glob("model.pt.unreadable-*"))


def test_a_truncated_cached_mnist1d_file_is_generated_again(tmp_path):
    cache = tmp_path / "cache"
    cfg = make_cfg(*ONE_EPOCH, "scratch=false", "loss=ce", f"paths.cache={cache}")
    run(cfg, tmp_path / "a")
    (data_file,) = (cache / "data").glob("mnist1d_*.npz")
    data_file.write_bytes(data_file.read_bytes()[:200])
    summary = run(make_cfg(*ONE_EPOCH, "scratch=false", "loss=ce", f"paths.cache={cache}"), tmp_path / "b")
    assert summary["status"] == "completed"
    assert f"Cached MNIST-1D file {data_file} could not be read" in (tmp_path / "b" / "kdrun.log").read_text()
    with np.load(data_file) as arrays:
        assert arrays["x"].shape[0] > 0


# 12. The smaller ones.

@pytest.mark.slow
def test_resume_of_a_completed_run_or_a_typo_changes_nothing(finished_run, tmp_path):
    before = snapshot(finished_run)
    assert "that run completed; there is nothing to carry on" in error_line(kdrun_cli(f"resume={finished_run}", cwd=tmp_path))
    assert snapshot(finished_run) == before
    typo = tmp_path / "no-such-run"
    assert "there is no such directory" in error_line(kdrun_cli(f"resume={typo}", cwd=tmp_path))
    assert not typo.exists()


@pytest.mark.slow
def test_a_checkpoint_path_that_is_a_directory_says_so(tmp_path):
    line = error_line(kdrun_cli(*ONE_EPOCH, f"teacher.checkpoint={tmp_path}", cwd=tmp_path))
    assert f"teacher.checkpoint={tmp_path} is a directory; give the checkpoint file in it" in line


@pytest.mark.slow
def test_errors_found_inside_a_job_begin_with_kdrun_error_and_leave_no_directory(tmp_path):
    result = kdrun_cli(*ONE_EPOCH, "loss=fitnet", "loss.fitnet.student_taps=stage9", f"hydra.run.dir={tmp_path / 'run'}",
                       cwd=tmp_path)
    assert "student has no module 'stage9'" in error_line(result)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_checkpoint_of_another_model_names_both_models(finished_run, tmp_path):
    student = finished_run / "checkpoints" / "best.pt"
    line = error_line(kdrun_cli(*ONE_EPOCH, f"teacher.checkpoint={student}", cwd=tmp_path))
    assert "does not fit the configured model cnn: the file holds a mlp_small, not a cnn" in line
    assert "_Staged" not in line


def test_cache_keys_tell_streams_apart():
    cfg = make_cfg()
    keys = {stream: cache_key(cfg.student, cfg.dataset, 0, cfg.teacher_training, stream=stream) for stream in ("teacher", "student")}
    assert keys["teacher"] != keys["student"]
    assert torch.__version__  # (the key does not depend on the process)
