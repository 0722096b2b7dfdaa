"""What one training step computes: the student learning from a frozen teacher (or from labels)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from kdrun.errors import ConfigError
from kdrun.features import FeatureTaps, check_paths
from kdrun.losses import StepOutputs, WeightedSum


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
    check_paths(student, recipe.taps("student"), "student")
    if teacher is not None:
        check_paths(teacher, recipe.taps("teacher"), "teacher")


class DistillTask:
    """Student + recipe (+ frozen teacher): runs forward and returns the recipe's loss.

    Use as a context manager: feature taps are hooked on entry and removed on exit.
    """

    def __init__(
        self,
        student: nn.Module,
        recipe: WeightedSum,
        teacher: nn.Module | None = None,
        knobs: Callable[[int, int], dict[str, float]] | None = None,
        check: bool = True,
    ):
        if check:
            check_recipe(recipe, student, teacher)
        self.student, self.recipe, self.knobs = student, recipe, knobs
        self.teacher = freeze(teacher) if teacher is not None else None
        self.student_taps = FeatureTaps(student, recipe.taps("student"), owner="student")
        self.teacher_taps = (
            FeatureTaps(teacher, recipe.taps("teacher"), owner="teacher") if teacher is not None else None
        )

    def __enter__(self) -> DistillTask:
        self.student_taps.__enter__()
        if self.teacher_taps is not None:
            self.teacher_taps.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.student_taps.__exit__(*exc)
        if self.teacher_taps is not None:
            self.teacher_taps.__exit__(*exc)

    def before_epoch(self, epoch: int, epochs: int) -> dict[str, float]:
        """Apply the scheduled knobs (``T``, ``alpha``) of this epoch; returns them for the log."""
        return self.knobs(epoch, epochs) if self.knobs is not None else {}

    def extra_evaluations(self) -> dict[str, nn.Module]:
        """Models besides the student whose validation accuracy the loop logs each epoch."""
        return {}

    def to(self, device: torch.device) -> DistillTask:
        for module in (self.student, self.recipe, self.teacher):
            if module is not None:
                module.to(device)
        return self

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the student and the recipe's adapters."""
        return [p for p in list(self.student.parameters()) + list(self.recipe.parameters()) if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        self.student.train(mode)
        self.recipe.train(mode)

    def outputs(
        self, inputs: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None, progress: float | None = None
    ) -> StepOutputs:
        self.student_taps.clear()
        teacher_logits, teacher_features = None, {}
        if self.teacher is not None and self.recipe.needs_teacher:
            self.teacher_taps.clear()
            # no_grad rather than inference_mode: teacher outputs are saved for the
            # student's backward (e.g. inside KL), which inference tensors forbid.
            with torch.no_grad():
                teacher_logits = self.teacher(inputs)
            teacher_features = dict(self.teacher_taps.outputs)
        student_logits = self.student(inputs)
        return StepOutputs(
            student_logits=student_logits,
            labels=labels,
            teacher_logits=teacher_logits,
            student_features=dict(self.student_taps.outputs),
            teacher_features=teacher_features,
            index=index,
            progress=progress,
        )

    def setup(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """Size the recipe's adapters from one probe batch, before the optimizer exists."""
        with torch.no_grad():
            self.recipe.setup(self.outputs(inputs, labels))

    def loss(self, inputs: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None, progress: float | None = None):
        outputs = self.outputs(inputs, labels, index, progress)
        total, parts = self.recipe(outputs)
        return total, parts, outputs.student_logits

    def state_dict(self) -> dict:
        return {"model": self.student.state_dict(), "recipe": self.recipe.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["model"])
        self.recipe.load_state_dict(state["recipe"])
