"""Layer-to-layer transfer between transformer language models: TinyBERT and MiniLM.

Taps name blocks as ``stageK`` (K-th block's output, 1-based), ``stage0`` (the embeddings, the
first block's input) and ``stageK:attention`` (its attention probabilities, which need
``attention: eager``); see :mod:`kdrun.features`. A layer mapping pairs student block m (1..M)
with a teacher block g(m) (1..N): ``uniform`` g(m) = round(m N / M) (TinyBERT), ``last`` g(m) =
N - M + m, or an explicit list of teacher blocks. The mapping needs both depths, so it is made in
:meth:`bind`; before that a term names only the last blocks (its taps for strategy checks).

Sequence positions that are padding (``outputs.mask`` False) count nowhere: hidden states are
compared at real tokens only, attention rows at real query tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from kdrun.errors import ConfigError
from kdrun.features import LAST_STAGE
from kdrun.losses.base import StepOutputs, Term

MAPPINGS = ("uniform", "last")
VALUE_LAYOUTS = ("qkv", "v")


def mapped_layers(student_depth: int, teacher_depth: int, mapping: str | Sequence[int]) -> list[int]:
    """Teacher block g(m) for student blocks m = 1..M."""
    if isinstance(mapping, str):
        if mapping not in MAPPINGS:
            raise ConfigError(f"layer mapping {mapping!r} must be uniform, last, or a list of teacher blocks")
        if mapping == "last":
            return [teacher_depth - student_depth + m for m in range(1, student_depth + 1)]
        return [max(1, round(m * teacher_depth / student_depth)) for m in range(1, student_depth + 1)]
    layers = [int(k) for k in mapping]
    if len(layers) != student_depth or not all(1 <= k <= teacher_depth for k in layers):
        raise ConfigError(f"layer mapping {list(mapping)} must list one teacher block (1..{teacher_depth}) for each of "
                          f"the student's {student_depth} blocks")
    return layers


def depth(model: nn.Module, side: str) -> int:
    from kdrun.models.language import block_stack

    stack = block_stack(model)
    if stack is None:
        raise ConfigError(f"the {side} has no list of transformer blocks to map layers between (a transformers model has)")
    return len(stack[1])


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (B, T) over the real positions of ``mask`` (B, T) (all when None)."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """TinyBERT's ``MSE(H_s W_h, H_t)`` over real tokens; ``student`` is already projected. (B, T, D) each."""
    return masked_mean((student - teacher).pow(2).mean(dim=-1), mask)


