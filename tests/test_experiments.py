"""The CRD paper baselines (``conf/experiment/crd_*``) and the teacher-only strategy, on fake CIFAR-100-shaped data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from helpers import CONF_DIR, kdrun_cli, make_cfg, read_summary, recipe_state
from kdrun.run import run

EXPERIMENTS = sorted(path.stem for path in (Path(CONF_DIR) / "experiment").glob("crd_*.yaml"))
# CIFAR-100's shape, a handful of samples: one optimiser step per model.
FAKE_CIFAR100 = [
    "dataset=fake",
    "dataset.source.num_classes=100",
    "dataset.source.image_size=32",
    "dataset.source.channels=3",
    "dataset.source.num_train=4",
    "dataset.source.num_test=4",
    "dataset.batch_size=4",
    "epochs=1",
    "teacher_training.epochs=1",
]
PAPER_METHODS = {"ce", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "crd", "crd_kd", "dkd", "kd_ls"}
LIGHT_STUDENTS = ("mobilenetv2", "shufflenetv1", "shufflenetv2")


def with_loss_choice(cfg, loss: str):
    """What ``kdrun`` (cli._app) adds from Hydra's group choices; ``make_cfg`` runs outside Hydra."""
    with open_dict(cfg):
        cfg.choices = {"loss": loss}
    return cfg


