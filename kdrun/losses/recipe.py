"""A recipe is a weighted sum of terms that logs each part and prints as a formula.

The top-level knobs ``T`` and ``alpha`` reach a recipe through its YAML (``T: ${T}``,
``weight: ${alpha}``). :class:`Knobs` finds out once which weight or term setting follows
which knob (by resolving the loss config at other knob values) and, per epoch, passes the
scheduled values to exactly those: weights it sets itself, term settings through
:meth:`Term.set_knob`, which a term allows for the settings it lists in ``knobs``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from kdrun.config import instantiate_user
from kdrun.engine.schedule import describe_ramp, knob_values
from kdrun.errors import ConfigError
from kdrun.losses.base import StepOutputs, Term

KNOBS = ("T", "alpha")
# Not term settings: where a term sits in the recipe.
PLACEMENT_KEYS = ("weight", "_target_", "start_epoch", "stop_epoch")


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
        # How a weight prints when it follows a scheduled knob ("alpha", "(1-alpha)"); set by Knobs.
        self.weight_text: dict[str, str] = {}
        self.schedule_text: dict[str, str] = {}
        self.knobs: Knobs | None = None

    def active(self, name: str, progress: float | None) -> bool:
        start, stop = self.windows[name]
        return progress is None or (progress >= start and (stop is None or progress < stop))

    @property
    def needs_teacher(self) -> bool:
        return any(term.needs_teacher for term in self.terms.values())

    @property
    def needs_index(self) -> bool:
        return any(term.needs_index for term in self.terms.values())

    @property
    def needs_setup(self) -> bool:
        return any(term.needs_setup for term in self.terms.values())

    @property
    def partial(self) -> bool:
        """Whether some term is active in some epochs only (its adapters then miss gradients in others)."""
        return any(start or stop is not None for start, stop in self.windows.values())

    def taps(self, side: str) -> list[str]:
        """Module paths the terms read from ``side`` ("student" or "teacher")."""
        paths = (path for term in self.terms.values() for path in getattr(term, f"{side}_taps"))
        return list(dict.fromkeys(paths))

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        for term in self.terms.values():
            term.check_models(student, teacher)

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        for term in self.terms.values():
            term.bind(student, teacher)

    def setup(self, probe: StepOutputs) -> None:
        for term in self.terms.values():
            term.setup(probe)

    def bind_data(self, train_samples: int) -> list[str]:
        """Tell the terms the training set's size; returns the settings that it makes pointless or
        clips (see :meth:`Term.data_warning`)."""
        for term in self.terms.values():
            term.bind_data(train_samples)
        found = (term.data_warning(name, train_samples) for name, term in self.terms.items())
        return [warning for warning in found if warning]

    def forward(self, outputs: StepOutputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        active = [name for name in self.terms if self.active(name, outputs.progress)]
        parts = {f"loss/{name}": self.terms[name](outputs) for name in active}
        weighted = [self.weights[name] * parts[f"loss/{name}"] for name in active]
        # Zero times the logits keeps a graph for backward when no term is active.
        total = sum(weighted[1:], weighted[0]) if weighted else outputs.student_logits.sum() * 0
        return total, parts

    def __str__(self) -> str:
        def window(name: str) -> str:
            start, stop = self.windows[name]
            if not start and stop is None:
                return ""
            return f"[epochs {start:g}-{'' if stop is None else f'{stop:g}'}]"

        formula = "L = " + " + ".join(
            f"{self.weight_text.get(name, f'{self.weights[name]:g}')}*{term.describe()}{window(name)}"
            for name, term in self.terms.items()
        )
        return formula + "".join(f"; {knob}: {text}" for knob, text in self.schedule_text.items())


def resolve_loss(cfg: DictConfig, **knobs: float) -> dict:
    """``cfg.loss`` resolved as if the top-level knobs (``T``, ``alpha``) had these values."""
    variant = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for knob, value in knobs.items():
        variant[knob] = value
    return OmegaConf.to_container(variant.loss, resolve=True)


def _probe_value(knob: str, value: float) -> float:
    """Another value of ``knob`` to see what follows it (alpha stays in [0, 1])."""
    if knob == "alpha":
        return 0.4321 if abs(value - 0.4321) > 1e-9 else 0.1234
    return value + 1.2345


def _weight_text(follows: dict[float, float]) -> str:
    """How a weight that follows alpha prints: ``alpha``, ``(1-alpha)`` or ``w(alpha)``."""
    if all(abs(w - a) < 1e-9 for a, w in follows.items()):
        return "alpha"
    if all(abs(w - (1 - a)) < 1e-9 for a, w in follows.items()):
        return "(1-alpha)"
    return "w(alpha)"


class Knobs:
    """Which weights and term settings follow ``T`` and ``alpha``, and their schedules in one
    stage (``stage`` of ``stages``) of a strategy."""

    def __init__(self, cfg: DictConfig, recipe: WeightedSum, stage: int = 0, stages: int = 1):
        self.cfg, self.recipe, self.stage, self.stages = cfg, recipe, stage, stages
        self.schedule = OmegaConf.to_container(cfg.schedule, resolve=True) if cfg.get("schedule") else {}
        current = {knob: float(cfg[knob]) for knob in KNOBS if knob in cfg}
        base = resolve_loss(cfg)
        self._applied = {knob: value for knob, value in current.items()}  # the knobs' values the recipe has now
        self.bindings: dict[tuple[str, str], str] = {}
        weight_follows: dict[str, dict[float, float]] = {}
        for knob, value in current.items():
            probe = _probe_value(knob, value)
            moved = resolve_loss(cfg, **{knob: probe})
            for name, spec in base.items():
                for key, setting in spec.items():
                    if key in PLACEMENT_KEYS[1:] or moved.get(name, {}).get(key) == setting:
                        continue
                    self.bindings[(name, key)] = knob
                    if key == "weight":
                        weight_follows[name] = {value: float(setting), probe: float(moved[name][key])}
        for (name, key), knob in self.bindings.items():
            if not self.scheduled(knob):
                continue
            if key == "weight":
                recipe.weight_text[name] = _weight_text(weight_follows[name])
                recipe.schedule_text[knob] = self.text(knob)
            elif key not in recipe.terms[name].knobs:
                raise ConfigError(
                    f"schedule.{knob} changes loss.{name}.{key} during training, but {recipe.terms[name].symbol} "
                    f"cannot change {key} once built (settings it can change: {', '.join(recipe.terms[name].knobs) or 'none'}); "
                    f"set loss.{name}.{key} to a number or keep schedule.{knob} constant"
                )
            else:
                recipe.terms[name].scheduled[key] = self.text(knob)
        recipe.knobs = self

    @property
    def used(self) -> set[str]:
        """The knobs that some weight or term setting follows."""
        return set(self.bindings.values())

    def scheduled(self, knob: str) -> bool:
        spec = self.schedule.get(knob)
        return bool(spec) and spec.get("kind", "constant") != "constant" and spec["start"] != spec["end"]

    def text(self, knob: str) -> str:
        spec = self.schedule[knob]
        return describe_ramp(spec)

    def values(self, epoch: int, epochs: int) -> dict[str, float]:
        """Each scheduled knob's value in ``epoch`` (1-based) of ``epochs``."""
        return knob_values(self.schedule, epoch, epochs, self.stage, self.stages)

    def apply(self, values: Mapping[str, float]) -> None:
        """Set the weights and term settings that follow the knobs to their values at ``values``."""
        # Resolving the config takes milliseconds (Hydra's interpolation grammar): skip it when the
        # values are those the recipe already has (every epoch of a run without schedules).
        if not values or not self.bindings or all(self._applied.get(k) == v for k, v in values.items()):
            return
        self._applied.update(values)
        spec = resolve_loss(self.cfg, **values)
        for (name, key), _ in self.bindings.items():
            if key == "weight":
                self.recipe.weights[name] = float(spec[name]["weight"])
            elif key in self.recipe.terms[name].knobs:
                self.recipe.terms[name].set_knob(key, spec[name][key])


