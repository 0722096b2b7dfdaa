"""timm models as teachers and students: built for the dataset, tapped by the same hooks, trained by
``run``; weights from a local file; pretrained weights offline fail with one line. Nothing downloads."""

from __future__ import annotations

import pytest
import torch

from helpers import make_cfg, read_metrics
from kdrun import models
from kdrun.errors import ConfigError
from kdrun.features import FeatureTaps, resolve_path
from kdrun.run import run

timm = pytest.importorskip("timm", reason="timm models need the deploy extra: pip install -e '.[deploy]'")

IMAGE, DIGITS = (3, 32, 32), (1, 8, 8)
# (timm name, input shapes it is built for); vision transformers take one fixed size, the dataset's.
ARCHS = [
    ("resnet10t", [IMAGE, DIGITS]),
    ("mobilenetv3_small_050", [IMAGE, DIGITS]),
    ("test_vit", [IMAGE]),
    ("test_convnext", [IMAGE]),
]


def build(name: str, shape, role: str = "student", *extra: str, num_classes: int = 7):
    cfg = make_cfg(f"{role}=timm", f"{role}.name={name}", *extra)
    return models.build(cfg[role], num_classes=num_classes, input_shape=shape)


@pytest.mark.parametrize("name, shapes", ARCHS, ids=[a[0] for a in ARCHS])
def test_timm_model_is_built_for_the_dataset_and_tapped_at_its_last_stage(name, shapes):
    for shape in shapes:
        model = build(name, shape)
        # timm's own account of the model's stages: the deepest is where last_stage must land
        deepest = model.feature_info[-1]
        assert resolve_path(model, "last_stage") == deepest["module"]
        assert resolve_path(model, "last_stage.norm1") == f"{deepest['module']}.norm1"
        x = torch.randn(2, *shape)
        with FeatureTaps(model, ["last_stage"]) as taps:
            logits = model(x)
            features = taps["last_stage"]
        assert logits.shape == (2, 7), (name, shape)
        # conv stages give (N, C, H, W), transformer blocks (N, tokens, C)
        assert features.shape[0] == 2 and deepest["num_chs"] in (features.shape[1], features.shape[-1]), features.shape


@pytest.mark.slow
def test_timm_teacher_and_student_train_through_run_with_feature_taps(tmp_path):
    cfg = make_cfg(
        "dataset=fake", "dataset.source.num_train=64", "dataset.source.num_test=32", "dataset.batch_size=32",
        "teacher=timm", "teacher.name=resnet10t", "student=timm", "student.name=mobilenetv3_small_050",
        "loss=kd_fitnet", "epochs=1", "teacher_training.epochs=1", "scratch=false", "device=cpu",
    )
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed"
    assert summary["teacher"]["arch"] == "resnet10t" and summary["student"]["arch"] == "mobilenetv3_small_050"
    assert summary["student"]["params"] == models.count_params(build("mobilenetv3_small_050", IMAGE, num_classes=10))
    train_row = next(r for r in read_metrics(tmp_path) if r["model"] == "student" and r["split"] == "train")
    # the hint term read layer4 of the teacher and blocks.5 of the student through their hooks
    assert train_row["loss/fitnet"] > 0 and train_row["loss/kd"] >= 0


def test_pretrained_file_loads_timm_weights_and_resizes_the_classifier(tmp_path):
    source = timm.create_model("resnet10t", num_classes=1000)
    path = tmp_path / "resnet10t_weights.pth"
    torch.save(source.state_dict(), path)
    model = build("resnet10t", IMAGE, "teacher", f"teacher.pretrained_file={path}")
    assert torch.equal(model.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    assert model.fc.out_features == 7  # timm dropped the 1000-class head and made one for the dataset


def test_pretrained_weights_offline_fail_with_one_line_naming_the_fix(monkeypatch):
    import huggingface_hub

    # offline as a machine without a network is, without waiting for its time-outs: no download is tried
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as caught:
        build("resnet10t", IMAGE, "teacher", "teacher.pretrained=true")
    message = str(caught.value)
    assert "\n" not in message and "pretrained weights" in message
    assert "checkpoint=" in message and "pretrained_file=" in message


@pytest.mark.parametrize("name, shape, wanted", [
    ("resnet10t", (1, 40), "takes images"),  # an MNIST-1D signal
    ("test_vit", (3, 2, 2), "cannot take inputs of shape"),  # refused by timm when built
    ("test_convnext", (3, 2, 2), "cannot take inputs of shape"),  # refused in its first forward
])
def test_inputs_a_timm_model_cannot_take_are_refused(name, shape, wanted):
    with pytest.raises(ConfigError, match=wanted):
        build(name, shape)


def test_unknown_timm_name_suggests_the_nearest():
    with pytest.raises(ConfigError, match="did you mean resnet10t"):
        build("resnet10", IMAGE)


def test_an_option_the_timm_model_does_not_take_is_refused():
    with pytest.raises(ConfigError, match="'resnet10t' does not take these options .*unexpected keyword argument 'foo'"):
        build("resnet10t", IMAGE, "student", "+student.foo=1")
