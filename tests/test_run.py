"""End-to-end runs through ``run(cfg)`` on the embedded data (no shell)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from helpers import DEFAULT_JOB_FAST, FAST, make_cfg, read_metrics, read_summary
from kdrun.engine import checkpoint
from kdrun.errors import ConfigError, TrainingError
from kdrun.losses import StepOutputs, Term
from kdrun.run import run

SUMMARY_KEYS = {"status", "strategy", "student", "teacher", "scratch", "wall_time_s", "versions", "error", "figures", "recipe"}



def test_default_job_writes_the_run_directory_contract(tmp_path):
    summary = run(make_cfg(*DEFAULT_JOB_FAST), tmp_path)
    assert summary == read_summary(tmp_path)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "completed" and summary["error"] is None
    assert summary["strategy"] == "offline"
    assert set(summary["student"]) >= {"arch", "params", "test_acc", "best_val_acc"}
    assert set(summary["teacher"]) >= {"arch", "params", "test_acc"}
    assert set(summary["scratch"]) >= {"test_acc"}
    assert set(summary["versions"]) >= {"kdrun", "torch", "git_sha"}
    for section in ("student", "teacher", "scratch"):
        assert 0.0 <= summary[section]["test_acc"] <= 100.0
    assert summary["teacher"]["test_acc"] > 30.0  # well above chance (10%) after two epochs
    figures = summary["figures"]
    assert figures["compression"] == pytest.approx(summary["teacher"]["params"] / summary["student"]["params"])
    assert figures["gain"] == pytest.approx(summary["student"]["test_acc"] - summary["scratch"]["test_acc"])
    assert figures["speedup"] > 0
    test = figures["gain_test"]  # McNemar on the test items only one of student and scratch gets right
    assert test["items"] > 0
    gained = (test["student_only"] - test["scratch_only"]) * 100 / test["items"]
    assert gained == pytest.approx(figures["gain"], abs=1e-6) and 0 <= test["p_value"] <= 1
    for name in ("config_resolved.yaml", "kdrun.log", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (tmp_path / name).is_file(), name
    assert "L = 0.1*CE + 0.9*KD(T=4) + 100*FitNet(last_stage->last_stage)" in (tmp_path / "kdrun.log").read_text()
    assert summary["recipe_weights"] == {"ce": pytest.approx(0.1), "kd": pytest.approx(0.9), "fitnet": 100}
    assert set(summary["loss_parts"]) == {"loss/ce", "loss/kd", "loss/fitnet"}

    rows = read_metrics(tmp_path)
    train_rows = [r for r in rows if r["model"] == "student" and r["split"] == "train"]
    assert [r["epoch"] for r in train_rows] == [1, 2]
    assert {"acc", "loss", "loss/ce", "loss/kd", "loss/fitnet", "lr"} <= set(train_rows[0])
    assert {(r["model"], r["split"]) for r in rows} >= {("student", "val"), ("student", "test"), ("teacher", "test"), ("scratch", "test")}

    last = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert last["epoch"] == 2 and {"distiller", "optimizer", "scheduler", "rng", "config"} <= set(last)
    assert {key.split(".")[0] for key in last["distiller"]} == {"student", "recipe"}  # the FitNet regressor; no teacher
    assert any(key.startswith("recipe.terms.fitnet.regressor") for key in last["distiller"])
    best = checkpoint.load(tmp_path / "checkpoints" / "best.pt")
    assert best["val_acc"] == summary["student"]["best_val_acc"]
    assert set(best) >= {"model", "arch"} and "recipe" not in best  # the exported student has no adapters


def test_teacher_is_cached_and_reused_and_same_seed_gives_same_metrics(tmp_path):
    first = run(make_cfg(*FAST, "seed=5"), tmp_path / "a")
    second = run(make_cfg(*FAST, "seed=5"), tmp_path / "b")
    assert first["teacher"]["source"] == "trained" and second["teacher"]["source"] == "cache"
    assert second["scratch"]["source"] == "cache"
    assert "reusing cached cnn" in (tmp_path / "b" / "kdrun.log").read_text()

    def strip_time(rows):
        return [{k: v for k, v in r.items() if k not in ("time_s", "source")} for r in rows]

    assert strip_time(read_metrics(tmp_path / "a")) == strip_time(read_metrics(tmp_path / "b"))
    assert first["student"]["test_acc"] == second["student"]["test_acc"]


@pytest.mark.slow
def test_teacher_checkpoint_is_loaded_instead_of_trained(tmp_path):
    trained = run(make_cfg(*FAST, "seed=7"), tmp_path / "a")
    given = run(make_cfg(*FAST, "seed=7", f"teacher.checkpoint={trained['teacher']['path']}"), tmp_path / "b")
    assert given["teacher"]["source"] == "checkpoint"
    assert given["teacher"]["test_acc"] == pytest.approx(trained["teacher"]["test_acc"])


@pytest.mark.slow
def test_experiment_prints_published_numbers_beside_ours(tmp_path):
    cfg = make_cfg("experiment=crd_resnet32x4_resnet8x4", "dataset=fake", "epochs=1", "dataset.source.num_train=64", "dataset.source.num_test=32")
    with open_dict(cfg):
        cfg.choices = {"loss": "kd"}  # what the kdrun command adds from Hydra's group choices
    summary = run(cfg, tmp_path)
    assert summary["published"]["method_acc"] == 73.33
    assert "published (Tian et al." in (tmp_path / "kdrun.log").read_text()


@pytest.mark.slow
def test_digits_and_tiny_student(tmp_path):
    summary = run(make_cfg("dataset=digits", "student=tiny", "epochs=3", "teacher_training.epochs=3"), tmp_path)
    assert summary["status"] == "completed"
    assert summary["dataset"]["input_shape"] == [1, 8, 8]
    assert summary["teacher"]["test_acc"] > 50.0


@pytest.mark.slow
def test_cifar_resnets_on_fake_images(tmp_path):
    cfg = make_cfg("dataset=fake", "teacher=resnet32x4", "student=resnet8x4", "epochs=1", "dataset.source.num_train=64", "dataset.source.num_test=32")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["scratch"] is None  # scratch=auto: off off embedded data
    assert summary["teacher"]["params"] == 7_433_860 - 90 * 257  # resnet32x4 with 10 classes
    assert summary["student"]["params"] < summary["teacher"]["params"]


def test_non_finite_loss_fails_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match="non-finite"):
        run(make_cfg(*FAST, "loss=ce", "optim=sgd", "optim.lr=1e30"), tmp_path)
    summary = read_summary(tmp_path)
    assert summary["status"] == "failed" and "non-finite" in summary["error"]
    last = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["distiller"].values())


class ReadsAStage(Term):
    """A term that taps a module path; used to check that bad paths fail before training."""

    symbol = "PROBE"
    needs_teacher = False

    def __init__(self, path: str):
        super().__init__()
        self.student_taps = (path,)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return outputs.student_features[self.student_taps[0]].pow(2).mean()


def test_tap_that_does_not_exist_is_an_error_before_training(tmp_path):
    cfg = make_cfg(*FAST, "loss=ce", f"+loss.probe={{weight: 1.0, _target_: {__name__}.ReadsAStage, path: stage9}}")
    with pytest.raises(ConfigError, match="student has no module 'stage9'.*stage1"):
        run(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_a_term_reading_a_real_tap_trains(tmp_path):
    cfg = make_cfg(*FAST, "loss=ce", f"+loss.probe={{weight: 0.01, _target_: {__name__}.ReadsAStage, path: stage1}}")
    summary = run(cfg, tmp_path)
    assert summary["recipe"] == "L = 1*CE + 0.01*PROBE"
    assert "loss/probe" in read_metrics(tmp_path)[0]


def test_existing_run_dir_is_not_overwritten(tmp_path):
    run(make_cfg(*FAST), tmp_path)
    before = (tmp_path / "summary.json").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        run(make_cfg(*FAST, "T=2"), tmp_path)
    assert (tmp_path / "summary.json").read_text() == before
