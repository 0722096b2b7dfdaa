"""What a strategy gets to work with: config, data, device, run directory, model builder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig

from kdrun import models
from kdrun.data import DataBundle
from kdrun.engine.loop import FitResult, FitSpec, fit
from kdrun.engine.perf import Perf
from kdrun.reporting.metrics import MetricsLog


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    data: DataBundle
    device: torch.device
    metrics: MetricsLog
    perf: Perf = field(default_factory=Perf)

    def build_model(self, model_cfg: DictConfig, seed: int | None = None) -> nn.Module:
        """Build seeded with ``cfg.seed`` (or ``seed``), so the distilled and the scratch
        student start identical."""
        torch.manual_seed(int(self.cfg.seed) if seed is None else seed)
        return models.build(model_cfg, self.data.num_classes, self.data.input_shape)

    def fit(self, task, spec: FitSpec, label: str, ckpt_dir: Path, meta: dict, title: str | None = None) -> FitResult:
        return fit(
            task, self.data, spec, label=label, ckpt_dir=ckpt_dir, metrics=self.metrics,
            device=self.device, seed=int(self.cfg.seed), amp=bool(self.cfg.amp), meta=meta, title=title,
            perf=self.perf,
        )
