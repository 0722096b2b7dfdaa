"""What a strategy is and what it returns.

A strategy decides who teaches whom. It declares what it needs of the recipe
(:attr:`Strategy.needs_distillation`, :attr:`Strategy.logit_terms_only`, checked once in
:func:`check_recipe_fits`), runs, and returns a :class:`StrategyResult`: every model it
trained or was given, with its metrics and checkpoint. It writes no summary: ``run.py``
runs the scratch baseline once and :mod:`kdrun.reporting.summary` builds ``summary.json``
and the headline from the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from kdrun.data import DataBundle
from kdrun.errors import ConfigError
from kdrun.losses import WeightedSum


@dataclass
class TrainedModel:
    """A model a strategy trained or was given.

    ``name`` is its key in ``summary.json``'s ``models`` and in ``metrics.jsonl``; ``role``
    what it is in the strategy (teacher, student, peer, generation, assistant, ensemble,
    auxiliary, scratch); ``test`` its test metrics (the task's names); ``best_val`` its best
    validation value of the task's selection metric; ``info`` further keys for its entry.
    """

    name: str
    role: str
    arch: str
    model: nn.Module
    test: dict[str, float]
    best_val: float | None = None
    source: str = "trained"  # trained | cache | checkpoint | ensemble
    checkpoint: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Baseline:
    """How the scratch baseline is trained: ``model_cfg`` on labels alone, on ``data`` (None: the
    run's data), with ``variant`` describing how that data differs (part of the cache key)."""

    model_cfg: DictConfig
    data: DataBundle | None = None
    variant: dict | None = None
    trained_on: str | None = None


@dataclass
class StrategyResult:
    student: TrainedModel
    models: dict[str, TrainedModel]
    teacher: TrainedModel | None = None
    recipe: WeightedSum | None = None
    baseline: Baseline | None = None
    # Facts of the strategy that are not models (e.g. how many samples kept their labels).
    details: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """Subclasses set ``name`` and the recipe requirements, and implement :meth:`run`."""

    name = "strategy"
    uses_recipe = True
    # Whether the run also trains the student on labels alone (scratch), to measure the gain.
    has_baseline = True
    # The recipe must have a term that learns from a teacher (KD, DKD, ...): e.g. born-again.
    needs_distillation = False
    # Peers or heads teach: terms may read logits only (no taps, no per-sample memories).
    logit_terms_only = False

    def check(self, cfg: DictConfig) -> None:
        """Refuse bad settings of ``cfg.strategy`` with a ConfigError (run before anything is written)."""

    def run(self, ctx) -> StrategyResult:
        raise NotImplementedError


def model_list(cfg: DictConfig, key: str, example: str, at_least: int = 0) -> None:
    """``strategy.<key>`` must list model options (at least ``at_least``)."""
    listed = cfg.strategy.get(key)
    if not OmegaConf.is_list(listed):
        raise ConfigError(f"strategy.{key}={listed!r} must be a list of model options, e.g. strategy.{key}={example}")
    if len(listed) < at_least:
        raise ConfigError(f"strategy.{key} lists {len(listed)} model(s); it needs at least {at_least}, e.g. strategy.{key}={example}")


def number_in(cfg: DictConfig, key: str, low: float, high: float | None = None, kind=float, open_low: bool = False,
              open_high: bool = False, why: str = "") -> float:
    """``strategy.<key>`` as a number in its range, or a ConfigError naming it."""
    value = cfg.strategy.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)) \
            or not math.isfinite(value) or value < low or (open_low and value == low) \
            or (high is not None and (value > high or (open_high and value == high))):
        bounds = f"{'(' if open_low else '['}{low:g}, {'inf' if high is None else f'{high:g}'}{')' if open_high or high is None else ']'}"
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"strategy.{key}={value!r} must be {what} in {bounds}{why}")
    return value


def check_recipe_fits(strategy: Strategy, recipe: WeightedSum) -> None:
    """The strategy's declared requirements against the configured recipe, before any work."""
    if strategy.needs_distillation and not recipe.needs_teacher:
        raise ConfigError(f"strategy={strategy.name} needs a recipe with a distillation term (e.g. loss=kd); got {recipe}")
    if strategy.logit_terms_only and (recipe.taps("student") or recipe.taps("teacher") or recipe.needs_index):
        raise ConfigError(
            f"strategy={strategy.name} works with logit-based recipes (ce, kd, kd_ls, dkd, dist); "
            f"this recipe reads features or sample indices: {recipe}"
        )
