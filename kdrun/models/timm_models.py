"""Any timm model by name, built for the dataset: its classes, its input channels and, for models
that take one fixed image size (vision transformers), the dataset's image size.

The model is returned as timm builds it, so its taps are timm's own module paths (``layer3``,
``stages.2``, ``blocks.5``, ...); ``last_stage`` finds the deepest of them (:mod:`kdrun.features`).
Weights: none (``pretrained=false``), timm's pretrained weights (``pretrained=true``, downloaded by
timm, so a network or timm's cache is needed) or a local file of them (``pretrained_file``); in
both cases timm adapts the classifier and the first convolution to the dataset. A kdrun
checkpoint of the model is the config's ``checkpoint``, loaded by kdrun like any other model's.
"""

from __future__ import annotations

import difflib
import os

import torch
from torch import nn

from kdrun.errors import ConfigError

# How timm refuses an input size, when building a model or in its first forward.
_REFUSALS = (ValueError, AssertionError, RuntimeError)


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("timm models need the timm package: pip install 'kdrun[deploy]' (or pip install timm)") from None
    return timm


def timm_model(num_classes: int, input_shape, name: str, pretrained: bool = False, pretrained_file: str | None = None,
               **options) -> nn.Module:
    """timm model ``name`` for ``num_classes`` classes and ``input_shape`` (channels, height, width);
    ``options`` go to ``timm.create_model`` as they are (``drop_rate``, ``drop_path_rate``, ...)."""
    timm = _timm()
    if len(tuple(input_shape)) != 3:
        raise ConfigError(f"timm model {name!r} takes images (channels, height, width); this dataset's samples are "
                          f"{tuple(input_shape)} (use dataset=digits, fake, mnist, cifar10, ... or a kdrun model)")
    channels, height, width = input_shape
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown timm model {name!r}; {hint}(timm.list_models() lists all {len(timm.list_models())})")
    default_cfg = timm.models.get_pretrained_cfg(name)
    if default_cfg is not None and default_cfg.fixed_input_size:
        options.setdefault("img_size", (height, width))
    if pretrained_file:
        path = os.path.expanduser(str(pretrained_file))
        if not os.path.isfile(path):
            raise ConfigError(f"timm model {name!r}: pretrained_file={pretrained_file} does not exist")
        options["pretrained_cfg_overlay"] = {"file": path}
    # Built without weights first: an option or input size the model refuses fails before any download.
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels, **options)
    except TypeError as err:
        raise ConfigError(f"timm model {name!r} does not take these options ({_first_line(err)})") from None
    except _REFUSALS as err:
        raise ConfigError(_unfit(name, tuple(input_shape), err)) from None
    _check_input(model, name, tuple(input_shape))
    if pretrained or pretrained_file:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=channels, **options)
        except Exception as err:  # noqa: BLE001 - hub, URL and file errors come in many kinds; all mean no weights
            raise ConfigError(_no_weights(name, pretrained_file, err)) from None
    return model


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _unfit(name: str, input_shape: tuple[int, ...], err: Exception) -> str:
    return (f"timm model {name!r} cannot take inputs of shape {input_shape} ({_first_line(err)}); "
            "use larger images or a model that downsamples less")


def _no_weights(name: str, pretrained_file: str | None, err: Exception) -> str:
    reason = " ".join(str(err).split())[:300] or type(err).__name__  # hub errors span many lines
    if pretrained_file:
        return f"timm model {name!r}: cannot load pretrained_file={pretrained_file} ({reason})"
    return (f"timm model {name!r}: cannot get timm's pretrained weights ({reason}); without a network give a file "
            f"instead: checkpoint=<a kdrun checkpoint of this model> (e.g. teacher.checkpoint=runs/x/checkpoints/best.pt), "
            f"or pretrained_file=<timm's weights file for {name}> with pretrained=false")


@torch.no_grad()
def _check_input(model: nn.Module, name: str, input_shape: tuple[int, ...]) -> None:
    """One sample through the model: an image too small for its downsampling fails here, with the
    shape in the message, not in the middle of training."""
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_shape))
    except _REFUSALS as err:
        raise ConfigError(_unfit(name, input_shape, err)) from None
    finally:
        model.train(was_training)
