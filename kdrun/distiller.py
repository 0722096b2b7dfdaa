"""What one training step computes: a student learning from a frozen teacher (or from labels).

:class:`Distiller` is an ``nn.Module``: the student and the recipe (with its adapters) are its
submodules, so ``to``, ``train``, ``parameters`` and ``state_dict`` are PyTorch's own and DDP
wraps the distiller itself. The frozen teacher is held outside ``_modules`` (by
:class:`TeacherOutputs`), so it is never in the optimizer, the state dict or DDP.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from kdrun.errors import ConfigError
from kdrun.features import FeatureTaps, check_paths
from kdrun.losses import StepOutputs, WeightedSum
from kdrun.losses.stages import recipe_views
from kdrun.tasks import Batch, Task

log = logging.getLogger(__name__)


def freeze(model: nn.Module) -> nn.Module:
    """A teacher never learns: eval mode (BN statistics, dropout) and no parameter gradients."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def check_recipe(recipe: WeightedSum, student: nn.Module, teacher: nn.Module | None) -> None:
    """Fail fast (before any training) when the recipe cannot run on these models."""
    if recipe.needs_teacher and teacher is None:
        raise ConfigError(f"the loss recipe ({recipe}) needs a teacher but none is configured")
    if teacher is not None:
        recipe.bind(student, teacher)
        check_vocabularies(recipe, student, teacher)
    check_paths(student, recipe.taps("student"), "student")
    if teacher is not None:
        check_paths(teacher, recipe.taps("teacher"), "teacher")
        recipe.check_models(student, teacher)


def check_vocabularies(recipe: WeightedSum, student: nn.Module, teacher: nn.Module) -> None:
    """Terms that compare the two models' outputs token by token need one vocabulary."""
    from kdrun.models.language import vocabulary

    reads_logits = [term.describe() for term in recipe.terms.values() if term.needs_teacher and not term.teacher_taps]
    if reads_logits and vocabulary(student) != vocabulary(teacher):
        raise ConfigError(
            f"teacher and student have different vocabularies ({vocabulary(teacher)} and {vocabulary(student)} tokens); "
            f"token-level terms ({', '.join(reads_logits)}) compare distributions over one vocabulary: give both the "
            "dataset's tokenizer"
        )


class TeacherOutputs:
    """The frozen teacher's raw output and tapped features for a batch.

    Its forward runs under ``no_grad`` rather than ``inference_mode``: the outputs are saved
    for the student's backward (e.g. inside KL), which inference tensors forbid.
    """

    def __init__(self, model: nn.Module, taps: list[str], task: Task):
        self.model, self.task = freeze(model), task
        self.taps = FeatureTaps(model, taps, owner="teacher")

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.taps.clear()
        with torch.no_grad():
            output = self.task.forward(self.model, batch)
        return output, dict(self.taps.outputs)

    def start_epoch(self) -> None:
        """An epoch begins (a cache of these outputs may start serving them)."""


class Distiller(nn.Module):
    """Student + recipe (+ frozen teacher): ``forward(batch, progress)`` runs both models and
    returns ``(total loss, loss parts, scored student logits, their labels)``.

    Use as a context manager: feature taps are hooked on entry and removed on exit.
    ``partial_labels`` says the training data hides some labels (the unlabeled strategy); so do
    views of the inputs whose copies carry no label (:mod:`kdrun.data.views`).
    """

    def __init__(self, student: nn.Module, recipe: WeightedSum, task: Task, teacher: nn.Module | None = None,
                 partial_labels: bool = False, check: bool = True):
        super().__init__()
        if check:
            check_recipe(recipe, student, teacher)
        self.student, self.recipe, self.task = student, recipe, task
        views = recipe_views(recipe)
        self.partial_labels = partial_labels or (views is not None and not views.labelled)
        self.teacher_outputs = (
            TeacherOutputs(teacher, recipe.taps("teacher"), task) if teacher is not None and recipe.needs_teacher else None
        )
        self.student_taps = FeatureTaps(student, recipe.taps("student"), owner="student")

    @property
    def fixed_inputs(self) -> bool:
        """Whether a training sample reaches the models as the same input every epoch (what a
        teacher-output cache needs)."""
        return self.task.fixed_inputs

    @property
    def teacher(self) -> nn.Module | None:
        return self.teacher_outputs.model if self.teacher_outputs is not None else None

    def __enter__(self) -> Distiller:
        self.student_taps.__enter__()
        if self.teacher_outputs is not None:
            self.teacher_outputs.taps.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.student_taps.__exit__(*exc)
        if self.teacher_outputs is not None:
            self.teacher_outputs.taps.__exit__(*exc)

    def before_epoch(self, epoch: int, epochs: int) -> dict[str, float]:
        """Apply this epoch's scheduled knobs (``T``, ``alpha``); returns the ones in use, for the log."""
        if self.teacher_outputs is not None:
            self.teacher_outputs.start_epoch()
        knobs = self.recipe.knobs
        if knobs is None:
            return {}
        values = knobs.values(epoch, epochs)
        knobs.apply(values)
        teacher_knobs = getattr(self.teacher, "knobs", ())
        if teacher_knobs:
            self.teacher.apply_knobs(values)
        used = knobs.used | set(teacher_knobs)
        return {knob: value for knob, value in values.items() if knob in used}

    def evaluated(self) -> dict[str, nn.Module]:
        """Models besides the student whose validation metrics the loop logs each epoch."""
        return {}

    def setup(self, batch: Batch) -> None:
        """Size the recipe's adapters from one probe batch, before the optimizer exists. The
        probe runs in eval mode, so it leaves no trace in the student (BN statistics)."""
        if not self.recipe.needs_setup:
            return
        was_training = self.student.training
        self.student.eval()
        with self, torch.no_grad():
            self.recipe.setup(self.step_outputs(batch))
        self.student.train(was_training)

    def step_outputs(self, batch: Batch, progress: float | None = None) -> StepOutputs:
        """Both models on ``batch``, scored as the task scores them."""
        self.student_taps.clear()
        teacher_logits, teacher_features = None, {}
        if self.teacher_outputs is not None:
            teacher_output, teacher_features = self.teacher_outputs(batch)
            teacher_logits, _ = self.task.scored(teacher_output, batch)
        student_logits, labels = self.task.scored(self.task.forward(self.student, batch), batch)
        return StepOutputs(
            student_logits=student_logits, labels=labels, teacher_logits=teacher_logits,
            student_features=dict(self.student_taps.outputs), teacher_features=teacher_features,
            index=batch.index, progress=progress, mask=batch.mask, partial_labels=self.partial_labels,
        )

    def forward(self, batch: Batch, progress: float | None = None):
        outputs = self.step_outputs(batch, progress)
        total, parts = self.recipe(outputs)
        return total, parts, outputs.student_logits, outputs.labels
