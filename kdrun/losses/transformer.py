"""Transformer distillation terms: hidden states (TinyBERT MSE, DistilBERT cosine) and attention maps.

Each term takes equal-length lists of student and teacher taps and compares
them pair by pair, summing over pairs as TinyBERT sums over its layer mapping.

Layouts. A 3-D feature is ambiguous: a transformer's hidden states are token
sequences (B, T, D), a 1-D CNN's maps are channel-first (B, C, L). Each side
says which it is (``student_layout`` / ``teacher_layout``: ``tokens``, the
default, or ``channels``, e.g. ``loss.hidden_mse.teacher_layout=channels`` for
the default CNN teacher on MNIST-1D with a transformer student). Token
sequences are turned channel-first (B, D, T), so kdrun's shared adapters apply:
a 1x1 convolution is then TinyBERT's per-token projection W_h and map pooling
runs over tokens. Vectors (B, D) and 2-D maps (B, C, H, W) are unambiguous.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.losses.adapters import align_maps, projection
from kdrun.losses.base import StepOutputs
from kdrun.losses.features import PairedFeatureTerm

LAYOUTS = ("tokens", "channels")
FORMS = ("mse", "kl")


def channels_first(feature: torch.Tensor, layout: str) -> torch.Tensor:
    return feature.transpose(1, 2) if layout == "tokens" and feature.dim() == 3 else feature


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """TinyBERT (Jiao et al. 2020, Eq. 6): ``MSE(H_s W_h, H_t)``; ``student`` is already projected."""
    return F.mse_loss(student, teacher)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DistilBERT (Sanh et al. 2019): ``1 - cos(h_s, h_t)`` per token (per position of a map,
    per sample of a vector), averaged. Features are channel-first, so the cosine runs over dim 1."""
    return (1 - F.cosine_similarity(student, teacher, dim=1)).mean()


def relation_map(feature: torch.Tensor) -> torch.Tensor:
    """An attention-like map of a feature that is not one: ``softmax(F F^T / sqrt(C))`` over its
    positions, as one head (B, 1, N, N). A channel-first map's positions are its spatial
    positions; a vector (B, D) counts as a 1-channel signal of D positions."""
    if feature.dim() == 2:
        feature = feature.unsqueeze(1)
    positions = feature.flatten(2).transpose(1, 2)
    scores = positions @ positions.transpose(1, 2) / math.sqrt(positions.shape[-1])
    return scores.softmax(dim=-1).unsqueeze(1)


