"""What a strategy gets to work with: config, data, task, device, run directory, model builder."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig

from kdrun import models
from kdrun.data import DataBundle
from kdrun.engine.loop import FitResult, FitRun, FitSpec, fit
from kdrun.engine.perf import Perf
from kdrun.reporting.metrics import MetricsLog
from kdrun.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    data: DataBundle
    task: Task
    device: torch.device
    metrics: MetricsLog
    perf: Perf = field(default_factory=Perf)
    warned: set[str] = field(default_factory=set)

    def warn_once(self, message: str) -> None:
        """A warning printed once per run (a multi-stage strategy meets the same setting in every stage)."""
        if message not in self.warned:
            self.warned.add(message)
            log.warning("%s", message)

    def build_model(self, model_cfg: DictConfig, seed: int | None = None) -> nn.Module:
        """Build seeded with ``cfg.seed`` (or ``seed``), so the distilled and the scratch
        student start identical."""
        torch.manual_seed(int(self.cfg.seed) if seed is None else seed)
        return models.build(model_cfg, self.data.num_classes, self.data.input_shape)

    def fit(self, distiller, spec: FitSpec, name: str, ckpt_dir: Path, meta: dict, title: str | None = None,
            data: DataBundle | None = None, stream: str | None = None, metrics: MetricsLog | None = None) -> FitResult:
        run = FitRun(name=name, ckpt_dir=ckpt_dir, metrics=metrics or self.metrics, device=self.device,
                     seed=int(self.cfg.seed), amp=bool(self.cfg.amp), meta=meta, title=title, stream=stream, perf=self.perf)
        return fit(distiller, data or self.data, spec, run)
