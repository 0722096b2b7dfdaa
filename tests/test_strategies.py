"""Every strategy end to end on the embedded data: outcome files, summary keys, models map."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import sigterm_when_logged, FAST, kdrun_cli, make_cfg, read_metrics, read_summary
from kdrun.engine import checkpoint
from kdrun.errors import ConfigError
from kdrun.models.weights import load_weights
from kdrun.models.ensemble import Ensemble, average_probs_logits
from kdrun.run import run

STUDENT_KEYS = {"arch", "params", "test_acc", "best_val_acc"}
ENTRY_KEYS = {"role", "arch", "params", "test_acc", "best_val_acc", "source", "checkpoint"}


def check_common(summary: dict, run_dir: Path, strategy: str) -> dict:
    assert summary["status"] == "completed", summary.get("error")
    assert summary["strategy"] == strategy
    assert STUDENT_KEYS <= set(summary["student"])
    assert summary["student"]["model"] in summary["models"]
    for label, model in summary["models"].items():
        assert ENTRY_KEYS <= set(model), label
        assert 0.0 <= model["test_acc"] <= 100.0
        if model["checkpoint"]:
            assert Path(model["checkpoint"]).is_file(), (label, model["checkpoint"])
    for name in ("summary.json", "metrics.jsonl", "config_resolved.yaml", "config.yaml", "kdrun.log", "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name
    # The exported student loads into a fresh model of the student's architecture.
    best = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    assert not any(key.startswith(("heads.", "members.")) for key in checkpoint.model_state(best))
    return summary


def val_models(run_dir: Path) -> set[str]:
    return {r["model"] for r in read_metrics(run_dir) if r["split"] == "val"}


def test_online_mutual_learning_reports_each_peer_and_their_ensemble(tmp_path):
    summary = check_common(run(make_cfg(*FAST, "strategy=online", "strategy.peers=3"), tmp_path), tmp_path, "online")
    assert set(summary["models"]) == {"peer1", "peer2", "peer3", "ensemble", "scratch"}
    assert summary["teacher"] is None
    assert summary["ensemble"]["members"] == ["peer1", "peer2", "peer3"]
    assert {"peer1", "peer2", "peer3", "peers"} <= val_models(tmp_path)
    peers = [summary["models"][f"peer{i}"] for i in (1, 2, 3)]
    assert len({p["test_acc"] for p in peers} | {summary["models"]["ensemble"]["test_acc"]}) > 1  # not one model thrice
    assert summary["student"]["best_val_acc"] == max(p["best_val_acc"] for p in peers)
    assert all(acc > 20 for acc in (p["test_acc"] for p in peers))  # chance is 10%
    assert (tmp_path / "checkpoints" / "peers" / "last.pt").is_file()


@pytest.mark.slow
def test_online_peers_of_different_archs_from_the_command_line(tmp_path):
    result = kdrun_cli("strategy=online", "strategy.peers=[mlp_small,cnn_small]", *FAST, "epochs=1", "scratch=false",
                       f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = read_summary(tmp_path / "run")
    assert [summary["models"][p]["arch"] for p in ("peer1", "peer2")] == ["mlp_small", "cnn_small"]
    assert "2 peers epoch 1/1" in result.stderr


@pytest.mark.slow
def test_an_unknown_peer_option_is_one_line_exit_2(tmp_path):
    result = kdrun_cli("strategy=online", "strategy.peers=[small,bogus]", *FAST, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and error[0].startswith("kdrun: error:") and "strategy.peers[1]=bogus: no model option 'bogus'; available:" in error[0]
    assert "Traceback" not in result.stderr


def test_online_refuses_feature_recipes(tmp_path):
    with pytest.raises(ConfigError, match="strategy=online works with logit-based recipes"):
        run(make_cfg(*FAST, "strategy=online", "loss=fitnet"), tmp_path)


def test_born_again_generations_and_their_ensemble(tmp_path):
    summary = run(make_cfg(*FAST, "strategy=born_again", "strategy.generations=2"), tmp_path)
    check_common(summary, tmp_path, "born_again")
    assert set(summary["models"]) == {"gen0", "gen1", "gen2", "ensemble", "scratch"}
    assert [g["generation"] for g in summary["generations"]] == [0, 1, 2]
    # gen0 is the student trained on labels: the same cached model as the scratch baseline.
    assert summary["models"]["gen0"]["checkpoint"] == summary["models"]["scratch"]["checkpoint"]
    assert summary["teacher"]["arch"] == summary["student"]["arch"] == "mlp_small"
    for k in (1, 2):
        assert (tmp_path / "checkpoints" / f"gen{k}" / "final.pt").is_file()
    assert summary["student"]["model"] in ("gen1", "gen2")
    assert "generation 2/2 epoch 2/2" in (tmp_path / "kdrun.log").read_text()


def test_born_again_can_stop_when_a_generation_does_not_improve(tmp_path):
    # With a zero learning rate generation 1 stays at its random start, below generation 0.
    summary = run(make_cfg(*FAST, "strategy=born_again", "strategy.generations=3", "strategy.stop_when_no_gain=true",
                           "optim.lr=0", "scratch=false"), tmp_path)
    assert [g["generation"] for g in summary["generations"]] == [0, 1]
    assert "ensemble" not in summary["models"]
    assert "did not improve its validation acc" in (tmp_path / "kdrun.log").read_text()


@pytest.mark.slow
def test_progressive_chain_with_a_per_stage_T_schedule(tmp_path):
    summary = run(make_cfg(*FAST, "strategy=progressive", "strategy.chain=[cnn_small,tiny]", "schedule.T.per=stage",
                           "schedule.T.kind=linear", "schedule.T.start=8", "schedule.T.end=2"), tmp_path)
    check_common(summary, tmp_path, "progressive")
    assert [s["arch"] for s in summary["chain"]] == ["cnn", "cnn_small", "mlp_tiny", "mlp_small"]
    assert list(summary["models"]) == ["teacher", "ta1", "ta2", "student", "scratch"]
    rows = read_metrics(tmp_path)
    T_per_stage = {label: {r["T"] for r in rows if r["model"] == label and r["split"] == "train"} for label in ("ta1", "ta2", "student")}
    assert T_per_stage == {"ta1": {8.0}, "ta2": {5.0}, "student": {2.0}}
    assert "stage 2/3 (ta2: mlp_tiny <- cnn_small)" in (tmp_path / "kdrun.log").read_text()


def test_self_distillation_reports_every_head_and_exports_the_plain_student(tmp_path):
    summary = run(make_cfg(*FAST, "strategy=self", "student=cnn_small", "student.channels=[8,16,32]"), tmp_path)
    check_common(summary, tmp_path, "self")
    assert set(summary["heads"]) == {"head1", "head2"}
    assert [summary["heads"][h]["tap"] for h in ("head1", "head2")] == ["stage1", "stage2"]
    assert {"head1", "head2", "student"} <= val_models(tmp_path)
    parts = [r for r in read_metrics(tmp_path) if r["model"] == "student" and r["split"] == "train"][-1]
    assert {"loss/deepest_ce", "loss/ce", "loss/kd", "loss/feature"} <= set(parts)
    from kdrun.models.presets import cnn

    plain = cnn(10, (1, 40), channels=(8, 16, 32), kernel_size=5)
    load_weights(plain, tmp_path / "checkpoints" / "best.pt", "exported student")
    assert summary["models"]["head1"]["params"] < summary["models"]["head2"]["params"]


def test_self_distillation_needs_intermediate_stages(tmp_path):
    with pytest.raises(ConfigError, match="strategy=self needs intermediate stages"):
        run(make_cfg(*FAST, "strategy=self", "student=tiny"), tmp_path)


@pytest.mark.slow
def test_ensemble_of_teachers(tmp_path):
    summary = run(make_cfg(*FAST, "strategy=ensemble", "strategy.teachers=[cnn,cnn]", "strategy.weights=[3,1]"), tmp_path)
    check_common(summary, tmp_path, "ensemble")
    assert set(summary["models"]) == {"teacher1", "teacher2", "teacher_ensemble", "student", "scratch"}
    members = summary["teacher"]["members"]
    assert members[0]["test_acc"] != members[1]["test_acc"]  # same arch, different seeds
    assert summary["teacher"]["weights"] == pytest.approx([0.75, 0.25])
    # Member 1 is the teacher offline KD uses with this seed: both come from one cache entry.
    offline = run(make_cfg(*FAST), tmp_path / "offline")
    assert offline["teacher"]["path"] == members[0]["checkpoint"]


def test_ensemble_targets_are_the_mean_of_softened_outputs():
    logits = [torch.randn(5, 7) for _ in range(3)]
    weights = torch.tensor([0.5, 0.3, 0.2])
    for T in (1.0, 4.0):
        z = average_probs_logits(logits, weights, T)
        expected = sum(w * torch.softmax(l / T, dim=1) for w, l in zip(weights, logits))
        assert torch.allclose(torch.softmax(z / T, dim=1), expected, atol=1e-6)
    members = [torch.nn.Linear(4, 3) for _ in range(2)]
    ensemble = Ensemble(members, T=2.0)
    x = torch.randn(6, 4)
    assert torch.allclose(ensemble(x), average_probs_logits([m(x) for m in members], torch.tensor([0.5, 0.5]), 2.0))


@pytest.mark.slow
def test_unlabeled_data_teacher_and_baseline_see_the_labelled_share_only(tmp_path):
    summary = run(make_cfg(*FAST, "strategy=unlabeled", "strategy.labeled_fraction=0.25"), tmp_path)
    check_common(summary, tmp_path, "unlabeled")
    info = summary["unlabeled"]
    assert info["labeled_samples"] + info["unlabeled_samples"] == 1440  # 2000 * 0.8 train, 10% of it for validation
    assert info["labeled_samples"] == 360
    assert summary["scratch"]["trained_on"] == "labeled share"
    assert summary["figures"]["gain"] == pytest.approx(summary["student"]["test_acc"] - summary["scratch"]["test_acc"])
    # The teacher trained on a quarter of the labels is another cache entry than the full-data one.
    offline = run(make_cfg(*FAST), tmp_path / "offline")
    assert offline["teacher"]["path"] != summary["teacher"]["path"]


@pytest.mark.slow
def test_resume_inside_a_multi_stage_run_starts_in_the_stopped_generation(tmp_path):
    overrides = [*FAST, "strategy=born_again", "strategy.generations=3", "epochs=8", "seed=5", "scratch=false"]
    reference = run(make_cfg(*overrides), tmp_path / "reference")

    run_dir = tmp_path / "interrupted"
    returncode, rest = sigterm_when_logged("generation 2/3 epoch 3/8", *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert returncode == 130, rest
    assert read_summary(run_dir)["status"] == "interrupted"
    assert f"{run_dir / 'checkpoints' / 'gen2' / 'last.pt'} holds epoch" in rest  # the stage's own file
    assert (run_dir / "checkpoints" / "gen1" / "final.pt").is_file()
    assert not (run_dir / "checkpoints" / "gen2" / "final.pt").exists()

    resumed = kdrun_cli(f"resume={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "generation 1/3: finished earlier in this run" in resumed.stderr
    assert "Resuming generation 2/3" in resumed.stderr
    assert "generation 1/3 epoch" not in resumed.stderr  # not retrained
    final = read_summary(run_dir)
    assert final["status"] == "completed"
    for label in ("gen1", "gen2", "gen3", "ensemble"):
        assert final["models"][label]["test_acc"] == reference["models"][label]["test_acc"], label

    def curves(rows):
        return [(r["model"], r["epoch"], r["split"], r["acc"]) for r in rows if r["model"] in ("gen1", "gen2", "gen3")]

    assert curves(read_metrics(run_dir)) == curves(read_metrics(tmp_path / "reference"))
