"""State dicts in another code base's key names, brought to kdrun's.

A model that can read a reference layout has ``reference_key(key) -> key`` (the CIFAR families
of the CRD paper's code read RepDistiller's, so its released ``ckpt_epoch_240.pth`` teachers
load). :func:`in_model_layout` picks the layout by the keys alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kdrun.errors import CheckpointError

# Older PyTorch (RepDistiller's teachers were trained with 0.4) saved BN layers without it;
# ``load_state_dict`` fills it in, so it takes no part in matching layouts.
OPTIONAL_SUFFIX = "num_batches_tracked"
SHOWN_KEYS = 4


def _required(keys) -> set[str]:
    return {key for key in keys if not key.endswith(OPTIONAL_SUFFIX)}


def _few(keys: set[str]) -> str:
    shown = ", ".join(sorted(keys)[:SHOWN_KEYS])
    more = len(keys) - SHOWN_KEYS
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def in_model_layout(model: nn.Module, state: dict[str, torch.Tensor], what: str, arch: str | None = None) -> dict[str, torch.Tensor]:
    """``state`` keyed as ``model.state_dict()`` is: as given when it already is, else converted
    with ``model.reference_key``; a CheckpointError naming missing/unexpected keys when neither fits."""
    own = _required(model.state_dict())
    # Per layout: the key each of the file's keys has in the model's names.
    renamings = {"kdrun's": {key: key for key in state}}
    reference_key = getattr(model, "reference_key", None)
    if reference_key is not None:
        renamings["RepDistiller's"] = {key: reference_key(key) for key in state}
    for renaming in renamings.values():
        if len(set(renaming.values())) == len(state) and _required(renaming.values()) == own:
            return {renaming[key]: value for key, value in state.items()}
    # Report against the layout the keys come closest to: missing keys in the model's names,
    # unexpected ones as the file has them.
    name, renaming = min(renamings.items(), key=lambda item: len(_required(item[1].values()) ^ own))
    missing = own - _required(renaming.values())
    unexpected = {key for key, renamed in renaming.items() if renamed not in own and not renamed.endswith(OPTIONAL_SUFFIX)}
    which = f"match neither {' nor '.join(renamings)} layout" if len(renamings) > 1 else "do not match kdrun's layout"
    raise CheckpointError(
        f"{what} does not fit the configured model{f' {arch}' if arch else ''}: its keys {which} "
        f"(against {name}: missing {_few(missing) or 'none'}; unexpected {_few(unexpected) or 'none'}); "
        "check that its arch matches"
    )
