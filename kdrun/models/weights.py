"""Loading weights from a checkpoint file into a built model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from kdrun.engine.checkpoint import load, model_state
from kdrun.errors import CheckpointError
from kdrun.models.reference import in_model_layout


def load_weights(model: nn.Module, path: str | Path, what: str, arch: str | None = None) -> dict[str, Any]:
    """Load the weights of ``path`` into ``model``, in kdrun's key layout or a reference code's
    (RepDistiller's released CIFAR teachers), whichever the keys are in. ``arch`` names the model
    the user configured: an error names it, and the model the file was saved from when known."""
    obj = load(path, what)
    saved = obj.get("arch")
    try:
        model.load_state_dict(in_model_layout(model, model_state(obj), f"{what} {path}", arch))
    except CheckpointError as err:
        if saved and arch and saved != arch:
            raise CheckpointError(f"{what} {path} does not fit the configured model {arch}: the file holds a {saved}, "
                                  f"not a {arch}; give a {arch} checkpoint or set the model to {saved}") from err
        raise
    except (RuntimeError, AttributeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(":")
        # torch names the model's class (an internal one such as _Staged); name the user's model instead.
        first = first.replace(f" for {type(model).__name__}", f" for {arch}" if arch else "")
        mismatch = f"the file holds a {saved}, not a {arch}" if saved and arch and saved != arch else first
        raise CheckpointError(
            f"{what} {path} does not fit the configured model{f' {arch}' if arch else ''} ({mismatch}); "
            "check that its arch and dataset match"
        ) from err
    return obj
