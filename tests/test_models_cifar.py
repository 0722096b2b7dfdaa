"""CIFAR model families against the CRD reference code, and torchvision models by name."""

import json
import socket
from pathlib import Path

import pytest
import torch

from kdrun.models.weights import load_weights
from kdrun.errors import CheckpointError, ConfigError
from kdrun.features import FeatureTaps
from kdrun.models import cifar_mobilenet, cifar_resnet, cifar_resnet50, cifar_shufflenet, cifar_vgg, cifar_wrn
from kdrun.models.tv import torchvision_model

# Parameter counts with num_classes=100, from the reference code itself: models/ of
# HobbitLong/RepDistiller (commit b84f547) saved unchanged to /tmp, each model of its model_dict
# built with num_classes=100 and counted with sum(p.numel() for p in model.parameters())
# (resnet*: models/resnet.py, wrn_*: models/wrn.py, vgg*: models/vgg.py vgg*_bn,
# mobilenetv2: models/mobilenetv2.py mobile_half, shufflenetv1/v2: models/ShuffleNetv1.py ShuffleV1 and
# models/ShuffleNetv2.py ShuffleV2, resnet50: models/resnetv2.py ResNet50).
# The ResNets round to the published 0.08M, 0.28M, 0.86M, 1.74M, 1.23M and 7.43M.
REFERENCE_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "mobilenetv2": 812_836,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
    "resnet50": 23_705_252,
}
FAMILIES = (cifar_resnet, cifar_wrn, cifar_vgg, cifar_mobilenet, cifar_shufflenet, cifar_resnet50)
# How many stages each family has (by name prefix; the longest prefix wins).
STAGES = {"resnet": 3, "wrn": 3, "vgg": 4, "mobilenetv2": 4, "shufflenetv1": 3, "shufflenetv2": 3, "resnet50": 4}
TAPS = ("stem", "stage1", "stage2", "stage3", "embedding", "fc")
# The keys and shapes of RepDistiller's state dicts, one model per family, written once by building
# its models (commit b84f547) with num_classes=100: [[key, shape], ...] in state_dict() order.
REFERENCE_KEYS = json.loads((Path(__file__).parent / "data" / "repdistiller_keys.json").read_text())


def build(name, num_classes=100, input_shape=(3, 32, 32)):
    family = next(module for module in FAMILIES if hasattr(module, name))
    return getattr(family, name)(num_classes=num_classes, input_shape=input_shape)


def num_stages(name):
    return next(count for prefix, count in sorted(STAGES.items(), key=lambda item: -len(item[0])) if name.startswith(prefix))


@pytest.mark.parametrize("name", REFERENCE_PARAMS)
def test_cifar_models_match_reference_params_shape_and_taps(name):
    model = build(name).eval()
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[name]
    stages = [f"stage{i}" for i in range(1, num_stages(name) + 1)]
    fc_inputs = []
    model.fc.register_forward_pre_hook(lambda module, args: fc_inputs.append(args[0]))
    with FeatureTaps(model, ["stem", *stages, "last_stage", "embedding", "fc"]) as taps:
        logits = model(torch.randn(2, 3, 32, 32))
        assert logits.shape == (2, 100)
        assert not hasattr(model, f"stage{len(stages) + 1}")
        assert torch.equal(taps["last_stage"], taps[stages[-1]])
        assert torch.equal(taps["embedding"], fc_inputs[0]) and taps["embedding"].shape == (2, model.fc.in_features)
        assert torch.equal(taps["fc"], logits)
        sizes = [taps[stage].shape[-1] for stage in stages]
        assert sizes == sorted(sizes, reverse=True) and all(taps[stage].dim() == 4 for stage in stages)


def test_resnet8_takes_grayscale_of_any_size():
    model = build("resnet8", num_classes=10, input_shape=(1, 28, 28))
    assert model.stem[0].in_channels == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", ["wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2", "resnet50"])
