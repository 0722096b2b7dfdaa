"""Response-based terms: cross-entropy on labels and Hinton's soft targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdrun.losses.base import StepOutputs, Term


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    The ``T^2`` factor (Hinton et al. 2015) keeps the gradient scale of the soft
    term independent of the temperature, so ``alpha`` means the same at any ``T``.
    """
    log_p_student = F.log_softmax(student_logits / T, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * T * T


class CrossEntropy(Term):
    symbol = "CE"
    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def describe(self) -> str:
        return f"CE(ls={self.label_smoothing:g})" if self.label_smoothing else "CE"

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return F.cross_entropy(outputs.student_logits, outputs.labels, label_smoothing=self.label_smoothing)


class SoftTargets(Term):
    symbol = "KD"

    def __init__(self, T: float = 4.0):
        super().__init__()
        self.T = float(T)

    def describe(self) -> str:
        return f"KD(T={self.T:g})"

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return soft_target_kl(outputs.student_logits, outputs.teacher_logits, self.T)
