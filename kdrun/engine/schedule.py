"""Learning-rate schedules: pure functions of the step, wrapped in ``LambdaLR``.

Configs build them with ``_partial_: true``; the engine calls
``factory(optimizer, epochs=..., steps_per_epoch=...)``. They step once per batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_factor(step: int, total_steps: int, warmup_steps: int = 0, min_factor: float = 0.0) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def multistep_factor(step: int, milestones: Sequence[int], gamma: float) -> float:
    return gamma ** sum(step >= milestone for milestone in milestones)


def cosine(optimizer: Optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0, min_factor: float = 0.0) -> LambdaLR:
    total, warmup = epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)
    return LambdaLR(optimizer, lambda step: cosine_factor(step, total, warmup, min_factor))


def multistep(optimizer: Optimizer, epochs: int, steps_per_epoch: int, milestones: Sequence[int] = (), gamma: float = 0.1) -> LambdaLR:
    """Milestones are epochs, as papers give them (e.g. 150, 180, 210 of 240)."""
    steps = [int(m) * steps_per_epoch for m in milestones]
    return LambdaLR(optimizer, lambda step: multistep_factor(step, steps, gamma))


def constant(optimizer: Optimizer, epochs: int, steps_per_epoch: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: 1.0)