def test_other_families_take_grayscale_28x28(name):
    assert build(name, num_classes=10, input_shape=(1, 28, 28))(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_wrn_depth_must_be_6n_plus_4():
    with pytest.raises(ConfigError, match="wrn_15_1: depth must be 6n\\+4"):
        cifar_wrn.wide_resnet("wrn_15_1", 15, 1, num_classes=10, input_shape=(3, 32, 32))


def reference_state(name, seed=0):
    """Random weights in RepDistiller's key layout (positive BN variances), as its teachers hold them."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in REFERENCE_KEYS[name]:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(240)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.1
    return state


@pytest.mark.parametrize("name", REFERENCE_KEYS)
def test_repdistiller_teacher_checkpoint_loads_and_gives_the_same_logits(name, tmp_path):
    theirs = reference_state(name)
    model = build(name).eval()
    own_keys = list(model.state_dict())
    # Both codes register their layers in the same order, so keys pair up by position; this
    # pairing is worked out without the conversion under test.
    assert [list(value.shape) for value in model.state_dict().values()] == [shape for _, shape in REFERENCE_KEYS[name]]
    by_position = dict(zip(own_keys, theirs.values()))
    assert {model.reference_key(key): key for key in theirs} == dict(zip(own_keys, theirs))

    # RepDistiller's file: {"model": state dict, "epoch": ..., "accuracy": ..., "optimizer": ...}.
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": theirs, "epoch": 240, "accuracy": torch.tensor(75.0), "optimizer": {"state": {}}}, path)
    load_weights(model, path, "teacher.checkpoint")
    reference = build(name).eval()
    reference.load_state_dict(by_position)
    inputs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(inputs), reference(inputs))


def test_repdistiller_checkpoint_without_num_batches_tracked_loads(tmp_path):
    # PyTorch 0.4.0, which RepDistiller's teachers were trained with, did not save it.
    theirs = {k: v for k, v in reference_state("resnet8x4").items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": theirs}, tmp_path / "old.pth")
    model = build("resnet8x4")
    load_weights(model, tmp_path / "old.pth", "teacher.checkpoint")
    assert torch.equal(model.stem[0].weight, theirs["conv1.weight"])


def test_own_layout_still_loads(tmp_path):
    source = build("wrn_16_1")
    torch.save({"model": source.state_dict()}, tmp_path / "own.pt")
    model = build("wrn_16_1")
    load_weights(model, tmp_path / "own.pt", "teacher.checkpoint")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_checkpoint_in_neither_layout_names_missing_and_unexpected_keys(tmp_path):
    theirs = reference_state("resnet8x4")
    theirs["layer9.weight"] = theirs.pop("fc.weight")
    torch.save({"model": theirs}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as caught:
        load_weights(build("resnet8x4"), tmp_path / "odd.pth", "teacher.checkpoint")
    message = str(caught.value)
    assert "\n" not in message and "odd.pth" in message
    assert "keys match neither kdrun's nor RepDistiller's layout" in message
    assert "missing fc.weight; unexpected layer9.weight" in message


def test_checkpoint_of_another_arch_is_a_clear_error(tmp_path):
    torch.save({"model": reference_state("vgg8")}, tmp_path / "vgg8.pth")
    match = "does not fit the configured model resnet8x4: .*missing fc.bias, fc.weight, .*unexpected block0.0.bias"
    with pytest.raises(CheckpointError, match=match):
        load_weights(build("resnet8x4"), tmp_path / "vgg8.pth", "teacher.checkpoint", arch="resnet8x4")


@pytest.mark.parametrize("shape", [(32, 32), (3, 1, 32, 32), 32])
def test_cifar_resnet_rejects_shape_that_is_not_chw(shape):
    with pytest.raises(ConfigError, match="resnet20.*input_shape"):
        build("resnet20", input_shape=shape)


@pytest.mark.parametrize(
    ("name", "stem_width", "widths"), [("resnet20", 16, (16, 32, 64)), ("resnet8x4", 32, (64, 128, 256))]
)
def test_hooks_see_named_stages_and_embedding_feeds_fc(name, stem_width, widths):
    model = build(name).eval()
    outputs, fc_inputs = {}, []
    handles = [
        model.get_submodule(path).register_forward_hook(
            lambda module, args, output, path=path: outputs.__setitem__(path, output)
        )
        for path in TAPS
    ]
    handles.append(model.fc.register_forward_pre_hook(lambda module, args: fc_inputs.append(args[0])))
    logits = model(torch.randn(2, 3, 32, 32))
    for handle in handles:
        handle.remove()

    assert set(outputs) == set(TAPS)
    assert outputs["stem"].shape == (2, stem_width, 32, 32)
    assert [outputs[f"stage{i}"].shape for i in (1, 2, 3)] == [
        (2, widths[0], 32, 32),
        (2, widths[1], 16, 16),
        (2, widths[2], 8, 8),
    ]
    assert outputs["embedding"].shape == (2, widths[2])
    assert torch.equal(outputs["embedding"], fc_inputs[0])
    assert torch.equal(outputs["fc"], logits)
    # Stage outputs are post-ReLU and were not overwritten in place by later layers.
    assert torch.allclose(outputs["embedding"], outputs["stage3"].mean(dim=(2, 3)))
    assert all(outputs[f"stage{i}"].min() >= 0 for i in (1, 2, 3))


@pytest.mark.parametrize(("name", "head"), [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3")])
def test_torchvision_model_resizes_last_linear(name, head):
    model = torchvision_model(num_classes=7, input_shape=(3, 64, 64), name=name)
    assert model.get_submodule(head).out_features == 7
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_torchvision_squeezenet_resizes_its_conv_classifier():
    model = torchvision_model(num_classes=7, input_shape=(3, 64, 64), name="squeezenet1_1")
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_torchvision_unknown_name_suggests_close_matches():
    with pytest.raises(ConfigError, match="unknown torchvision model 'resnet_18'.*resnet18"):
        torchvision_model(num_classes=7, input_shape=(3, 64, 64), name="resnet_18")


def test_torchvision_model_needs_three_channels():
    with pytest.raises(ConfigError, match="expects 3 input channels"):
        torchvision_model(num_classes=7, input_shape=(1, 28, 28), name="resnet18")


def test_torchvision_unknown_weights_lists_allowed():
    with pytest.raises(ConfigError, match="unknown weights 'IMAGENET'.*DEFAULT, IMAGENET1K_V1"):
        torchvision_model(num_classes=7, input_shape=(3, 64, 64), name="resnet18", weights="IMAGENET")


def test_torchvision_weights_without_network_say_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir().startswith(str(tmp_path)), "torch.hub.set_dir() was called earlier"

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    # The same outcome as an offline machine, also where the tests run with network.
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ConfigError) as caught:
        torchvision_model(num_classes=7, input_shape=(3, 64, 64), name="resnet18", weights="DEFAULT")
    message = str(caught.value)
    assert "\n" not in message
    assert "ResNet18_Weights.IMAGENET1K_V1" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "run once with network access" in message
    assert not list(tmp_path.rglob("*.pth"))


def test_torchvision_offers_only_classification_models():
    with pytest.raises(ConfigError, match="unknown torchvision model 'fasterrcnn_resnet50_fpn'"):
        torchvision_model(num_classes=7, input_shape=(3, 64, 64), name="fasterrcnn_resnet50_fpn")