def pool_attention(attention: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool a (B, h, T, T) map to (B, h, size, size) and renormalise its rows to distributions."""
    if attention.shape[-1] == size:
        return attention
    pooled = F.adaptive_avg_pool2d(attention, (size, size))
    return pooled / pooled.sum(dim=-1, keepdim=True)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, form: str = "mse") -> torch.Tensor:
    """Compare attention maps (B, heads, T, T) of student and teacher.

    ``mse``: TinyBERT's attention loss (Eq. 3), ``1/h sum_i MSE(A_i^S, A_i^T)``, here on the softmax
    probabilities (TinyBERT fits the pre-softmax scores; probabilities keep both forms and relation
    maps in one space). ``kl``: MiniLM (Wang et al. 2020, Eq. 7), ``KL(A^T || A^S)`` per query row,
    averaged over heads and rows. Unequal head counts compare head-averaged maps; unequal token
    counts pool both to the smaller one.
    """
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
    size = min(student.shape[-1], teacher.shape[-1])
    student, teacher = pool_attention(student, size), pool_attention(teacher, size)
    if form == "mse":
        return F.mse_loss(student, teacher)
    log_student = student.clamp_min(torch.finfo(student.dtype).tiny).log()
    return (torch.xlogy(teacher, teacher) - teacher * log_student).sum(dim=-1).mean()


def is_attention(feature: torch.Tensor) -> bool:
    """Whether a tapped tensor is already an attention map: (B, h, T, T) with rows that are distributions."""
    if feature.dim() != 4 or feature.shape[-1] != feature.shape[-2]:
        return False
    rows = feature.float().sum(dim=-1)
    return bool((feature >= 0).all() and torch.allclose(rows, torch.ones_like(rows), atol=1e-3))


class PairedTaps(PairedFeatureTerm):
    """Tap pairs (see :class:`kdrun.losses.features.PairedFeatureTerm`) plus each side's layout of 3-D features."""

    needs_setup = True

    def __init__(
        self,
        student_taps: str | Sequence[str],
        teacher_taps: str | Sequence[str],
        student_layout: str = "tokens",
        teacher_layout: str = "tokens",
    ):
        super().__init__(student_taps, teacher_taps)
        for side, layout in (("student", student_layout), ("teacher", teacher_layout)):
            if layout not in LAYOUTS:
                raise ConfigError(f"{self.symbol}: {side}_layout={layout!r} must be one of {', '.join(LAYOUTS)}")
        self.student_layout, self.teacher_layout = student_layout, teacher_layout

    def require_setup(self, prepared: Sequence) -> None:
        """``prepared`` holds what :meth:`setup` made per pair; without it the term would silently add nothing."""
        if len(prepared) != len(self.student_taps):
            raise RuntimeError(f"{self.describe()}: setup(probe) must run before the first forward")

    def pairs(self, outputs: StepOutputs) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Channel-first (student, teacher) features; the teacher's come detached."""
        for student, teacher in super().pairs(outputs):
            yield channels_first(student, self.student_layout), channels_first(teacher, self.teacher_layout)


class HiddenStates(PairedTaps):
    """Hidden-state matching: pool to a common token count (or flatten unlike layouts), project
    the student with a learned linear map where widths differ, then apply ``distance``."""

    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (projected student, teacher) -> loss

    def __init__(
        self,
        student_taps=("last_stage",),
        teacher_taps=("last_stage",),
        student_layout="tokens",
        teacher_layout="tokens",
    ):
        super().__init__(student_taps, teacher_taps, student_layout, teacher_layout)
        self.projections = nn.ModuleList()

    def describe(self) -> str:
        return f"{self.symbol}({self.pair_names()})"

    def setup(self, probe: StepOutputs) -> None:
        self.projections = nn.ModuleList()
        for student, teacher in self.pairs(probe):
            student, teacher = align_maps(student, teacher)
            same = student.shape[1:] == teacher.shape[1:]
            adapter = nn.Identity() if same else projection(student.shape, teacher.shape, norm=False)
            self.projections.append(adapter.to(student.device))

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        self.require_setup(self.projections)
        total = 0.0
        for (student, teacher), project in zip(self.pairs(outputs), self.projections):
            student, teacher = align_maps(student, teacher)
            total = total + self.distance(project(student), teacher)
        return total


class HiddenMSE(HiddenStates):
    symbol = "HiddenMSE"
    distance = staticmethod(hidden_mse)


class HiddenCosine(HiddenStates):
    symbol = "HiddenCos"
    distance = staticmethod(hidden_cosine)


class AttentionMap(PairedTaps):
    """Attention transfer between tapped attention maps (``stageK.attn.probs`` of kdrun's transformer).

    kdrun's generalisation: a tapped tensor that is not an attention map (a CNN map, an MLP vector,
    hidden states) is replaced by its :func:`relation_map`, so the term runs on any pair when given
    e.g. ``student_taps=[last_stage] teacher_taps=[last_stage]``. Which taps hold attention maps is
    decided once, from the probe batch in :meth:`setup`.
    """

    symbol = "AttnMap"

    def __init__(
        self,
        student_taps=("last_stage.attn.probs",),
        teacher_taps=("last_stage.attn.probs",),
        form: str = "mse",
        student_layout: str = "tokens",
        teacher_layout: str = "tokens",
    ):
        super().__init__(student_taps, teacher_taps, student_layout, teacher_layout)
        if form not in FORMS:
            raise ConfigError(f"{self.symbol}: form={form!r} must be one of {', '.join(FORMS)}")
        self.form = form
        self.attention_taps: list[tuple[bool, bool]] = []

    def describe(self) -> str:
        return f"{self.symbol}({self.form}; {self.pair_names()})"

    def setup(self, probe: StepOutputs) -> None:
        self.attention_taps = [
            (is_attention(probe.student_features[s]), is_attention(probe.teacher_features[t]))
            for s, t in zip(self.student_taps, self.teacher_taps)
        ]

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        self.require_setup(self.attention_taps)
        total = 0.0
        for (student, teacher), (student_is_map, teacher_is_map) in zip(self.pairs(outputs), self.attention_taps):
            student_map = student if student_is_map else relation_map(student)
            teacher_map = teacher if teacher_is_map else relation_map(teacher)
            total = total + attention_loss(student_map, teacher_map, self.form)
        return total
