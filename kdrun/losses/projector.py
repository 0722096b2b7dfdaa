"""Terms on the pooled features (``embedding``) through a learned head: SRD (a projector and
batch norm, log-L_p feature matching plus KD) and PAD-L2 (L2 weighted by a learned per-sample,
per-dimension variance). A tapped map is averaged over its positions first.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.losses.base import StepOutputs, Term, one_tap


def pooled_vector(feature: torch.Tensor) -> torch.Tensor:
    """A vector per sample: a map averaged over its positions (torchdistill's ``z.mean(-1).mean(-1)``)."""
    return feature.flatten(2).mean(dim=2) if feature.dim() > 2 else feature


def srd_loss(student: torch.Tensor, teacher: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             exponent: float, T: float) -> torch.Tensor:
    """``2 log sum |z_s - z_t|^p + KL(softmax(t/T) || softmax(s/T))`` (batch mean, no ``T^2``), as
    torchdistill's ``SRDLoss``."""
    feature_part = torch.log((student - teacher).abs().pow(exponent).sum())
    kl = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1), reduction="batchmean")
    return 2 * feature_part + kl


class EmbeddingTerm(Term):
    """One pooled tap per model."""

    needs_setup = True

    def __init__(self, student_taps, teacher_taps):
        super().__init__()
        self.student_taps, self.teacher_taps = one_tap(self.symbol, student_taps, teacher_taps)

    def vectors(self, outputs: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        student = pooled_vector(outputs.student_features[self.student_taps[0]])
        return student, pooled_vector(outputs.teacher_features[self.teacher_taps[0]].detach())

    def where(self) -> str:
        student, teacher = self.student_taps[0], self.teacher_taps[0]
        return student if student == teacher else f"{student}->{teacher}"


class SRD(EmbeddingTerm):
    """SRD (Miles & Mikolajczyk, "Understanding the Role of the Projector in Knowledge Distillation",
    AAAI 2024): the student's pooled feature through a linear projector and the teacher's, each
    through batch norm without affine parameters (eps 1e-4, batch statistics in training, as the
    reference's norm layers run), matched by ``2 log ||.||_p^p`` (p=4) beside KD at T=1 without
    ``T^2``; weights CE 1 + SRD 1 (torchdistill's ImageNet config)."""

    symbol = "SRD"

    def __init__(self, student_taps: str = "embedding", teacher_taps: str = "embedding", exponent: float = 4.0,
                 T: float = 1.0):
        super().__init__(student_taps, teacher_taps)
        if exponent <= 0 or T <= 0:
            raise ConfigError(f"loss.srd needs exponent > 0 and T > 0 (got exponent={exponent}, T={T})")
        self.exponent, self.T = float(exponent), float(T)

    def describe(self) -> str:
        return f"SRD(p={self.exponent:g},T={self.T:g},{self.where()})"

    def setup(self, probe: StepOutputs) -> None:
        student, teacher = self.vectors(probe)
        width = teacher.shape[1]
        self.projector = nn.Linear(student.shape[1], width).to(student.device)
        self.student_norm = nn.BatchNorm1d(width, eps=1e-4, affine=False).to(student.device)
        self.teacher_norm = nn.BatchNorm1d(width, eps=1e-4, affine=False).to(student.device)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        student, teacher = self.vectors(outputs)
        return srd_loss(self.student_norm(self.projector(student)), self.teacher_norm(teacher), outputs.student_logits,
                        outputs.teacher_logits, self.exponent, self.T)


def pad_l2(student: torch.Tensor, teacher: torch.Tensor, log_variance: torch.Tensor, eps: float) -> torch.Tensor:
    """``mean_i mean_d [(t - s)^2 / (eps + exp(v)) + v]`` (torchdistill ``PADL2Loss``)."""
    return ((teacher - student) ** 2 / (eps + torch.exp(log_variance)) + log_variance).mean(dim=1).mean()


class PrimeAwareL2(EmbeddingTerm):
    """PAD-L2 (Zhang et al., "Prime-Aware Adaptive Distillation", ECCV 2020): L2 between pooled
    features, each dimension of each sample weighted by the inverse of a variance that a branch
    (linear + BN on the student's feature) learns, plus its log as a penalty; hard samples
    (large variance) weigh less. Where the widths differ, a learned linear projection maps the
    student's feature onto the teacher's (torchdistill pairs equal widths); weights CE 1 + PAD 1."""

    symbol = "PAD-L2"

    def __init__(self, student_taps: str = "embedding", teacher_taps: str = "embedding", eps: float = 1e-6):
        super().__init__(student_taps, teacher_taps)
        if eps <= 0:
            raise ConfigError(f"loss.pad_l2.eps={eps} must be > 0")
        self.eps = float(eps)

    def describe(self) -> str:
        return f"PAD-L2({self.where()})"

    def setup(self, probe: StepOutputs) -> None:
        student, teacher = self.vectors(probe)
        width = teacher.shape[1]
        self.projection = (nn.Identity() if student.shape[1] == width else nn.Linear(student.shape[1], width, bias=False))
        self.variance = nn.Sequential(nn.Linear(student.shape[1], width), nn.BatchNorm1d(width))
        self.to(student.device)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        student, teacher = self.vectors(outputs)
        return pad_l2(self.projection(student), teacher, self.variance(student), self.eps)
