"""Forward-hook taps on unmodified models."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from kdrun.errors import ConfigError
from kdrun.features import FeatureTaps, resolve_path
from kdrun.models.presets import cnn, mlp


def test_taps_capture_named_stages_and_remove_hooks():
    model = cnn(num_classes=10, input_shape=(1, 40), channels=(8, 16))
    with FeatureTaps(model, ["stage1", "embedding", "fc"]) as taps:
        logits = model(torch.randn(3, 1, 40))
        assert taps["stage1"].shape == (3, 8, 40)
        assert taps["embedding"].shape == (3, 16)
        assert torch.equal(taps["fc"], logits)
    assert not any(module._forward_hooks for module in model.modules())
    assert taps.outputs == {}


def test_embedding_is_the_classifier_input():
    model = mlp(num_classes=4, input_shape=(1, 8, 8), hidden=(16,))
    with FeatureTaps(model, ["embedding"]) as taps:
        logits = model(torch.randn(2, 1, 8, 8))
        assert torch.allclose(model.fc(taps["embedding"]), logits)


def test_unknown_path_lists_available_modules():
    model = mlp(num_classes=4, input_shape=(10,), hidden=(8, 8))
    with pytest.raises(ConfigError) as err:
        FeatureTaps(model, ["stage3"], owner="student")
    message = str(err.value)
    assert "student has no module 'stage3'" in message
    assert "stage1" in message and "embedding" in message and "fc" in message
    assert "\n" not in message


def test_last_stage_alias_resolves_per_model():
    cnn_model = cnn(num_classes=10, input_shape=(1, 40), channels=(8, 16, 32))
    mlp_model = mlp(num_classes=10, input_shape=(1, 40), hidden=(8, 8))
    with FeatureTaps(cnn_model, ["last_stage"]) as t1, FeatureTaps(mlp_model, ["last_stage"]) as t2:
        cnn_model(torch.randn(2, 1, 40))
        mlp_model(torch.randn(2, 1, 40))
        assert t1["last_stage"].shape[1] == 32  # stage3 of the CNN
        assert t2["last_stage"].shape == (2, 8)  # stage2 of the MLP


def test_last_stage_alias_finds_layer_n_and_stage_containers():
    from torchvision.models import resnet18

    assert resolve_path(resnet18(), "last_stage") == "layer4"  # torchvision's (and timm's) ResNets
    containers = {
        "stages": torch.nn.Sequential(OrderedDict(stem=torch.nn.Identity(), stages=torch.nn.Sequential(*(torch.nn.Identity() for _ in range(3))))),
        "blocks": torch.nn.Sequential(OrderedDict(blocks=torch.nn.Sequential(*(torch.nn.Identity() for _ in range(2))))),
    }
    assert resolve_path(containers["stages"], "last_stage.conv") == "stages.2.conv"
    assert resolve_path(containers["blocks"], "last_stage") == "blocks.1"
    assert resolve_path(torch.nn.Linear(2, 2), "last_stage") == "last_stage"  # no stages: left for check_paths to refuse
