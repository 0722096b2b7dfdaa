"""A recipe is a weighted sum of terms that logs each part and prints as a formula."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from kdrun.config import instantiate_user
from kdrun.errors import ConfigError
from kdrun.losses.base import StepOutputs, Term


class WeightedSum(nn.Module):
    """``sum_i weight_i * term_i``; a term may be active only in ``[start_epoch, stop_epoch)``
    (e.g. FitNets' hint-only first stage: ``loss.ce.start_epoch=H loss.kd.start_epoch=H``)."""

    def __init__(self, terms: Mapping[str, tuple[float, Term]], windows: Mapping[str, tuple[float, float | None]] | None = None):
        super().__init__()
        if not terms:
            raise ConfigError("the loss recipe has no terms; pick one with loss=kd (or loss=ce)")
        self.weights = {name: float(weight) for name, (weight, _) in terms.items()}
        self.terms = nn.ModuleDict({name: term for name, (_, term) in terms.items()})
        self.windows = {name: (windows or {}).get(name, (0.0, None)) for name in terms}

    def active(self, name: str, progress: float | None) -> bool:
        start, stop = self.windows[name]
        return progress is None or (progress >= start and (stop is None or progress < stop))

    @property
    def needs_teacher(self) -> bool:
        return any(term.needs_teacher for term in self.terms.values())

    @property
    def needs_index(self) -> bool:
        return any(term.needs_index for term in self.terms.values())

    def taps(self, side: str) -> list[str]:
        """Module paths the terms read from ``side`` ("student" or "teacher")."""
        paths = (path for term in self.terms.values() for path in getattr(term, f"{side}_taps"))
        return list(dict.fromkeys(paths))

    def setup(self, probe: StepOutputs) -> None:
        for term in self.terms.values():
            term.setup(probe)

    def forward(self, outputs: StepOutputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        active = [name for name in self.terms if self.active(name, outputs.progress)]
        parts = {f"loss/{name}": self.terms[name](outputs) for name in active}
        weighted = [self.weights[name] * parts[f"loss/{name}"] for name in active]
        # Zero times the logits keeps a graph for backward when no term is active.
        total = sum(weighted[1:], weighted[0]) if weighted else outputs.student_logits.sum() * 0
        return total, parts

    def retune(self, spec: Mapping[str, Mapping]) -> None:
        """Take new weights and numeric settings (e.g. a scheduled ``T``) from a resolved
        loss config of the same terms; see :func:`recipe_at`."""
        for name, term_cfg in spec.items():
            if name not in self.terms:
                continue
            self.weights[name] = float(term_cfg["weight"])
            term = self.terms[name]
            for key, value in term_cfg.items():
                current = getattr(term, key, None)
                if key in _PLACEMENT_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if isinstance(current, (int, float)) and not isinstance(current, bool):
                    setattr(term, key, type(current)(value))

    def __str__(self) -> str:
        def window(name: str) -> str:
            start, stop = self.windows[name]
            if not start and stop is None:
                return ""
            return f"[epochs {start:g}-{'' if stop is None else f'{stop:g}'}]"

        return "L = " + " + ".join(
            f"{self.weights[name]:g}*{term.describe()}{window(name)}" for name, term in self.terms.items()
        )


_PLACEMENT_KEYS = ("weight", "_target_", "start_epoch", "stop_epoch")


def recipe_at(cfg: DictConfig, **knobs: float) -> dict:
    """``cfg.loss`` resolved as if the top-level knobs (``T``, ``alpha``) had these values,
    so a scheduled knob reaches every place a recipe refers to it (``${T}``, ``${alpha}``,
    ``${one_minus:${alpha}}``)."""
    variant = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for knob, value in knobs.items():
        variant[knob] = value
    return OmegaConf.to_container(variant.loss, resolve=True)


def build_recipe(cfg: DictConfig | Mapping) -> WeightedSum:
    """Instantiate ``{name: {weight, _target_, ...}}`` into a :class:`WeightedSum`."""
    spec = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    terms, windows = {}, {}
    for name, term_cfg in spec.items():
        term_cfg = dict(term_cfg)
        if "weight" not in term_cfg or "_target_" not in term_cfg:
            raise ConfigError(f"loss.{name} needs a 'weight' and a '_target_' (got keys {sorted(term_cfg)})")
        weight = term_cfg.pop("weight")
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"loss.{name}.weight={weight!r} must be a number >= 0")
        start, stop = term_cfg.pop("start_epoch", 0) or 0, term_cfg.pop("stop_epoch", None)
        if stop is not None and stop <= start:
            raise ConfigError(f"loss.{name}: stop_epoch={stop} must be after start_epoch={start}")
        windows[name] = (float(start), None if stop is None else float(stop))
        terms[name] = (weight, instantiate_user(term_cfg, f"loss term {name}"))
    return WeightedSum(terms, windows)


CE_ONLY = {"ce": {"weight": 1.0, "_target_": "kdrun.losses.logits.CrossEntropy"}}
