"""Schedules: learning rates (pure functions of the step, wrapped in ``LambdaLR``) and the
``T``/``alpha`` knobs (pure functions of the epoch or stage, see :func:`knob_values`).

Learning-rate configs use ``_partial_: true``; the engine calls
``factory(optimizer, epochs=..., steps_per_epoch=...)`` and steps them once per batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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


# --- Knob schedules: T and alpha over epochs or stages -------------------------------

RAMPS = ("constant", "linear", "cosine", "exp", "step")


def ramp(kind: str, start: float, end: float, progress: float, steps: int = 1) -> float:
    """The value at ``progress`` in [0, 1] of a ramp from ``start`` (0) to ``end`` (1).

    ``linear`` and ``cosine`` interpolate; ``exp`` is geometric (both ends > 0);
    ``step`` moves in ``steps`` equal jumps, reaching ``end`` in the last of
    ``steps + 1`` equal stretches; ``constant`` stays at ``start``.
    """
    progress = min(max(progress, 0.0), 1.0)
    if kind == "constant":
        return start
    if kind == "linear":
        fraction = progress
    elif kind == "cosine":
        fraction = 0.5 * (1.0 - math.cos(math.pi * progress))
    elif kind == "exp":
        return start * (end / start) ** progress
    elif kind == "step":
        fraction = min(math.floor(progress * (steps + 1)), steps) / steps
    else:
        raise ValueError(f"unknown ramp {kind!r}; choose one of {', '.join(RAMPS)}")
    return start + (end - start) * fraction


def progress_of(index: int, count: int) -> float:
    """Position of item ``index`` (0-based) of ``count`` on [0, 1]: first 0, last 1."""
    return index / (count - 1) if count > 1 else 0.0


def knob_values(schedule: Mapping[str, Mapping], epoch: int, epochs: int, stage: int = 0, stages: int = 1) -> dict[str, float]:
    """Each knob's value in ``epoch`` (1-based) of ``epochs``, in ``stage`` (0-based) of ``stages``.

    ``schedule`` maps a knob (``T``, ``alpha``) to ``{kind, start, end, steps, per}``;
    ``per: epoch`` ramps over the epochs of each stage, ``per: stage`` over the stages
    of a multi-stage strategy (a progressive chain, born-again generations).
    """
    values = {}
    for knob, spec in schedule.items():
        position = progress_of(epoch - 1, epochs) if spec.get("per", "epoch") == "epoch" else progress_of(stage, stages)
        values[knob] = float(ramp(spec["kind"], float(spec["start"]), float(spec["end"]), position, int(spec.get("steps", 1))))
    return values


def describe_ramp(spec: Mapping) -> str:
    """A knob schedule as the recipe's formula shows it: ``linear 10->1``, ``step 8->2 in 3 steps per stage``."""
    text = f"{spec['kind']} {float(spec['start']):g}->{float(spec['end']):g}"
    if spec["kind"] == "step":
        text += f" in {int(spec.get('steps', 1))} steps"
    if spec.get("per", "epoch") == "stage":
        text += " per stage"
    return text
