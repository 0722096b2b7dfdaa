"""A finished run's models, rebuilt from its directory: the distilled student (``checkpoints/best.pt``)
and, where the run had one, its teacher.

A run directory is data: its ``config.yaml`` is read as YAML and refused when it names a ``_target_``
that kdrun's own configs do not define (:func:`kdrun.resume.read_saved`), and checkpoints load with
``weights_only=True``. The dataset's shape and classes come from ``summary.json``, so nothing is
loaded but the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from kdrun import models
from kdrun.config import MODEL_LISTS, instantiate_user, register_resolvers
from kdrun.errors import ConfigError
from kdrun.models.weights import load_weights
from kdrun.resume import read_saved


def run_summary(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The run directory (resolved) and its ``summary.json``; ConfigError when it is not a run's."""
    path = Path(os.path.expanduser(str(run_dir))).resolve()
    if not path.is_dir():
        raise ConfigError(f"{run_dir}: there is no such directory; give a run directory (outputs/runs/<run>)")
    try:
        summary = json.loads((path / "summary.json").read_text())
    except OSError:
        raise ConfigError(f"{run_dir}: not a kdrun run directory (it has no summary.json)") from None
    except ValueError as err:
        raise ConfigError(f"{run_dir}: summary.json is not valid JSON ({err})") from None
    if not isinstance(summary.get("dataset"), dict) or not isinstance(summary.get("student"), dict):
        raise ConfigError(f"{run_dir}: summary.json has no student or dataset (status {summary.get('status')!r}): "
                          "the run stopped before it trained a student")
    return path, summary


def model_config(cfg: DictConfig, arch: str, where: str) -> DictConfig:
    """The config of the model ``arch``: the run's student, or one of the models its strategy listed
    (online peers, a progressive chain)."""
    candidates = [cfg.student] + [c for key in MODEL_LISTS for c in (cfg.strategy.get(key) or [])
                                  if OmegaConf.is_dict(c)]
    for candidate in candidates:
        if str(candidate.get("arch")) == arch:
            return candidate
    raise ConfigError(f"{where}: the run's config has no model {arch!r} (this run's student cannot be rebuilt)")


def rebuild_student(run_dir: str | Path) -> tuple[nn.Module, DictConfig, dict[str, Any]]:
    """The run's distilled student with the weights of ``checkpoints/best.pt`` (in eval mode), the
    run's saved config and its summary."""
    path, summary = run_summary(run_dir)
    register_resolvers()
    cfg = read_saved(path, str(run_dir))
    best = path / "checkpoints" / "best.pt"
    if not best.is_file():
        raise ConfigError(f"{run_dir}: there is no checkpoints/best.pt (the run kept no student)")
    arch = str(summary["student"]["arch"])
    model = _build(model_config(cfg, arch, str(run_dir)), summary)
    load_weights(model, best, "student checkpoint", arch=arch)
    return model.eval(), cfg, summary


def rebuild_teacher(run_dir: str | Path, cfg: DictConfig, summary: dict[str, Any]) -> tuple[nn.Module | None, str]:
    """The run's teacher from the checkpoint it used (given, or kdrun's cache), in eval mode; or None
    and why not."""
    teacher = summary.get("teacher")
    if not teacher:
        return None, "the run had no teacher"
    if str(teacher.get("arch")) != str(cfg.teacher.get("arch")):
        return None, f"the teacher {teacher.get('arch')} is not one model of the teacher config"
    checkpoint = teacher.get("path")
    if not checkpoint or not Path(checkpoint).is_file():
        return None, f"its checkpoint {checkpoint} is not on this machine"
    model = _build(cfg.teacher, summary)
    load_weights(model, checkpoint, "teacher checkpoint", arch=str(teacher["arch"]))
    return model.eval(), f"from {checkpoint}"


class Student(nn.Module):
    """A trained student ready for inference: ``model`` in eval mode, ``preprocess`` (raw inputs as the
    dataset gives them -> the model's input), ``predict`` (raw inputs -> class indices), and the run's
    ``summary`` and ``config``. Called on a tensor it is the model itself."""

    def __init__(self, model: nn.Module, preprocess, summary: dict[str, Any], config: DictConfig):
        super().__init__()
        self.model, self.preprocess, self.summary, self.config = model, preprocess, summary, config
        self.eval()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    @torch.no_grad()
    def predict(self, raw) -> torch.Tensor:
        if self.preprocess is None:
            raise ConfigError(f"dataset {self.config.dataset.get('name')} declares no preprocessing; call the model on tensors")
        device = next(self.model.parameters()).device
        return self.model(self.preprocess(raw).to(device)).argmax(-1)


def load_student(run_dir: str | Path) -> Student:
    """The distilled student of a finished run (``checkpoints/best.pt``), ready for inference: eval
    mode, on the CPU, with its dataset's preprocessing of raw inputs (``Student.predict``)."""
    model, cfg, summary = rebuild_student(run_dir)
    spec = cfg.dataset.get("preprocess")
    return Student(model, instantiate_user(spec, f"dataset {cfg.dataset.get('name')} preprocessing") if spec else None,
                   summary, cfg)


def _build(model_cfg: DictConfig, summary: dict[str, Any]) -> nn.Module:
    dataset = summary["dataset"]
    return models.build(model_cfg, int(dataset["num_classes"]), tuple(dataset["input_shape"]))
