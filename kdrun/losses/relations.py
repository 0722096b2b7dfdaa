"""Relation-based terms: the student matches how the teacher relates the samples of a batch.

Each term compares two ``(B, B)`` (or ``(B, B, B)``) relation matrices, one per
model, so student and teacher features may differ in width and layout: maps are
flattened to ``(B, -1)`` vectors. The teacher's relations are a fixed target and
are computed without a graph. Constants follow the authors' reference code
(RepDistiller for RKD, SP, PKT), since the paper weights were tuned against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.losses.adapters import projection
from kdrun.losses.base import StepOutputs, Term, one_tap


def _with_fixed_target(relation: Callable, student: torch.Tensor, teacher: torch.Tensor):
    """``relation`` of the student (with graph) and of the teacher (without)."""
    with torch.no_grad():
        target = relation(teacher)
    return relation(student), target


def pairwise_distances(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances ``(B, B)`` with an exact zero diagonal.

    The squared distances are clamped before the square root so that the gradient
    stays finite for (near-)duplicate samples; the diagonal is then zeroed by a mask.
    """
    squared_norms = features.pow(2).sum(dim=1)
    squared = squared_norms[:, None] + squared_norms[None, :] - 2 * features @ features.t()
    off_diagonal = 1 - torch.eye(len(features), device=features.device, dtype=features.dtype)
    return squared.clamp(min=eps).sqrt() * off_diagonal


def normalised_distances(features: torch.Tensor) -> torch.Tensor:
    """Distances divided by their mean over pairs ``i != j`` (RKD's scale normalisation)."""
    distances = pairwise_distances(features)
    pairs = max(len(features) * (len(features) - 1), 1)  # a batch of one sample has no pairs, and no loss
    return distances / (distances.sum() / pairs).clamp(min=1e-12)


def triplet_angles(features: torch.Tensor) -> torch.Tensor:
    """``angles[j, i, k] = <e_ij, e_kj>``, the cosine at vertex ``j`` (RKD's angle-wise potential).

    ``e_ij`` is the unit vector from sample ``j`` to sample ``i``; it is zero when
    ``i == j``, so degenerate triplets give 0 on both sides and add no loss.
    """
    directions = F.normalize(features[None, :, :] - features[:, None, :], p=2, dim=2)
    return torch.bmm(directions, directions.transpose(1, 2))


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float, angle_weight: float) -> torch.Tensor:
    """Park et al. 2019: Huber loss between distance-wise and angle-wise relations.

    As in the authors' code (and RepDistiller's ``RKDLoss``) the Huber (smooth-L1,
    delta=1) losses are means over all ``B^2`` / ``B^3`` entries, not sums over pairs.
    """
    distances, target_distances = _with_fixed_target(normalised_distances, student, teacher)
    angles, target_angles = _with_fixed_target(triplet_angles, student, teacher)
    return (
        distance_weight * F.smooth_l1_loss(distances, target_distances)
        + angle_weight * F.smooth_l1_loss(angles, target_angles)
    )


def normalised_gram(features: torch.Tensor) -> torch.Tensor:
    """SP's similarity matrix: ``F F^T`` with each row L2-normalised (Tung & Mori 2019)."""
    return F.normalize(features @ features.t(), p=2, dim=1)


