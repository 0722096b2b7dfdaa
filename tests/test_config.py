"""Every option of every config group composes and instantiates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from helpers import CONF_DIR, make_cfg
from kdrun import models
from kdrun.data import embedded
from kdrun.losses import build_recipe

CONF = Path(CONF_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_defaults_and_top_level_knobs():
    cfg = make_cfg()
    assert (cfg.T, cfg.alpha, cfg.device, cfg.scratch) == (4, 0.9, "auto", "auto")
    assert cfg.dataset.name == "mnist1d" and cfg.strategy.name == "offline"
    assert cfg.loss.ce.weight == pytest.approx(0.1) and cfg.loss.kd.T == 4


def test_sweepable_knobs_reach_the_recipe():
    cfg = make_cfg("T=2", "alpha=0.25")
    assert str(build_recipe(cfg.loss)) == "L = 0.75*CE + 0.25*KD(T=2) + 100*FitNet(last_stage->last_stage)"


# Per-sample shapes each model family must accept.
SIGNAL, DIGITS, IMAGE = (1, 40), (1, 8, 8), (3, 32, 32)
ANY_DATA_MODELS = {("teacher", "cnn"), ("teacher", "mlp"), ("student", "small"), ("student", "tiny"), ("student", "cnn")}
# The MNIST-1D paper's models are for (1, 40) signals; logistic regression has no stages.
SIGNAL_MODELS = {"mnist1d_logistic", "mnist1d_mlp", "mnist1d_cnn"}


@pytest.mark.slow
@pytest.mark.parametrize("group", ["teacher", "student"])
def test_every_model_option_builds(group):
    for option in options(group):
        if option == "timm" and importlib.util.find_spec("timm") is None:
            continue  # the deploy extra is not installed; tests/test_timm.py says so
        cfg = make_cfg(f"{group}={option}")
        if option == "hf_pretrained":  # needs a saved model directory: test_lm_data.py
            continue
        if cfg[group]._target_.startswith("kdrun.models.language."):  # token ids in, a prediction per position out
            model = models.build(cfg[group], num_classes=10, input_shape=(8,))
            assert model(input_ids=torch.randint(0, 10, (2, 8))).logits.shape == (2, 8, 10), option
            continue
        shapes = [SIGNAL, DIGITS, IMAGE] if (group, option) in ANY_DATA_MODELS else [SIGNAL] if option in SIGNAL_MODELS else [IMAGE]
        for shape in shapes:
            model = models.build(cfg[group], num_classes=10, input_shape=shape)
            logits = model(torch.randn(2, *shape)) if option != "torchvision" else model(torch.randn(2, 3, 64, 64))
            assert logits.shape == (2, 10), (group, option, shape)
            names = dict(model.named_modules())
            if option not in ("torchvision", "timm"):  # their own module names
                assert ({"embedding", "fc"} if option == "mnist1d_logistic" else {"stage1", "embedding", "fc"}) <= set(names), option


def test_every_dataset_option_composes():
    for option in options("dataset"):
        cfg = make_cfg(f"dataset={option}")
        assert cfg.dataset.name == option
        assert cfg.dataset.source._target_.startswith("kdrun.data.")
        if option in ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn"):
            assert cfg.dataset.download is False


def test_embedded_and_fake_sources_instantiate():
    for option in ("mnist1d", "digits", "fake"):
        splits = instantiate(make_cfg(f"dataset={option}").dataset.source)
        assert splits.num_classes == 10 and len(splits.train) > len(splits.test) > 0


def test_mnist1d_is_the_papers_split_and_is_cached(kdrun_cache):
    splits = embedded.mnist1d(cache_dir=str(kdrun_cache / "data"))
    assert (len(splits.train), len(splits.test), splits.input_shape) == (4000, 1000, (1, 40))
    assert list((kdrun_cache / "data").glob("mnist1d_n5000*.npz"))
    labels = splits.train.tensors[1]
    assert labels.min() == 0 and labels.max() == 9


@pytest.mark.slow
def test_every_loss_option_builds():
    for option in options("loss"):
        recipe = build_recipe(make_cfg(f"loss={option}").loss)
        assert str(recipe).startswith("L = ")


def test_every_optim_and_sched_option_instantiates():
    param = torch.nn.Parameter(torch.zeros(3))
    for optim in options("optim"):
        optimizer = instantiate(make_cfg(f"optim={optim}").optim)(params=[param])
        for sched in options("sched"):
            scheduler = instantiate(make_cfg(f"sched={sched}").sched)(optimizer, epochs=3, steps_per_epoch=4)
            optimizer.step()
            scheduler.step()


@pytest.mark.slow
def test_every_strategy_and_experiment_composes():
    for option in options("strategy"):
        assert hasattr(instantiate(make_cfg(f"strategy={option}").strategy.runner), "run")
    for option in options("experiment"):
        cfg = make_cfg(f"experiment={option}")
        assert cfg.name == option or cfg.name.startswith(option)
