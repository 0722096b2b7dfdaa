"""Model construction: a model config is a factory ``_target_`` plus its options.

Every factory is called as ``factory(num_classes=..., input_shape=..., **options)``
and returns a module whose forward gives logits. ``arch`` (a display name),
``checkpoint`` (teacher weights) and ``init`` (``teacher``: a student starts from the teacher's
layers, see :func:`kdrun.models.language.init_from_teacher`) are kdrun's own keys and are not
passed on.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from kdrun.config import instantiate_user

OWN_KEYS = ("arch", "checkpoint", "init")


def factory_options(cfg: DictConfig) -> dict[str, Any]:
    """The model config without kdrun's own keys: what identifies the architecture."""
    options = OmegaConf.to_container(cfg, resolve=True)
    return {key: value for key, value in options.items() if key not in OWN_KEYS}


def build(cfg: DictConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return instantiate_user(
        factory_options(cfg), f"model {cfg.get('arch')}", num_classes=num_classes, input_shape=tuple(input_shape)
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