def similarity_preserving_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``||G_s - G_t||_F^2 / B^2`` (Tung & Mori 2019; RepDistiller's ``Similarity`` uses the same constant)."""
    gram, target_gram = _with_fixed_target(normalised_gram, student, teacher)
    return (gram - target_gram).pow(2).sum() / len(student) ** 2


def cosine_conditionals(features: torch.Tensor) -> torch.Tensor:
    """PKT's conditional probabilities: cosine similarity shifted to [0, 1], rows summing to 1."""
    unit = F.normalize(features, p=2, dim=1)
    kernel = (unit @ unit.t() + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Passalis & Tefas 2018: KL(teacher || student) between the conditionals, summed over
    pairs and divided by ``B^2`` (a mean over entries, as in the authors' code, with their eps)."""
    conditionals, target = _with_fixed_target(cosine_conditionals, student, teacher)
    return torch.mean(target * torch.log((target + eps) / (conditionals + eps)))


def taylor_rbf_correlation(features: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """Peng et al. 2019: ``exp(-gamma ||f_i - f_j||^2)`` for unit vectors, where it equals
    ``exp(-2 gamma) exp(2 gamma f_i.f_j)``, with the second factor cut to a ``order``-th order Taylor series.

    The expansion holds only for unit-norm features, so the embeddings are L2-normalised first.
    """
    unit = F.normalize(features, p=2, dim=1)
    similarity = unit @ unit.t()
    return sum(
        math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * similarity.pow(p) for p in range(order + 1)
    )


def correlation_congruence_loss(student: torch.Tensor, teacher: torch.Tensor, gamma: float, order: int) -> torch.Tensor:
    """``||psi(F_t) - psi(F_s)||_F^2 / B^2`` with ``psi`` the Taylor-RBF correlation matrix (Peng et al. 2019)."""
    difference = taylor_rbf_correlation(student, gamma, order) - taylor_rbf_correlation(teacher, gamma, order)
    return difference.pow(2).mean()


def shared_correlation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The CC loss the paper's authors shared with RepDistiller (``distiller_zoo/CC.py``, ``Correlation``):
    with ``d_i = |s_i - t_i|`` the absolute embedding difference of sample ``i``, the mean over
    consecutive samples of ``<d_i, d_(i+1)>``. A batch of one sample has no pair, and no loss."""
    delta = (student - teacher).abs()
    if len(delta) < 2:
        return delta.sum() * 0
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


class RelationTerm(Term):
    """Reads one tap from each model and flattens it to ``(B, -1)`` vectors."""

    def __init__(self, student_taps: str | Sequence[str] = "embedding", teacher_taps: str | Sequence[str] = "embedding"):
        super().__init__()
        self.student_taps, self.teacher_taps = one_tap(self.symbol, student_taps, teacher_taps)

    def where(self) -> str:
        student, teacher = self.student_taps[0], self.teacher_taps[0]
        return student if student == teacher else f"{student}->{teacher}"

    def describe(self) -> str:
        return f"{self.symbol}({self.where()})"

    def pair(self, outputs: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        student = outputs.student_features[self.student_taps[0]].flatten(1)
        return student, outputs.teacher_features[self.teacher_taps[0]].flatten(1).detach()


class RKD(RelationTerm):
    symbol = "RKD"

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, **taps):
        super().__init__(**taps)
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def describe(self) -> str:
        return f"RKD({self.where()},d={self.distance_weight:g},a={self.angle_weight:g})"

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return rkd_loss(*self.pair(outputs), self.distance_weight, self.angle_weight)


class SimilarityPreserving(RelationTerm):
    symbol = "SP"

    def __init__(self, student_taps: str | Sequence[str] = "last_stage", teacher_taps: str | Sequence[str] = "last_stage"):
        super().__init__(student_taps, teacher_taps)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return similarity_preserving_loss(*self.pair(outputs))


class PKT(RelationTerm):
    symbol = "PKT"

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return pkt_loss(*self.pair(outputs))


class CorrelationCongruence(RelationTerm):
    """CC on learned linear embeddings of both sides (RepDistiller's ``LinearEmbed``), which bring
    student and teacher to a common width; both embeddings are trained.

    ``form=reference`` (default) is the reference code's loss, which the authors shared with
    RepDistiller and which ran there with weight 0.02 for the CRD paper's CC numbers
    (:func:`shared_correlation_loss`); ``form=paper`` is the paper's Gaussian-kernel correlation
    with its ``gamma`` and Taylor ``order`` (:func:`correlation_congruence_loss`), for which no
    published weight is known.
    """

    symbol = "CC"
    needs_setup = True
    FORMS = ("reference", "paper")

    def __init__(self, gamma: float = 0.4, order: int = 2, embed_dim: int = 128, form: str = "reference", **taps):
        super().__init__(**taps)
        if form not in self.FORMS:
            raise ConfigError(f"loss.cc.form={form!r} must be one of {', '.join(self.FORMS)}")
        self.gamma, self.order, self.embed_dim, self.form = float(gamma), int(order), int(embed_dim), form
        self.embed_student: nn.Module | None = None
        self.embed_teacher: nn.Module | None = None

    def describe(self) -> str:
        if self.form == "reference":
            return f"CC({self.where()})"
        return f"CC({self.where()},paper,gamma={self.gamma:g},P={self.order})"

    def setup(self, probe: StepOutputs) -> None:
        student, teacher = self.pair(probe)
        out_shape = (len(student), self.embed_dim)
        self.embed_student = projection(student.shape, out_shape, norm=False).to(student.device)
        self.embed_teacher = projection(teacher.shape, out_shape, norm=False).to(teacher.device)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        student, teacher = self.pair(outputs)
        student, teacher = self.embed_student(student), self.embed_teacher(teacher)
        if self.form == "reference":
            return shared_correlation_loss(student, teacher)
        return correlation_congruence_loss(student, teacher, self.gamma, self.order)
