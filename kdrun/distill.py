"""What one training step computes: the student learning from a frozen teacher (or from labels)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn

from kdrun.errors import ConfigError
from kdrun.features import FeatureTaps, check_paths
from kdrun.losses import StepOutputs, WeightedSum

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
    check_paths(student, recipe.taps("student"), "student")
    if teacher is not None:
        check_paths(teacher, recipe.taps("teacher"), "teacher")


class TeacherCache:
    """The frozen teacher's outputs (logits and the recipe's teacher taps) per training sample.

    Valid only when the teacher sees the same input for a sample every epoch (no
    augmentation). Batches that come with sample indices fill it; once every sample has
    been seen (checked at epoch starts, one sync per epoch) reads replace the forward.
    ``limit_bytes`` caps its size: above it the cache turns itself off, or, when
    ``strict`` (``perf.teacher_cache=true``), refuses with a ConfigError.
    """

    def __init__(self, size: int, limit_bytes: int, strict: bool = False):
        self.size, self.limit_bytes, self.strict = size, limit_bytes, strict
        self.logits: torch.Tensor | None = None
        self.features: dict[str, torch.Tensor] = {}
        self.filled: torch.Tensor | None = None
        self.complete = self.disabled = False

    def read(self, index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        if not self.complete:
            return None
        return self.logits[index], {path: stored[index] for path, stored in self.features.items()}

    def write(self, index: torch.Tensor, logits: torch.Tensor, features: dict[str, torch.Tensor]) -> None:
        if self.disabled:
            return
        if self.logits is None and not self._allocate(logits, features):
            return
        self.logits.index_copy_(0, index, logits)
        for path, value in features.items():
            self.features[path].index_copy_(0, index, value)
        self.filled[index] = True

    def _allocate(self, logits: torch.Tensor, features: dict[str, torch.Tensor]) -> bool:
        outputs = {"logits": logits, **features}
        if not all(isinstance(value, torch.Tensor) for value in outputs.values()):
            return self._refuse("a teacher tap returns something other than a tensor")
        need = sum(value[0].numel() * value.element_size() for value in outputs.values()) * self.size
        if need > self.limit_bytes:
            return self._refuse(
                f"the teacher's outputs for {self.size} samples take {need / 2**20:.0f} MiB, "
                f"more than the {self.limit_bytes / 2**20:.0f} MiB allowed (a quarter of free memory)"
            )
        self.logits = logits.new_empty((self.size, *logits.shape[1:]))
        self.features = {path: value.new_empty((self.size, *value.shape[1:])) for path, value in features.items()}
        self.filled = torch.zeros(self.size, dtype=torch.bool, device=logits.device)
        log.info("Teacher cache: %.1f MiB for %d samples (%s)", need / 2**20, self.size, ", ".join(outputs))
        return True

    def _refuse(self, reason: str) -> bool:
        if self.strict:
            raise ConfigError(f"perf.teacher_cache=true: {reason}; set perf.teacher_cache=auto or false")
        log.warning("Teacher cache off: %s", reason)
        self.disabled = True
        return False

    def start_epoch(self) -> None:
        if not self.complete and self.filled is not None and not self.disabled:
            self.complete = bool(self.filled.all())


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
        self.teacher_cache: TeacherCache | None = None

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
        if self.teacher_cache is not None:
            self.teacher_cache.start_epoch()
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

    def learners(self) -> dict[str, nn.Module]:
        """The modules that hold what learns (DDP wraps them): student, recipe and any other
        trainable module a task adds (e.g. self-distillation's heads); never the teacher."""
        return {
            name: value for name, value in vars(self).items()
            if isinstance(value, nn.Module) and name != "teacher" and any(p.requires_grad for p in value.parameters())
        }

    def train(self, mode: bool = True) -> None:
        self.student.train(mode)
        self.recipe.train(mode)

    def outputs(
        self, inputs: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None, progress: float | None = None
    ) -> StepOutputs:
        self.student_taps.clear()
        teacher_logits, teacher_features = None, {}
        if self.teacher is not None and self.recipe.needs_teacher:
            cache = self.teacher_cache if index is not None else None
            cached = cache.read(index) if cache is not None else None
            if cached is not None:
                teacher_logits, teacher_features = cached
            else:
                self.teacher_taps.clear()
                # no_grad rather than inference_mode: teacher outputs are saved for the
                # student's backward (e.g. inside KL), which inference tensors forbid.
                with torch.no_grad():
                    teacher_logits = self.teacher(inputs)
                teacher_features = dict(self.teacher_taps.outputs)
                if cache is not None:
                    cache.write(index, teacher_logits, teacher_features)
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
