"""The contract between a loss term and the code that runs the models."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class StepOutputs:
    """Everything a term may read for one batch: logits, labels and tapped features."""

    student_logits: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    index: torch.Tensor | None = None
    # Training progress in epochs (e.g. 2.5 = half-way through the third epoch), for
    # terms with warm-ups or stages; None outside training (probe batches).
    progress: float | None = None
    # Which samples carry a real label (unlabeled-data strategies); None = all of them.
    # ``labels`` then holds the teacher's pseudo-labels for the others.
    labeled: torch.Tensor | None = None


class Term(nn.Module):
    """One loss term.

    Subclasses set ``symbol`` (how the term prints in the recipe's formula),
    ``needs_teacher``, and the module paths they read from each model
    (``student_taps`` / ``teacher_taps``; ``last_stage`` names a model's deepest
    ``stageN``, see :mod:`kdrun.features`). Terms with adapters (regressors,
    projections, memories) create them in :meth:`setup`, which receives the
    outputs of one probe batch before the optimizer is built. ``needs_index``
    asks the data pipeline for each training sample's index (``outputs.index``).
    """

    symbol = "TERM"
    needs_teacher = True
    needs_index = False
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()

    def describe(self) -> str:
        return self.symbol

    def setup(self, probe: StepOutputs) -> None:
        """Build adapters from the shapes in ``probe``; most terms have none."""

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        raise NotImplementedError
