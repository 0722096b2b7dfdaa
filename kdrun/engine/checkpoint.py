"""Atomic checkpoint files, loaded with ``weights_only=True``, and the loop's checkpointer."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kdrun.engine import distributed
from kdrun.errors import CheckpointError
from kdrun.tasks import Metric

log = logging.getLogger(__name__)


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file and rename, so an earlier checkpoint is never half-overwritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a directory; give the checkpoint file in it (e.g. {path}/best.pt)")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises many kinds on garbage; all mean "corrupt"
        lines = str(err).strip().splitlines()
        reason = lines[0] if lines else type(err).__name__
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


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.cpu() for key, value in model.state_dict().items()}


class Checkpointer:
    """``last.pt`` (every epoch end, enough to resume) and ``best.pt`` (the student at its best
    validation ``metric``) in ``directory``; ``meta`` (arch, config, ...) goes into both.

    Only rank 0 writes; every rank reads what rank 0 decided (resume or start).
    """

    def __init__(self, directory: Path, meta: dict[str, Any], metric: Metric, distiller: nn.Module, optimizer, scheduler, scaler):
        self.last_path, self.best_path = Path(directory) / "last.pt", Path(directory) / "best.pt"
        self.meta, self.metric = dict(meta), metric
        self.distiller, self.optimizer, self.scheduler, self.scaler = distiller, optimizer, scheduler, scaler
        self.epoch, self.best, self.history = 0, None, []

    def resume(self, what: str) -> bool:
        """Carry on from ``last.pt`` when it exists; else write epoch 0's, so an interrupt in the
        first epoch still leaves a resumable state. True when resumed."""
        if not distributed.broadcast_object(self.last_path.exists()):
            self.save_last()
            return False
        state = load(self.last_path, f"{what} checkpoint")
        self.distiller.load_state_dict(state["distiller"])
        for part in ("optimizer", "scheduler", "scaler"):
            getattr(self, part).load_state_dict(state[part])
        self.epoch, self.best, self.history = state["epoch"], state["best_val"], state["history"]
        return True

    def save_last(self) -> None:
        if not distributed.is_main():
            return
        save_atomic({
            "distiller": self.distiller.state_dict(), **self.meta,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "best_val": self.best,
            "best_metric": self.metric.name, "history": self.history, "rng": {"torch": torch.get_rng_state()},
        }, self.last_path)

    def end_epoch(self, epoch: int, student: nn.Module, val: dict[str, float], train: dict[str, float]) -> None:
        """Record the epoch, keep the student in ``best.pt`` when its validation metric improved, write ``last.pt``."""
        self.epoch = epoch
        value = val[self.metric.name]
        self.history.append({"epoch": epoch, "train": train, "val": val})
        if self.metric.better(value, self.best):
            self.best = value
            if distributed.is_main():
                save_atomic({"model": student.state_dict(), **self.meta, "epoch": epoch,
                             f"val_{self.metric.name}": value}, self.best_path)
        self.save_last()
