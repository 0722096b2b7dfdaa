"""The DKD paper's ImageNet pairs (``conf/experiment/imagenet_*``, mdistiller's recipe) and kdrun's
MobileNetV1, composed and run for one step on random data of ImageNet's shape."""

from __future__ import annotations

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from helpers import make_cfg, read_metrics
from kdrun.features import FeatureTaps
from kdrun.models import count_params
from kdrun.models.imagenet_mobilenet import mobilenetv1
from kdrun.run import run
from test_experiments import with_loss_choice

EXPERIMENTS = {
    "imagenet_resnet34_resnet18": ("resnet34", "resnet18", "resnet34-b627a593.pth"),
    "imagenet_resnet50_mobilenetv1": ("resnet50", "mobilenetv1", "resnet50-0676ba61.pth"),
}
# ImageNet's shape (1,000 classes of 224x224 RGB images), two samples: one optimiser step per model.
FAKE_IMAGENET = [
    "dataset=fake", "dataset.source.num_classes=1000", "dataset.source.image_size=224", "dataset.source.channels=3",
    "dataset.source.num_train=2", "dataset.source.num_test=2", "dataset.batch_size=2", "dataset.num_workers=0",
    "epochs=1", "teacher_training.epochs=1",
]


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_has_mdistillers_imagenet_recipe_and_published_numbers(experiment):
    teacher, student, weights_file = EXPERIMENTS[experiment]
    cfg = make_cfg(f"experiment={experiment}", "dataset.root=/data/imagenet")
    assert (cfg.teacher.arch, cfg.student.arch, cfg.name) == (teacher, student, experiment)
    assert cfg.teacher.checkpoint.endswith(f"hub/checkpoints/{weights_file}")  # torchvision's IMAGENET1K_V1 file
    assert cfg.dataset.name == "imagefolder" and cfg.dataset.source.image_size == 224 and cfg.dataset.val_fraction == 0.0
    assert (cfg.epochs, cfg.dataset.batch_size, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (100, 512, 0.2, 0.9, 1e-4)
    assert list(cfg.sched.milestones) == [30, 60, 90] and cfg.sched.gamma == 0.1
    assert (cfg.T, cfg.alpha) == (1, 0.5)  # KD: T 1, CE 0.5 + KD 0.5
    methods = dict(cfg.published.methods)
    assert methods["ce"] == cfg.published.student_acc and {"kd", "dkd", "reviewkd"} <= set(methods)
    assert all(65.0 < value < 80.0 for value in [cfg.published.teacher_acc, *methods.values()])


@pytest.mark.parametrize(
    "experiment, loss, expected",
    [
        ("imagenet_resnet34_resnet18", "dkd", {"loss.dkd.beta": 0.5, "loss.dkd.T": 1, "loss.dkd.warmup_epochs": 1, "loss.ce.weight": 1.0}),
        ("imagenet_resnet50_mobilenetv1", "dkd", {"loss.dkd.beta": 2.0, "loss.dkd.T": 1, "loss.dkd.warmup_epochs": 1}),
        ("imagenet_resnet34_resnet18", "at", {"loss.at.student_taps": ["layer1", "layer2", "layer3", "layer4"], "loss.at.weight": 1000}),
        # mdistiller zips MobileNetV1's feats[1:] (3) with ResNet50's (4): stages one apart
        ("imagenet_resnet50_mobilenetv1", "at", {"loss.at.student_taps": ["stage2", "stage3", "stage4"],
                                                 "loss.at.teacher_taps": ["layer1", "layer2", "layer3"]}),
        ("imagenet_resnet34_resnet18", "crd", {"dataset.batch_size": 256, "optim.lr": 0.1, "loss.crd.student_taps": "avgpool",
                                               "loss.crd.weight": 0.8, "loss.crd.nce_k": 16384}),
        ("imagenet_resnet50_mobilenetv1", "crd", {"dataset.batch_size": 256, "loss.crd.student_taps": "embedding",
                                                  "loss.crd.teacher_taps": "avgpool"}),
        ("imagenet_resnet50_mobilenetv1", "reviewkd", {"loss.reviewkd.weight": 8.0, "loss.reviewkd.warmup_epochs": 1,
                                                       "dataset.batch_size": 256, "optim.lr": 0.1}),
        ("imagenet_resnet50_mobilenetv1", "ofd", {"loss.ofd.weight": 1.0e-4, "dataset.batch_size": 128, "optim.lr": 0.05}),
        ("imagenet_resnet34_resnet18", "kd", {"loss.kd.T": 1, "loss.kd.weight": 0.5, "loss.ce.weight": 0.5, "dataset.batch_size": 512}),
    ],
)
def test_each_method_gets_mdistillers_settings(experiment, loss, expected):
    cfg = make_cfg(f"experiment={experiment}", f"loss={loss}", "dataset.root=/data/imagenet")
    assert {key: OmegaConf.select(cfg, key) for key in expected} == expected


def test_mobilenetv1_is_mdistillers_with_its_published_size():
    model = mobilenetv1(num_classes=1000, input_shape=(3, 224, 224)).eval()
    assert count_params(model) == 4_231_976  # "4.23M": the OFD code's README; mdistiller's model counts the same
    with torch.no_grad(), FeatureTaps(model, ["stages", "embedding"]) as taps:
        logits = model(torch.randn(1, 3, 224, 224))
        shapes = [tuple(taps[f"stages[{i}]"].shape[1:]) for i in range(4)]
        assert taps["embedding"].shape == (1, 1024) and logits.shape == (1, 1000)
    assert shapes == [(128, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7)]  # mdistiller's feats["feats"]


@pytest.mark.slow  # 23 steps of a 4.2M-parameter model
def test_mobilenetv1_trains_one_epoch_on_an_embedded_dataset(tmp_path):
    summary = run(make_cfg("dataset=digits", "student=mobilenetv1", "epochs=1", "teacher_training.epochs=1", "scratch=false"), tmp_path)
    assert summary["status"] == "completed" and summary["student"]["arch"] == "mobilenetv1"
    assert summary["student"]["params"] == count_params(mobilenetv1(num_classes=10, input_shape=(1, 8, 8)))


def test_mobilenetv1_runs_a_step_on_cifar_shaped_data(tmp_path):
    overrides = ["dataset=fake", "dataset.source.num_train=8", "dataset.source.num_test=4", "dataset.batch_size=4",
                 "teacher=resnet8", "student=mobilenetv1", "epochs=1", "teacher_training.epochs=1", "loss=kd"]
    assert run(make_cfg(*overrides), tmp_path)["status"] == "completed"


@pytest.mark.slow  # a ResNet34/50 teacher and its student on 224x224 images, on the CPU
@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
@pytest.mark.parametrize("loss", ["kd", "at", "dkd", "crd", "ofd", "reviewkd"])
def test_experiment_runs_one_step_on_imagenet_shaped_data(experiment, loss, tmp_path):
    overrides = [f"experiment={experiment}", f"loss={loss}", *FAKE_IMAGENET, "teacher.checkpoint=null", "loss.crd.nce_k=2"]
    if loss != "crd":
        overrides.remove("loss.crd.nce_k=2")
    summary = run(with_loss_choice(make_cfg(*overrides), loss), tmp_path)
    assert summary["status"] == "completed" and summary["dataset"]["input_shape"] == [3, 224, 224]
    assert summary["published"]["method_acc"] == OmegaConf.select(make_cfg(f"experiment={experiment}"), f"published.methods.{loss}")
    train = [r for r in read_metrics(tmp_path) if r["model"] == "student" and r["split"] == "train"]
    assert train and all(torch.isfinite(torch.tensor(value)) for key, value in train[0].items() if key.startswith("loss/"))


@pytest.mark.slow
def test_torchvisions_weights_file_is_the_teacher_checkpoint(tmp_path):
    # The experiments read torchvision's IMAGENET1K_V1 file, a bare state dict; one of the same layout
    # (random weights: no download here) loads as the teacher, which is then not trained.
    weights = tmp_path / "resnet34-weights.pth"
    torch.save(torchvision.models.resnet34(num_classes=1000).state_dict(), weights)
    cfg = make_cfg("experiment=imagenet_resnet34_resnet18", "loss=kd", *FAKE_IMAGENET, f"teacher.checkpoint={weights}")
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["teacher"]["source"] == "checkpoint"


# The settings this work added, each run for one step on CIFAR's and on ImageNet's shape (the embedded
# default job runs them in tests/test_losses_features.py and tests/test_losses_relations.py).
NEW_OPTIONS = {
    "cc_paper_form": ["loss=cc", "loss.cc.form=paper"],
    "fitnet_without_relu": ["loss=fitnet", "loss.fitnet.relu=false", "loss.fitnet.student_taps=stage2", "loss.fitnet.teacher_taps=stage2"],
    "at_over_stages": ["loss=at", "loss.at.student_taps=[stages]", "loss.at.teacher_taps=[stages]"],
    "vid_over_stages": ["loss=vid", "loss.vid.student_taps=[stages]", "loss.vid.teacher_taps=[stages]"],
}
SHAPES = {
    "cifar": ["dataset.source.num_classes=100", "dataset.source.image_size=32", "teacher=resnet20", "student=resnet8"],
    # four stages a side; a narrow MobileNetV1 keeps 224x224 cheap on the CPU
    "imagenet": ["dataset.source.num_classes=1000", "dataset.source.image_size=224", "teacher=mobilenetv1",
                 "student=mobilenetv1", "student.width=0.25", "teacher.width=0.5"],
}


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("option", sorted(NEW_OPTIONS))
def test_new_options_run_a_step_on_cifar_and_imagenet_shapes(option, shape, tmp_path):
    overrides = ["dataset=fake", "dataset.source.channels=3", "dataset.source.num_train=4", "dataset.source.num_test=2",
                 "dataset.batch_size=4", "epochs=1", "teacher_training.epochs=1", "scratch=false"]
    summary = run(make_cfg(*overrides, *SHAPES[shape], *NEW_OPTIONS[option]), tmp_path)
    assert summary["status"] == "completed"
    (row,) = [r for r in read_metrics(tmp_path) if r["model"] == "student" and r["split"] == "train"]
    assert all(torch.isfinite(torch.tensor(value)) for key, value in row.items() if key.startswith("loss/"))
