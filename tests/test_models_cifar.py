"""CIFAR ResNets against the CRD reference code, and torchvision models by name."""

import socket

import pytest
import torch

from kdrun.errors import ConfigError
from kdrun.models import cifar_resnet
from kdrun.models.tv import torchvision_model

# Parameter counts with num_classes=100, from the reference code itself: models/resnet.py of
# HobbitLong/RepDistiller (commit b84f547) saved unchanged to /tmp, each of its resnet8..resnet32x4
# built with num_classes=100 and counted with sum(p.numel() for p in model.parameters()).
# They round to the published 0.08M, 0.28M, 0.86M, 1.74M, 1.23M and 7.43M.
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
}
TAPS = ("stem", "stage1", "stage2", "stage3", "embedding", "fc")


def build(name, num_classes=100, input_shape=(3, 32, 32)):
    return getattr(cifar_resnet, name)(num_classes=num_classes, input_shape=input_shape)


@pytest.mark.parametrize("name", REFERENCE_PARAMS)
def test_cifar_resnet_matches_reference_params_and_shape(name):
    model = build(name)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[name]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_resnet8_takes_grayscale_of_any_size():
    model = build("resnet8", num_classes=10, input_shape=(1, 28, 28))
    assert model.stem[0].in_channels == 1
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


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
