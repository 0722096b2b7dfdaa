"""Config resolvers and validation of user-facing values (one clear error, before any work)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdrun.engine import checkpoint
from kdrun.errors import ConfigError, KdrunError


def register_resolvers() -> None:
    """Resolvers used in conf/: ``${one_minus:${alpha}}`` and ``${if_set:${resume},a,b}``."""
    if not OmegaConf.has_resolver("one_minus"):
        OmegaConf.register_new_resolver("one_minus", lambda x: round(1.0 - float(x), 12))
    if not OmegaConf.has_resolver("if_set"):
        OmegaConf.register_new_resolver("if_set", lambda value, when_set, otherwise: otherwise if value in (None, "") else when_set)


def instantiate_user(cfg, what: str, **kwargs):
    """``hydra.utils.instantiate`` for user-chosen parts: kdrun's own errors come out
    unwrapped, anything else the target raised becomes a ConfigError naming ``what``."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, KdrunError):
            raise cause from None
        raise ConfigError(f"cannot build {what}: {cause or err}") from err


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was asked for but CUDA is not available here; use device=auto or device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def _number(cfg: DictConfig, key: str, kind=float):
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"{key}={value!r} must be {'an integer' if kind is int else 'a number'}")
    return value


def validate(cfg: DictConfig) -> None:
    """Check every value a user is likely to get wrong; raise ConfigError naming field, value and what is allowed."""
    alpha = _number(cfg, "alpha")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha} is outside [0, 1] (the weight of the distillation term)")
    T = _number(cfg, "T")
    if T <= 0:
        raise ConfigError(f"T={T} must be > 0 (the softmax temperature)")
    for key in ("epochs", "teacher_training.epochs"):
        if _number(cfg, key, int) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be >= 1")
    _number(cfg, "seed", int)
    if _number(cfg, "dataset.batch_size", int) < 1:
        raise ConfigError(f"dataset.batch_size={cfg.dataset.batch_size} must be >= 1")
    val_fraction = _number(cfg, "dataset.val_fraction")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"dataset.val_fraction={val_fraction} must be in [0, 1)")
    if cfg.grad_clip is not None and _number(cfg, "grad_clip") <= 0:
        raise ConfigError(f"grad_clip={cfg.grad_clip} must be > 0, or null for no clipping")
    if cfg.scratch not in (True, False, "auto"):
        raise ConfigError(f"scratch={cfg.scratch!r} must be true, false or auto")
    resolve_device(str(cfg.device))
    given = cfg.teacher.get("checkpoint")
    if given:
        if not Path(os.path.expanduser(str(given))).is_file():
            raise ConfigError(f"teacher.checkpoint={given} does not exist")
        checkpoint.load(given, "teacher.checkpoint")  # corrupt files fail here, before any work