def row_kl(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(teacher row || student row)`` of (B, h, T, T) distributions, averaged over heads and
    real query rows; unequal head counts compare head-averaged maps (MiniLM, Eq. 7 and 9)."""
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
    log_student = student.clamp_min(torch.finfo(student.dtype).tiny).log()
    per_row = (torch.xlogy(teacher, teacher) - teacher * log_student).sum(dim=-1).mean(dim=1)
    return masked_mean(per_row, mask)


def attention_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """TinyBERT's attention loss ``1/h sum_i MSE(A_i^S, A_i^T)`` on the probabilities, over real
    query rows; unequal head counts compare head-averaged maps."""
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
    return masked_mean((student - teacher).pow(2).mean(dim=(1, 3)), mask)


def value_relation(values: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLM's value relation ``softmax(V_a V_a^T / sqrt(d_k))`` per head: (B, T, D) -> (B, h, T, T)."""
    batch, tokens, width = values.shape
    per_head = values.view(batch, tokens, heads, width // heads).transpose(1, 2)
    return (per_head @ per_head.transpose(-2, -1) / math.sqrt(width // heads)).softmax(dim=-1)


class LayerMapped(Term):
    """A term over mapped (student block, teacher block) pairs; :meth:`bind` makes the pairs."""

    tap_suffix = ""

    def __init__(self, mapping: str | Sequence[int] = "uniform"):
        super().__init__()
        self.mapping = mapping if isinstance(mapping, str) else [int(k) for k in mapping]
        if isinstance(self.mapping, str) and self.mapping not in MAPPINGS:
            raise ConfigError(f"{self.symbol}: mapping={mapping!r} must be uniform, last, or a list of teacher blocks")
        self.student_taps = (LAST_STAGE + self.tap_suffix,)
        self.teacher_taps = (LAST_STAGE + self.tap_suffix,)
        self.pairs: list[tuple[int, int]] = []

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        student_depth = depth(student, "student")
        teachers = mapped_layers(student_depth, depth(teacher, "teacher"), self.mapping)
        self.pairs = list(zip(range(1, student_depth + 1), teachers))
        self.student_taps = tuple(f"stage{m}{self.tap_suffix}" for m, _ in self.pairs)
        self.teacher_taps = tuple(f"stage{n}{self.tap_suffix}" for _, n in self.pairs)

    def shown_mapping(self) -> str:
        return ",".join(f"{m}->{n}" for m, n in self.pairs) if self.pairs else str(self.mapping)

    def tapped(self, outputs: StepOutputs):
        for student_tap, teacher_tap in zip(self.student_taps, self.teacher_taps):
            yield outputs.student_features[student_tap], outputs.teacher_features[teacher_tap].detach()


class LayerHiddenMSE(LayerMapped):
    """TinyBERT's hidden-state loss over the mapped blocks (plus the embeddings, ``embeddings``),
    summed: ``sum_m MSE(H_s^m W_h, H_t^g(m))``, one learned ``W_h`` where widths differ."""

    symbol = "HiddenMSE"
    needs_setup = True

    def __init__(self, mapping: str | Sequence[int] = "uniform", embeddings: bool = True):
        super().__init__(mapping)
        self.embeddings = bool(embeddings)
        self.projection: nn.Module | None = None

    def bind(self, student: nn.Module, teacher: nn.Module) -> None:
        super().bind(student, teacher)
        if self.embeddings:
            self.student_taps, self.teacher_taps = ("stage0", *self.student_taps), ("stage0", *self.teacher_taps)

    def describe(self) -> str:
        return f"{self.symbol}({'emb,' if self.embeddings else ''}{self.shown_mapping()})"

    def setup(self, probe: StepOutputs) -> None:
        student, teacher = next(self.tapped(probe))
        same = student.shape[-1] == teacher.shape[-1]
        self.projection = (nn.Identity() if same else nn.Linear(student.shape[-1], teacher.shape[-1])).to(student.device)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        if self.projection is None:
            raise RuntimeError(f"{self.describe()}: setup(probe) must run before the first forward")
        return sum(hidden_mse(self.projection(s), t, outputs.mask) for s, t in self.tapped(outputs))


class LayerAttention(LayerMapped):
    """TinyBERT's attention loss over the mapped blocks, summed (``form: mse``), or the KL per
    query row as MiniLM transfers attention (``form: kl``)."""

    symbol = "AttnMap"
    tap_suffix = ":attention"

    def __init__(self, mapping: str | Sequence[int] = "uniform", form: str = "mse"):
        super().__init__(mapping)
        if form not in ("mse", "kl"):
            raise ConfigError(f"{self.symbol}: form={form!r} must be mse or kl")
        self.form = form

    def describe(self) -> str:
        return f"{self.symbol}({self.form}; {self.shown_mapping()})"

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        if self.form == "mse":
            return sum(attention_mse(s, t, outputs.mask) for s, t in self.tapped(outputs))
        return sum(row_kl(t, s, outputs.mask) for s, t in self.tapped(outputs))


class MiniLM(Term):
    """MiniLM (Wang et al., NeurIPS 2020): the last block's self-attention distributions and
    value relations, ``KL(A_t || A_s) + KL(VR_t || VR_s)`` per query row. Taps per side: the
    attention probabilities, then the value projection's output; ``<side>_values: qkv`` reads
    the values as the last third of a fused q|k|v projection (GPT-2's ``attn.c_attn``), ``v``
    as the whole tap (BERT's ``attention.self.value``)."""

    symbol = "MiniLM"

    def __init__(self, student_taps: Sequence[str] = ("last_stage:attention", "last_stage.attn.c_attn"),
                 teacher_taps: Sequence[str] = ("last_stage:attention", "last_stage.attn.c_attn"),
                 student_values: str = "qkv", teacher_values: str = "qkv"):
        super().__init__()
        for side, taps, layout in (("student", student_taps, student_values), ("teacher", teacher_taps, teacher_values)):
            if isinstance(taps, str) or len(taps) != 2:
                raise ConfigError(f"{self.symbol}: {side}_taps={taps!r} must list two taps: attention probabilities, values")
            if layout not in VALUE_LAYOUTS:
                raise ConfigError(f"{self.symbol}: {side}_values={layout!r} must be qkv or v")
        self.student_taps, self.teacher_taps = tuple(student_taps), tuple(teacher_taps)
        self.layouts = {"student": student_values, "teacher": teacher_values}

    def relations(self, features: dict, taps: Sequence[str], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        attention, values = features[taps[0]], features[taps[1]]
        if self.layouts[side] == "qkv":
            values = values.chunk(3, dim=-1)[2]
        return attention, value_relation(values, attention.shape[1])

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        student_attention, student_relation = self.relations(outputs.student_features, self.student_taps, "student")
        teacher_attention, teacher_relation = self.relations(outputs.teacher_features, self.teacher_taps, "teacher")
        teacher_attention, teacher_relation = teacher_attention.detach(), teacher_relation.detach()
        return row_kl(teacher_attention, student_attention, outputs.mask) + row_kl(teacher_relation, student_relation, outputs.mask)

