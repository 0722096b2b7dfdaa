"""The contract between a loss term and the code that runs the models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from kdrun.errors import ConfigError
from kdrun.features import GROUP_ALIASES
from kdrun.tasks.base import IGNORE

if TYPE_CHECKING:
    from kdrun.data.views import Views
    from kdrun.losses.stages import PreStage


@dataclass
class StepOutputs:
    """Everything a term may read for one batch.

    ``student_logits`` / ``teacher_logits`` are the *scored* items of the task, ``(items,
    classes)``: one row per sample of a classifier, one per real token of a language model.
    ``labels`` holds one label per item, ``IGNORE`` where an item has none (hidden labels of
    the unlabeled strategy). Tapped features keep the model's own layout; for sequences
    ``mask`` marks the real positions ``(batch, length)``.
    """

    student_logits: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    index: torch.Tensor | None = None
    # Training progress in epochs (e.g. 2.5 = half-way through the third epoch), for
    # terms with warm-ups or stages; None outside training (probe batches).
    progress: float | None = None
    mask: torch.Tensor | None = None
    # Whether some labels are IGNORE (known from the data, so no term has to look).
    partial_labels: bool = False

    def targets(self) -> torch.Tensor:
        """A class per item for terms that need one (DKD's target, CRD's negatives): the label,
        or where it is hidden, the teacher's prediction."""
        if not self.partial_labels or self.teacher_logits is None:
            return self.labels
        return torch.where(self.labels != IGNORE, self.labels, self.teacher_logits.argmax(1))


def tap_list(value: str | Sequence[str]) -> tuple[str, ...]:
    """Taps from config: one module path, or a list of them."""
    return (value,) if isinstance(value, str) else tuple(value)


def one_tap(symbol: str, student_taps, teacher_taps) -> tuple[tuple[str], tuple[str]]:
    """For terms that read one tap per side: the configured ``student_taps``/``teacher_taps``."""
    student, teacher = tap_list(student_taps), tap_list(teacher_taps)
    if len(student) != 1 or len(teacher) != 1 or {*student, *teacher} & set(GROUP_ALIASES):
        raise ConfigError(
            f"{symbol} reads one module per model; got student_taps={list(student)}, teacher_taps={list(teacher)}"
        )
    return student, teacher


class Term(nn.Module):
    """One loss term.

    Subclasses set ``symbol`` (how the term prints in the recipe's formula),
    ``needs_teacher``, and the module paths they read from each model
    (``student_taps`` / ``teacher_taps``, spelled so in every loss YAML; ``last_stage``
    names a model's deepest ``stageN``, see :mod:`kdrun.features`). Terms with adapters
    (regressors, projections, memories) create them in :meth:`setup`, which receives
    the outputs of one probe batch before the optimizer is built, and say so with
    ``needs_setup``. ``needs_index`` asks the data pipeline for each training sample's
    index (``outputs.index``).

    ``knobs`` names the constructor settings that may change during training (a schedule of
    ``T`` reaches ``SoftTargets.T`` through ``T: ${T}`` in the YAML). The recipe passes new
    values with :meth:`set_knob`; a setting not listed there cannot follow a schedule.

    ``views`` asks the data pipeline for transformed copies of each training sample
    (:mod:`kdrun.data.views`), and :meth:`prestages` names stages trained before the run's
    own training (a paraphraser, an initialisation; :mod:`kdrun.losses.stages`).
    """

    symbol = "TERM"
    needs_teacher = True
    needs_index = False
    needs_setup = False
    knobs: tuple[str, ...] = ()
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    views: Views | None = None

    def __init__(self):
        super().__init__()
        # Knob settings that follow a schedule, as the formula shows them ("linear 10->1").
        self.scheduled: dict[str, str] = {}

    def set_knob(self, name: str, value: float) -> None:
        if name not in self.knobs:
            raise ConfigError(f"{self.symbol} cannot change {name} during training (its knobs: {', '.join(self.knobs) or 'none'})")
        setattr(self, name, type(getattr(self, name))(value))

    def show(self, name: str, shown_as: str | None = None, fmt: str = "{:g}") -> str:
        """``T=4``, or ``T: linear 10->1`` when the setting follows a schedule."""
        label = shown_as or name
        if name in self.scheduled:
            return f"{label}: {self.scheduled[name]}"
        return f"{label}={fmt.format(getattr(self, name))}"

    def describe(self) -> str:
        return self.symbol

    def bind_data(self, train_samples: int) -> None:
        """The training set's size, known once the data is (e.g. for memories with a row per sample)."""

    def data_warning(self, name: str, train_samples: int) -> str | None:
        """A setting of this term (configured as ``loss.<name>``) that the data makes pointless or
        clips, e.g. more negatives than training samples; None when all is well."""
        return None

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        """Refuse, before anything trains, models this term cannot read (e.g. tap groups of unequal length)."""

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        """Learn what the two models are before any tap is hooked (a layer mapping needs both
        models' depths); most terms need nothing."""

    def setup(self, probe: StepOutputs) -> None:
        """Build adapters from the shapes in ``probe``; most terms have none."""

    def prestages(self, weight: float) -> list[PreStage]:
        """Stages this term trains before the run's own training (``weight``: the term's weight
        in the recipe, for a stage that takes the term's place); most terms have none."""
        return []

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        raise NotImplementedError
