"""Feature-based terms: FitNet hints, attention transfer (AT) and variational information
distillation (VID).

Each term reads pairs of tapped features (student path -> teacher path, see
:mod:`kdrun.features`). Teacher and student may differ in layout (an MLP's vectors
against a CNN's maps) and size; :mod:`kdrun.losses.adapters` brings a pair to
comparable shapes, and the learned adapters are sized from the probe batch in
``setup``. Over several pairs the per-pair losses are summed, as in the reference
code (RepDistiller ``loss_kd = sum(loss_group)``), so a weight tuned there means
the same here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.features import LAST_STAGE, resolve_paths, tapped
from kdrun.losses.adapters import Regressor, align_maps, is_map, pool_to, projection
from kdrun.losses.base import StepOutputs, Term, tap_list


def fitnet_hint(student: torch.Tensor, teacher: torch.Tensor, regressor: Regressor) -> torch.Tensor:
    """Mean squared error between the regressed student feature and the teacher's guided feature."""
    prediction, target = regressor(student, teacher)
    return F.mse_loss(prediction, target)


def spatial_attention(feature: torch.Tensor, p: float) -> torch.Tensor:
    """Unnormalised attention ``(B, N)``: the channel mean of ``|F|^p`` over the N positions of
    a map; a vector ``(B, D)`` counts as a one-channel map of D positions, so it is ``|f|^p``."""
    powered = feature.abs().pow(p)
    return powered.mean(1).flatten(1) if is_map(feature) else powered


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``mean((Q_s - Q_t)^2)`` with ``Q = normalize(spatial_attention(F))`` (Zagoruyko &
    Komodakis 2017, in RepDistiller's form: a mean over batch and positions).

    Maps of one rank are pooled to their common size before the attention, as in the
    reference code. Beyond the paper, for any other pair (a vector on either side, or
    maps of different rank) each side's attention is flattened and the longer one is
    average-pooled to the shorter length before normalising.
    """
    if is_map(student) and is_map(teacher) and student.dim() == teacher.dim():
        student, teacher = align_maps(student, teacher)
    student_attention, teacher_attention = spatial_attention(student, p), spatial_attention(teacher, p)
    length = min(student_attention.shape[1], teacher_attention.shape[1])
    student_attention, teacher_attention = (
        F.normalize(pool_to(attention.unsqueeze(1), (length,)).squeeze(1), dim=1)
        for attention in (student_attention, teacher_attention)
    )
    return (student_attention - teacher_attention).pow(2).mean()


def gaussian_nll(target: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``mean(0.5 * (log var + (t - mu)^2 / var))``: the negative log-likelihood of the teacher's
    feature under N(mu, var), dropping the constant 0.5*log(2*pi) (Ahn et al. 2019, eq. 6)."""
    return (0.5 * (variance.log() + (target - mean).pow(2) / variance)).mean()


class PairedFeatureTerm(Term):
    """A term over pairs ``student_taps[i] -> teacher_taps[i]`` of tapped features; a group tap
    (``stages``) pairs its modules one to one, so ``stages -> stages`` is stage1 -> stage1, ..."""

    def __init__(self, student_taps: str | Sequence[str], teacher_taps: str | Sequence[str]):
        super().__init__()
        self.student_taps, self.teacher_taps = tap_list(student_taps), tap_list(teacher_taps)
        if not self.student_taps or len(self.student_taps) != len(self.teacher_taps):
            raise ConfigError(
                f"{self.symbol} pairs student taps with teacher taps one to one; got student_taps="
                f"{list(self.student_taps)} and teacher_taps={list(self.teacher_taps)}"
            )

    def pair_names(self) -> str:
        return ", ".join(f"{student}->{teacher}" for student, teacher in zip(self.student_taps, self.teacher_taps))

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        for student_tap, teacher_tap in zip(self.student_taps, self.teacher_taps):
            student_paths, teacher_paths = resolve_paths(student, student_tap), resolve_paths(teacher, teacher_tap)
            if len(student_paths) != len(teacher_paths):
                raise ConfigError(
                    f"{self.symbol} pairs student {student_tap} ({', '.join(student_paths)}) with teacher {teacher_tap} "
                    f"({', '.join(teacher_paths)}) one to one, but their counts differ; list the pairs as "
                    "student_taps=[...] teacher_taps=[...] of equal length"
                )

    def pairs(self, outputs: StepOutputs) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The teacher side is detached so that no term can build graph into the teacher,
        # whatever mode the teacher's forward ran in.
        for student_tap, teacher_tap in zip(self.student_taps, self.teacher_taps):
            students, teachers = tapped(outputs.student_features, student_tap), tapped(outputs.teacher_features, teacher_tap)
            if len(students) != len(teachers):
                raise ConfigError(f"{self.symbol}: {student_tap} gives {len(students)} features, {teacher_tap} {len(teachers)}")
            for student, teacher in zip(students, teachers):
                yield student, teacher.detach()


class FitNet(PairedFeatureTerm):
    """Romero et al., ICLR 2015: a regressor maps the student's hint layer onto the teacher's
    guided layer (:class:`kdrun.losses.adapters.Regressor`: RepDistiller's conv + BN + ReLU, with
    a strided or transposed conv where the maps' sizes differ by 2; ``relu=false`` drops the ReLU)."""

    symbol = "FitNet"
    needs_setup = True

    def __init__(
        self, student_taps: str | Sequence[str] = LAST_STAGE, teacher_taps: str | Sequence[str] = LAST_STAGE, relu: bool = True
    ):
        super().__init__(student_taps, teacher_taps)
        if len(self.student_taps) != 1:
            raise ConfigError(f"FitNet matches one hint layer; got student_taps={list(self.student_taps)}")
        self.relu = bool(relu)
        self.regressor: Regressor | None = None

    def describe(self) -> str:
        return f"FitNet({self.pair_names()}{'' if self.relu else ', no ReLU'})"

    def check_models(self, student: nn.Module, teacher: nn.Module) -> None:
        super().check_models(student, teacher)
        if len(resolve_paths(student, self.student_taps[0])) != 1:
            raise ConfigError(f"FitNet matches one hint layer; {self.student_taps[0]} names several")

    def setup(self, probe: StepOutputs) -> None:
        ((student, teacher),) = self.pairs(probe)
        self.regressor = Regressor(student, teacher, self.relu).to(student.device)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        ((student, teacher),) = self.pairs(outputs)
        return fitnet_hint(student, teacher, self.regressor)


class AttentionTransfer(PairedFeatureTerm):
    """Zagoruyko & Komodakis, ICLR 2017: match normalised spatial attention maps."""

    symbol = "AT"

    def __init__(
        self, student_taps: str | Sequence[str] = (LAST_STAGE,), teacher_taps: str | Sequence[str] = (LAST_STAGE,), p: float = 2.0
    ):
        super().__init__(student_taps, teacher_taps)
        self.p = float(p)

    def describe(self) -> str:
        return f"AT(p={self.p:g}, {self.pair_names()})"

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return sum(attention_transfer(student, teacher, self.p) for student, teacher in self.pairs(outputs))


class VariationalRegressor(nn.Module):
    """VID's variational distribution for one pair: mean mu(student) from three bias-free pointwise
    layers with ReLUs between (1x1 convs on maps, linear layers on vectors) and a learned variance per
    target channel (per element for vectors), ``softplus(alpha) + eps``, starting at ``init_var``."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size, hidden: int, init_var: float, eps: float):
        super().__init__()
        hidden_shape = torch.Size((teacher_shape[0], hidden, *teacher_shape[2:]))
        # Without biases, as the authors' code (RepDistiller's VIDLoss) builds them.
        self.mean = nn.Sequential(
            projection(student_shape, hidden_shape, norm=False, bias=False),
            nn.ReLU(),
            projection(hidden_shape, hidden_shape, norm=False, bias=False),
            nn.ReLU(),
            projection(hidden_shape, teacher_shape, norm=False, bias=False),
        )
        # Inverse softplus, so that softplus(alpha) + eps == init_var at the start.
        self.alpha = nn.Parameter(torch.full((teacher_shape[1],), math.log(math.expm1(init_var - eps))))
        self.eps = eps
        self.variance_shape = (1, teacher_shape[1], *[1] * (len(teacher_shape) - 2))

    def forward(self, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        variance = F.softplus(self.alpha) + self.eps
        return self.mean(student), variance.view(self.variance_shape)


class VID(PairedFeatureTerm):
    """Ahn et al., CVPR 2019: maximise a variational lower bound on the mutual information
    between teacher and student features, i.e. minimise the teacher feature's Gaussian
    negative log-likelihood under a mean regressed from the student.

    ``hidden`` is the regressor's width; by default the teacher feature's channel count
    (RepDistiller builds ``VIDLoss(s, t, t)``).
    """

    symbol = "VID"
    needs_setup = True

    def __init__(
        self,
        student_taps: str | Sequence[str] = (LAST_STAGE,),
        teacher_taps: str | Sequence[str] = (LAST_STAGE,),
        hidden: int | None = None,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
    ):
        super().__init__(student_taps, teacher_taps)
        if init_pred_var <= eps:
            raise ConfigError(f"VID init_pred_var={init_pred_var} must be greater than eps={eps}")
        self.hidden, self.init_pred_var, self.eps = hidden, float(init_pred_var), float(eps)
        self.regressors = nn.ModuleList()

    def describe(self) -> str:
        return f"VID({self.pair_names()})"

    def setup(self, probe: StepOutputs) -> None:
        self.regressors = nn.ModuleList()
        for student, teacher in self.pairs(probe):
            hidden = self.hidden or teacher.shape[1]
            aligned_student, aligned_teacher = align_maps(student, teacher)
            regressor = VariationalRegressor(aligned_student.shape, aligned_teacher.shape, hidden, self.init_pred_var, self.eps)
            self.regressors.append(regressor.to(student.device))

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        total = 0.0
        for (student, teacher), regressor in zip(self.pairs(outputs), self.regressors):
            student, teacher = align_maps(student, teacher)
            total = total + gaussian_nll(teacher, *regressor(student))
        return total