def build_recipe(spec: DictConfig | Mapping) -> WeightedSum:
    """Instantiate ``{name: {weight, _target_, ...}}`` into a :class:`WeightedSum`."""
    spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    terms, windows = {}, {}
    for name, term_cfg in spec.items():
        term_cfg = dict(term_cfg)
        if "weight" not in term_cfg or "_target_" not in term_cfg:
            raise ConfigError(f"loss.{name} needs a 'weight' and a '_target_' (got keys {sorted(term_cfg)})")
        weight = term_cfg.pop("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0 or weight == float("inf"):
            raise ConfigError(f"loss.{name}.weight={weight!r} must be a finite number >= 0")
        start, stop = term_cfg.pop("start_epoch", 0) or 0, term_cfg.pop("stop_epoch", None)
        if stop is not None and stop <= start:
            raise ConfigError(f"loss.{name}: stop_epoch={stop} must be after start_epoch={start}")
        windows[name] = (float(start), None if stop is None else float(stop))
        terms[name] = (weight, instantiate_user(term_cfg, f"loss term {name}"))
    return WeightedSum(terms, windows)


def recipe_from(cfg: DictConfig, stage: int = 0, stages: int = 1) -> WeightedSum:
    """The run's recipe (``cfg.loss``) with its knobs bound to ``cfg``'s ``T``/``alpha`` schedules."""
    recipe = build_recipe(cfg.loss)
    Knobs(cfg, recipe, stage, stages)
    return recipe


CE_ONLY = {"ce": {"weight": 1.0, "_target_": "kdrun.losses.logits.CrossEntropy"}}
