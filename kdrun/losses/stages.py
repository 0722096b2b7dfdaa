"""Stages a term trains before the run's own training, and the views of the inputs a recipe reads.

Some methods train a part first: FT and KTAAD a paraphraser (an autoencoder of the teacher's
feature) while the student is held still, SSKD a self-supervision head on the frozen teacher,
AB and FSP the student itself on their loss alone (an initialisation, after which the run trains
it on the rest of the recipe, as RepDistiller's ``init`` does). A term says so with
:meth:`~kdrun.losses.base.Term.prestages`; :func:`kdrun.strategies.common.train` runs every
stage in its own checkpoint directory (``<the model's checkpoint dir>/<stage>/``) before the
model's own training, with the students' optimizer and schedule over the stage's epochs: a
finished stage is loaded from its ``final.pt``, an interrupted one resumes from its ``last.pt``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdrun.data.views import Views
from kdrun.errors import ConfigError
from kdrun.losses.base import StepOutputs, Term
from kdrun.losses.recipe import WeightedSum


@dataclass
class PreStage:
    """A stage trained before the run's own: ``recipe`` for ``epochs`` epochs in
    ``checkpoints/<name>/``; ``trains_student`` False holds the student still (eval mode, no
    gradients), so only the recipe's own modules learn."""

    name: str
    epochs: int
    recipe: WeightedSum
    trains_student: bool


class StageTerm(Term):
    """The objective ``stage`` of ``owner`` (a term of the run's recipe) as the term of a stage's
    recipe. The owner is a submodule, so the stage trains and checkpoints the owner's modules;
    the owner implements ``stage_setup(stage, probe)`` and ``stage_loss(stage, outputs)``."""

    needs_setup = True

    def __init__(self, owner: Term, stage: str, symbol: str, student_taps: tuple[str, ...], teacher_taps: tuple[str, ...]):
        super().__init__()
        self.owner, self.stage, self.symbol = owner, stage, symbol
        self.student_taps, self.teacher_taps = tuple(student_taps), tuple(teacher_taps)
        self.needs_teacher, self.views = owner.needs_teacher, owner.views

    def setup(self, probe: StepOutputs) -> None:
        self.owner.stage_setup(self.stage, probe)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return self.owner.stage_loss(self.stage, outputs)


def stage_of(owner: Term, name: str, epochs: int, weight: float, trains_student: bool, symbol: str,
             teacher_only: bool = False) -> PreStage:
    """The pre-stage ``name`` that trains ``owner``'s objective ``name`` at ``weight``; with
    ``teacher_only`` it reads no student tap."""
    student_taps = () if teacher_only else owner.student_taps
    term = StageTerm(owner, name, symbol, student_taps, owner.teacher_taps)
    return PreStage(name, int(epochs), WeightedSum({name: (weight, term)}), trains_student)


class Initialisation:
    """For a term used as an initialisation (AB, FSP; RepDistiller's ``init``): the student first
    trains on the term's :meth:`initialisation_loss` alone for ``init_epochs`` (stage
    ``<symbol>_init``, at the term's weight in the recipe), and the term then adds nothing to the
    run's own training. Mixed in before the term's base class."""

    init_epochs: int

    def prestages(self, weight: float) -> list[PreStage]:
        return [stage_of(self, f"{self.symbol.lower()}_init", self.init_epochs, weight, trains_student=True, symbol=self.symbol)]

    def stage_setup(self, stage: str, probe: StepOutputs) -> None:
        self.setup(probe)

    def stage_loss(self, stage: str, outputs: StepOutputs) -> torch.Tensor:
        return self.initialisation_loss(outputs)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        # Spent after its stage: the run's own training is the rest of the recipe.
        return outputs.student_logits.new_zeros(())


def epochs_text(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


def check_epochs(field: str, epochs) -> int:
    """A stage's epoch count from config (``field``, e.g. ``loss.ab.init_epochs``): an integer >= 1."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"{field}={epochs!r} must be an integer >= 1 (the epochs of its stage before the run's training)")
    return epochs


def prestages(recipe: WeightedSum) -> list[PreStage]:
    """The stages the recipe's terms train first, in recipe order; a term's stage trains at the
    term's weight in the recipe where the stage replaces its part (an initialisation)."""
    stages = [stage for name, term in recipe.terms.items() for stage in term.prestages(recipe.weights[name])]
    names = [stage.name for stage in stages]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"two terms of the recipe train a stage named {', '.join(repeated)}; keep one of them")
    return stages


def recipe_views(recipe: WeightedSum) -> Views | None:
    """The views of each training sample the recipe reads (None: the batch as loaded)."""
    asked = {term.views for term in recipe.terms.values() if term.views is not None}
    if len(asked) > 1:
        raise ConfigError(
            f"terms of the recipe ask for different views of the inputs ({', '.join(sorted(v.name for v in asked))}); "
            "a batch carries one kind, so combine at most one of these terms"
        )
    return next(iter(asked), None)
