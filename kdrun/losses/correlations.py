"""Terms that match statistics of how a model's features relate across channels, positions or
layers: FSP (the flow between two layers), NST (neuron selectivity, by MMD) and KDSVD (singular
vectors of consecutive layers).

They compare maps; where a tap is a vector (an MLP stage, ``embedding``), a neuron has no
spatial response to compare, so NST and KDSVD read its responses across the batch instead (the
batch's samples become the positions; the other side's map is average-pooled to a vector), and
FSP reads the vector as a map with one position (:mod:`kdrun.losses.maps`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.losses.base import StepOutputs
from kdrun.losses.features import PairedFeatureTerm
from kdrun.losses.maps import as_map, conv, pooled, smallest
from kdrun.losses.stages import Initialisation, check_epochs, epochs_text


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``(B, C1, C2)``: ``F1 F2^T / positions`` after max-pooling both maps to their common size
    (torchdistill ``FSPLoss.compute_fsp_matrix``)."""
    size = smallest(first, second)
    first, second = pooled(first, size, "max").flatten(2), pooled(second, size, "max").flatten(2)
    return first @ second.transpose(1, 2) / first.shape[2]


def fsp_loss(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over consecutive pairs of taps of ``||G_s - G_t||`` taken over the first layer's
    channels, summed over the second's, divided by the batch size (torchdistill ``FSPLoss``)."""
    total = 0.0
    for i in range(len(students) - 1):
        student_flow = fsp_matrix(students[i], students[i + 1])
        teacher_flow = fsp_matrix(teachers[i], teachers[i + 1])
        total = total + (student_flow - teacher_flow).norm(dim=1).sum()
    return total / len(students[0])


class FSP(Initialisation, PairedFeatureTerm):
    """FSP (Yim et al., "A Gift From Knowledge Distillation", CVPR 2017): the Gram matrix between
    consecutive taps (the flow of the solution procedure) of the student matches the teacher's.

    FSP is an initialisation (the paper's first stage; RepDistiller's ``fsp``): the student trains
    on it alone for ``init_epochs`` (stage ``fsp_init``), then on the rest of the recipe. Taps are
    a chain, ``[a, b, c]`` giving the flows a->b and b->c on each side. Where a student tap is
    narrower or wider than the teacher's (RepDistiller refuses such pairs), a learned 1x1
    projection (trained in the stage) maps it onto the teacher's width.
    """

    symbol = "FSP"
    needs_setup = True

    def __init__(self, student_taps: Sequence[str] = ("stage1", "last_stage"),
                 teacher_taps: Sequence[str] = ("stage1", "last_stage"), init_epochs: int = 5):
        super().__init__(student_taps, teacher_taps)
        if len(self.student_taps) < 2:
            raise ConfigError(f"loss.fsp needs at least two taps per model (a chain); got student_taps={list(self.student_taps)}")
        self.init_epochs = check_epochs("loss.fsp.init_epochs", init_epochs)
        self.projections = nn.ModuleList()

    def describe(self) -> str:
        return f"FSP({' -> '.join(self.student_taps)} vs {' -> '.join(self.teacher_taps)}; initialisation only, " \
               f"{epochs_text(self.init_epochs)})"

    def maps(self, outputs: StepOutputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pairs = list(self.pairs(outputs))
        return [as_map(s) for s, _ in pairs], [as_map(t) for _, t in pairs]

    def setup(self, probe: StepOutputs) -> None:
        if len(self.projections):
            return
        students, teachers = self.maps(probe)
        self.projections = nn.ModuleList(
            nn.Identity() if s.shape[1] == t.shape[1] else conv(s.dim(), s.shape[1], t.shape[1], 1, bias=False)
            for s, t in zip(students, teachers)
        ).to(probe.student_logits.device)

    def initialisation_loss(self, outputs: StepOutputs) -> torch.Tensor:
        students, teachers = self.maps(outputs)
        return fsp_loss([project(s) for project, s in zip(self.projections, students)], teachers)


def batch_as_positions(feature: torch.Tensor) -> torch.Tensor:
    """``(1, C, B)``: each channel's responses over the batch (a map is average-pooled first)."""
    vector = feature.flatten(2).mean(dim=2) if feature.dim() > 2 else feature
    return vector.t().unsqueeze(0)


def poly_mmd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared MMD with the kernel ``k(x, y) = (x.y)^2`` between the two sets of channel
    responses ``(B, C, N)``, each normalised over its N positions (mdistiller ``single_stage_nst_loss``)."""
    student, teacher = F.normalize(student, dim=2), F.normalize(teacher, dim=2)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.transpose(1, 2)).pow(2)

    return kernel(teacher, teacher).mean().detach() + kernel(student, student).mean() - 2 * kernel(student, teacher).mean()


def nst_pair(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """One pair's NST: maps pooled to their common size, or both read over the batch where one is a vector."""
    if student.dim() == 2 or teacher.dim() == 2:
        return poly_mmd(batch_as_positions(student), batch_as_positions(teacher))
    if student.dim() != teacher.dim():
        raise ConfigError(f"NST pairs maps of one kind; got {tuple(student.shape)} and {tuple(teacher.shape)}")
    size = smallest(student, teacher)
    return poly_mmd(pooled(student, size).flatten(2), pooled(teacher, size).flatten(2))


class NST(PairedFeatureTerm):
    """NST (Huang & Wang, "Like What You Like", 2017): the distribution of the student's neuron
    selectivity patterns matches the teacher's, by MMD with a degree-2 polynomial kernel;
    summed over pairs. mdistiller's CIFAR-100 weights: CE 1 + NST 50 on every stage."""

    symbol = "NST"

    def __init__(self, student_taps: Sequence[str] = ("stage1", "last_stage"),
                 teacher_taps: Sequence[str] = ("stage1", "last_stage")):
        super().__init__(student_taps, teacher_taps)

    def describe(self) -> str:
        return f"NST({self.pair_names()})"

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return sum(nst_pair(student, teacher) for student, teacher in self.pairs(outputs))


def finite(values: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(values), values, torch.zeros_like(values))


class TopSingular(torch.autograd.Function):
    """The top ``count`` singular values and right singular vectors of each matrix ``(rows, cols)``.

    The forward is ``torch.linalg.svd``'s. The backward differentiates only the components used:
    PyTorch's differentiates all of them and gives ``0 * inf`` wherever unused singular values
    repeat, as the zeros of dead ReLU channels do. It goes through the Gram matrix ``G = X^T X``
    (eigenvalues ``s^2``, eigenvectors the right singular vectors): ``dv_i = sum_j v_j (v_j^T dG
    v_i) / (s_i^2 - s_j^2)`` and ``ds_i = v_i^T dG v_i / (2 s_i)``, summed over the used ``i``
    only; equal values among them (a level with no signal) pass no gradient.
    """

    @staticmethod
    def forward(ctx, matrices: torch.Tensor, count: int):
        _, values, right_h = torch.linalg.svd(matrices, full_matrices=True)
        right = right_h.transpose(1, 2)
        eigen = values.new_zeros(right.shape[:2])
        eigen[:, :values.shape[1]] = values ** 2
        ctx.save_for_backward(matrices, right, eigen)
        count = min(count, values.shape[1])
        return values[:, :count], right[:, :, :count]

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor, grad_right: torch.Tensor):
        matrices, right, eigen = ctx.saved_tensors
        used = grad_right.shape[2]
        gaps = eigen[:, None, :used] - eigen[:, :, None]  # (B, all j, used i): s_i^2 - s_j^2
        tolerance = 1e-10 * eigen.amax(dim=1).clamp(min=1e-30)[:, None, None]
        coupling = torch.where(gaps.abs() > tolerance, 1 / torch.where(gaps == 0, 1.0, gaps), 0.0)
        mixing = (right.transpose(1, 2) @ grad_right) * coupling
        values = eigen[:, :used].sqrt()
        mixing[:, :used] += torch.diag_embed(torch.where(values > 0, grad_values / (2 * values.clamp(min=1e-30)), 0.0))
        grad_gram = right @ mixing @ right[:, :, :used].transpose(1, 2)
        return matrices @ (grad_gram + grad_gram.transpose(1, 2)), None


def singular_parts(matrices: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` singular values (L2-normalised) and right singular vectors (each
    normalised) of each ``(rows, cols)`` matrix, non-finite entries zeroed (mdistiller ``svd``),
    in float32 as there."""
    values, right = TopSingular.apply(matrices.float(), count)
    return F.normalize(finite(values), dim=1), F.normalize(finite(right), dim=1)


def align_signs(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """For each teacher vector the student vector most aligned with it (by |cosine|), sign-corrected
    (mdistiller ``align_rsv``)."""
    cosine = student.transpose(1, 2) @ teacher
    best = cosine.abs().max(dim=1, keepdim=True).values
    return student @ torch.where(best == cosine.abs(), cosine.sign(), torch.zeros_like(cosine))


def kdsvd_loss(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], k: int, batch: int) -> torch.Tensor:
    """Lee et al., ECCV 2018 (mdistiller ``kdsvd_loss``): each matrix's top right singular vectors,
    weighted by the teacher's singular values; between consecutive taps an RBF
    ``exp(-(v_i - v_{i-1})^2 / 8)`` of every pair of entries; squared differences summed, / ``batch``."""
    total, previous = 0.0, None
    for student, teacher in zip(students, teachers):
        teacher_values, teacher_vectors = singular_parts(teacher, k)
        _, student_vectors = singular_parts(student, k + 3)
        student_vectors = align_signs(student_vectors, teacher_vectors)
        weights = teacher_values.unsqueeze(1)
        current = (student_vectors * weights, teacher_vectors * weights)
        if previous is not None:
            student_rbf = torch.exp(-(current[0].unsqueeze(2) - previous[0].unsqueeze(1)).pow(2) / 8)
            teacher_rbf = torch.exp(-(current[1].unsqueeze(2) - previous[1].unsqueeze(1)).pow(2) / 8)
            total = total + finite((student_rbf - teacher_rbf.detach()).pow(2)).sum() / batch
        previous = current
    return total


def svd_matrix(feature: torch.Tensor) -> torch.Tensor:
    """mdistiller's matrix of a map: ``(B, C * H, W)`` (a 1-D map is its own)."""
    return feature.flatten(1, -2) if feature.dim() == 4 else feature


class KDSVD(PairedFeatureTerm):
    """KDSVD (Lee et al., "Self-supervised Knowledge Distillation Using Singular Value
    Decomposition", ECCV 2018): the RBF relations between consecutive layers' singular vectors.

    Needs two taps or more per model. mdistiller takes each image map's SVD as a ``(C*H, W)``
    matrix and needs equal widths W on both sides; here each pair is average-pooled to its
    common size first. If any tap is a vector, every tap is read across the batch (a ``(C, B)``
    matrix per layer). mdistiller's CIFAR-100 weights: CE 1 + KDSVD 1, k=1.
    """

    symbol = "KDSVD"

    def __init__(self, student_taps: Sequence[str] = ("stage1", "last_stage"),
                 teacher_taps: Sequence[str] = ("stage1", "last_stage"), k: int = 1):
        super().__init__(student_taps, teacher_taps)
        if len(self.student_taps) < 2 or k < 1:
            raise ConfigError(f"loss.kdsvd needs two taps or more per model and k >= 1 (got {len(self.student_taps)} taps, k={k})")
        self.k = int(k)

    def describe(self) -> str:
        return f"KDSVD(k={self.k}, {self.pair_names()})"

    def matrices(self, outputs: StepOutputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pairs = list(self.pairs(outputs))
        if any(feature.dim() == 2 for pair in pairs for feature in pair):
            return [batch_as_positions(s) for s, _ in pairs], [batch_as_positions(t) for _, t in pairs]
        students, teachers = [], []
        for student, teacher in pairs:
            if student.dim() != teacher.dim():
                raise ConfigError(f"KDSVD pairs maps of one kind; got {tuple(student.shape)} and {tuple(teacher.shape)}")
            size = smallest(student, teacher)
            students.append(svd_matrix(pooled(student, size)))
            teachers.append(svd_matrix(pooled(teacher, size)))
        return students, teachers

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        students, teachers = self.matrices(outputs)
        return kdsvd_loss(students, teachers, self.k, len(outputs.student_logits))