def test_the_papers_thirteen_cifar100_pairs_are_there():
    assert len(EXPERIMENTS) == 13
    assert {"crd_wrn_40_2_wrn_16_2", "crd_resnet32x4_resnet8x4", "crd_vgg13_mobilenetv2", "crd_wrn_40_2_shufflenetv1"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_has_the_published_recipe_and_numbers(experiment):
    cfg = make_cfg(f"experiment={experiment}")
    teacher, student = cfg.teacher.arch, cfg.student.arch
    assert experiment == f"crd_{teacher}_{student}" and cfg.name == experiment
    assert cfg.dataset.name == "cifar100" and cfg.dataset.batch_size == 64 and cfg.epochs == 240
    assert cfg.optim.lr == (0.01 if student in LIGHT_STUDENTS else 0.05)
    assert (cfg.optim.momentum, cfg.optim.weight_decay) == (0.9, 5.0e-4)
    assert list(cfg.sched.milestones) == [150, 180, 210] and cfg.sched.gamma == 0.1
    # The teacher always gets the teacher recipe, also when the student's lr is 0.01.
    assert cfg.teacher_training.optim.lr == 0.05 and cfg.teacher_training.epochs == 240
    published = cfg.published
    methods = dict(published.methods)
    assert set(methods) <= PAPER_METHODS and {"kd", "crd", "crd_kd"} <= set(methods)
    assert methods["ce"] == published.student_acc
    assert all(40.0 < value < 90.0 for value in [published.teacher_acc, *methods.values()])
    assert published.method is None and published.method_acc is None  # no loss choice outside the CLI
    assert with_loss_choice(cfg, "crd").published.method_acc == methods["crd"]
    assert with_loss_choice(cfg, "hidden_mse").published.method_acc is None


def test_lr_001_experiments_share_the_cached_teacher_of_lr_005_ones():
    from kdrun.provision import cache_key

    keys = set()
    for experiment in ("crd_resnet32x4_resnet8x4", "crd_resnet32x4_shufflenetv1", "crd_resnet32x4_shufflenetv2"):
        cfg = make_cfg(f"experiment={experiment}")
        keys.add(cache_key(cfg.teacher, cfg.dataset, cfg.seed, cfg.teacher_training))
    assert len(keys) == 1


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_one_step_and_reports_the_published_number(experiment, tmp_path):
    cfg = with_loss_choice(make_cfg(f"experiment={experiment}", *FAKE_CIFAR100), "kd")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed"
    assert summary["dataset"]["num_classes"] == 100 and summary["dataset"]["input_shape"] == [3, 32, 32]
    assert summary["teacher"]["arch"] == cfg.teacher.arch and summary["student"]["arch"] == cfg.student.arch
    published = summary["published"]
    assert published["method"] == "kd" and published["method_acc"] == cfg.published.methods.kd
    assert read_summary(tmp_path)["published"]["method_acc"] == published["method_acc"]
    assert f"this method (kd) {published['method_acc']:.2f}" in (tmp_path / "kdrun.log").read_text()


def test_method_without_published_number_says_so(tmp_path):
    cfg = with_loss_choice(make_cfg("experiment=crd_resnet110_resnet20", "loss=dkd", *FAKE_CIFAR100), "dkd")
    summary = run(cfg, tmp_path)
    assert summary["published"]["method"] == "dkd" and summary["published"]["method_acc"] is None
    assert "this method (dkd): no published number" in (tmp_path / "kdrun.log").read_text()


@pytest.mark.slow
def test_teacher_strategy_trains_and_caches_the_teacher_for_a_later_distillation(tmp_path):
    overrides = ["experiment=crd_resnet32x4_resnet8x4", *FAKE_CIFAR100, "seed=11"]
    only_teacher = run(make_cfg(*overrides, "strategy=teacher"), tmp_path / "teacher")
    assert only_teacher["strategy"] == "teacher" and only_teacher["status"] == "completed"
    assert only_teacher["teacher"]["source"] == "trained" and only_teacher["scratch"] is None
    assert only_teacher["student"]["arch"] == "resnet32x4"
    assert only_teacher["student"]["params"] == only_teacher["teacher"]["params"] == 7_433_860
    assert only_teacher["student"]["test_acc"] == only_teacher["teacher"]["test_acc"]
    assert not (tmp_path / "teacher" / "checkpoints" / "last.pt").exists()  # no student was trained

    distilled = run(make_cfg(*overrides), tmp_path / "student")
    assert distilled["teacher"]["source"] == "cache"
    assert distilled["teacher"]["path"] == only_teacher["teacher"]["path"]
    assert distilled["teacher"]["test_acc"] == only_teacher["teacher"]["test_acc"]


@pytest.mark.slow
def test_command_line_loss_choice_selects_the_published_number(tmp_path):
    result = kdrun_cli(
        "experiment=crd_resnet32x4_shufflenetv1", "loss=crd", "loss.crd.nce_k=2", *FAKE_CIFAR100,
        "hydra.run.dir=run", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = read_summary(tmp_path / "run")
    assert summary["published"]["method"] == "crd" and summary["published"]["method_acc"] == 75.11
    assert "this method (crd) 75.11" in result.stdout + result.stderr
    saved = yaml.safe_load((tmp_path / "run" / "config_resolved.yaml").read_text())
    assert saved["choices"]["loss"] == "crd" and saved["choices"]["student"] == "shufflenetv1"


@pytest.mark.slow
def test_cfg_job_shows_the_reference_stages_and_weight_of_at(tmp_path):
    result = kdrun_cli("experiment=crd_resnet32x4_resnet8x4", "loss=at", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    loss = yaml.safe_load(result.stdout)["loss"]
    # RepDistiller: loss = 1 * CE + 1000 * sum over feat[1:-1] (every stage) of the AT loss
    assert loss["ce"]["weight"] == 1.0 and loss["at"]["weight"] == 1000 and loss["at"]["p"] == 2
    assert loss["at"]["student_taps"] == ["stages"] and loss["at"]["teacher_taps"] == ["stages"]


# What each loss is in the experiments (RepDistiller's train_student.py and scripts/run_cifar_distill.sh,
# mdistiller's DKD configs, logit-standardization-KD's runs) and in a plain run (kdrun's defaults).
REFERENCE_SETTINGS = {
    "at": ({"at.student_taps": ["stages"], "at.teacher_taps": ["stages"], "at.weight": 1000},
           {"at.student_taps": ["last_stage"]}),
    "vid": ({"vid.student_taps": ["stages"], "vid.teacher_taps": ["stages"], "vid.weight": 1}, {"vid.student_taps": ["last_stage"]}),
    "fitnet": ({"fitnet.student_taps": "stage2", "fitnet.teacher_taps": "stage2", "fitnet.relu": True, "fitnet.weight": 100},
               {"fitnet.student_taps": "last_stage"}),
    "sp": ({"sp.student_taps": "last_stage", "sp.weight": 3000.0}, {"sp.student_taps": "last_stage"}),
    "cc": ({"cc.form": "reference", "cc.weight": 0.02, "cc.student_taps": "embedding"}, {"cc.form": "reference"}),
    "dkd": ({"dkd.beta": 2.0, "dkd.T": 4, "dkd.warmup_epochs": 20, "ce.weight": 1.0}, {"dkd.beta": 8.0}),
    "kd_ls": ({"kd.T": 2, "kd.weight": 9.0, "ce.weight": 0.1, "kd.standardize": True}, {"kd.T": 4}),
}


@pytest.mark.parametrize("loss", sorted(REFERENCE_SETTINGS))
def test_an_experiment_runs_each_loss_with_its_reference_settings(loss):
    in_experiment, plain = REFERENCE_SETTINGS[loss]
    resolved = make_cfg("experiment=crd_resnet110_resnet32", f"loss={loss}")
    default = make_cfg(f"loss={loss}")
    for key, value in in_experiment.items():
        assert OmegaConf.select(resolved.loss, key) == value, key
    for key, value in plain.items():
        assert OmegaConf.select(default.loss, key) == value, key


@pytest.mark.parametrize(
    "experiment, beta, ls_T, ls_weight",
    [("crd_resnet110_resnet32", 2.0, 2, 9.0), ("crd_vgg13_vgg8", 6.0, 3, 9.0), ("crd_resnet50_mobilenetv2", 8.0, 3, 1.0)],
)
def test_dkd_and_kd_ls_settings_are_the_pairs_own(experiment, beta, ls_T, ls_weight):
    assert make_cfg(f"experiment={experiment}", "loss=dkd").loss.dkd.beta == beta
    kd_ls = make_cfg(f"experiment={experiment}", "loss=kd_ls")
    assert (kd_ls.T, kd_ls.loss.kd.T, kd_ls.loss.kd.weight) == (ls_T, ls_T, ls_weight)


def test_the_command_line_still_decides_over_the_reference_settings():
    cfg = make_cfg("experiment=crd_vgg13_vgg8", "loss=kd_ls", "T=5", "loss.kd.weight=2")
    assert (cfg.loss.kd.T, cfg.loss.kd.weight) == (5, 2)


@pytest.mark.parametrize(
    "experiment, loss, formula, adapter",
    [
        pytest.param("crd_resnet32x4_resnet8x4", "at", "1000*AT(p=2, stages->stages)", {}, marks=pytest.mark.slow),
        # four stages a side: a regressor per pair, 1x1 convs without bias
        ("crd_vgg13_vgg8", "vid", "1*VID(stages->stages)", {"terms.vid.regressors.3.mean.4.weight": (512, 512, 1, 1)}),
        # mobilenetv2's 16-channel 8x8 hint onto resnet50's 512-channel 16x16: ConvReg's transposed conv
        pytest.param("crd_resnet50_mobilenetv2", "fitnet", "100*FitNet(stage2->stage2)",
                     {"terms.fitnet.regressor.layers.0.weight": (16, 512, 4, 4)}, marks=pytest.mark.slow),
        ("crd_wrn_40_2_wrn_16_2", "dkd", "1*DKD(a=1,b=6,T=4)", {}),
    ],
)
@pytest.mark.slow
def test_reference_settings_run_one_step(experiment, loss, formula, adapter, tmp_path):
    summary = run(with_loss_choice(make_cfg(f"experiment={experiment}", f"loss={loss}", *FAKE_CIFAR100), loss), tmp_path)
    assert summary["status"] == "completed" and formula in summary["recipe"]
    state = recipe_state(tmp_path)
    assert {name: tuple(state[name].shape) for name in adapter} == adapter
    assert not any(name.endswith("bias") and ".vid." in name for name in state)


def test_stages_of_unequal_count_are_refused_before_training(tmp_path):
    from kdrun.errors import ConfigError

    cfg = make_cfg("experiment=crd_resnet32x4_resnet8x4", "loss=at", "student=vgg8", *FAKE_CIFAR100)
    with pytest.raises(ConfigError, match=r"AT pairs student stages \(stage1, stage2, stage3, stage4\) with teacher stages"):
        run(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()
