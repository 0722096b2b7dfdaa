"""Atomic checkpoint files, loaded with ``weights_only=True``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kdrun.errors import CheckpointError


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file and rename, so an earlier checkpoint is never half-overwritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises many kinds on garbage; all mean "corrupt"
        lines = str(err).strip().splitlines()
        reason = lines[0][:100] if lines else type(err).__name__
        raise CheckpointError(f"{what} {path} is corrupt or not a PyTorch checkpoint ({reason})") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def model_state(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint: kdrun's ``{"model": ...}`` or a bare state dict.

    Keys from a ``torch.compile``d model carry an ``_orig_mod.`` prefix, and from
    DataParallel/DDP a ``module.`` prefix; both are stripped so any of them loads.
    """
    state = obj.get("model", obj.get("state_dict", obj))
    cleaned = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def load_weights(model: torch.nn.Module, path: str | Path, what: str) -> dict[str, Any]:
    """Load the weights of ``path`` into ``model``, in kdrun's key layout or a reference code's
    (RepDistiller's released CIFAR teachers), whichever the keys are in."""
    # Imported here: kdrun.models imports kdrun.config, which imports this module.
    from kdrun.models.reference import in_model_layout

    obj = load(path, what)
    try:
        model.load_state_dict(in_model_layout(model, model_state(obj), f"{what} {path}"))
    except (RuntimeError, AttributeError) as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(
            f"{what} {path} does not fit the configured model ({first[0] if first else err}); "
            "check that its arch and dataset match"
        ) from err
    return obj
