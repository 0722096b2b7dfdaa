"""ReviewKD (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021).

Each student level, fused with the (already fused) deeper levels by attention-based fusion
(ABF), is matched to the teacher's feature of that level by the hierarchical context loss
(HCL): MSE at full resolution plus MSE after pooling to 4, 2 and 1 positions per side, halving
weights. Taps are listed shallow to deep, student and teacher one to one (the last is usually
``embedding``); as in the authors' code the fusion runs from the deepest level up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.losses.base import StepOutputs
from kdrun.losses.features import PairedFeatureTerm
from kdrun.losses.maps import as_map, batch_norm, conv, pooled, size_of


def hcl_loss(students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor], sizes=(4, 2, 1)) -> torch.Tensor:
    """Sum over levels of ``(MSE + sum_k w_k MSE(pool_k)) / (1 + sum_k w_k)``, ``w`` = 1/2, 1/4, ...
    for each pooled size ``k`` smaller than the map's first spatial side (mdistiller ``hcl_loss``)."""
    total = 0.0
    for student, teacher in zip(students, teachers):
        loss, weight, weights = F.mse_loss(student, teacher), 1.0, 1.0
        for size in sizes:
            if size >= student.shape[2]:
                continue
            weight /= 2.0
            target_size = (size,) * (student.dim() - 2)
            loss = loss + weight * F.mse_loss(pooled(student, target_size), pooled(teacher, target_size))
            weights += weight
        total = total + loss / weights
    return total


class AttentionFusion(nn.Module):
    """ABF: a 1x1 conv + BN to ``mid`` channels; where a deeper level exists, a 1x1 conv + sigmoid
    gives two attention maps that mix this level with the deeper one (resized here, nearest);
    then a 3x3 conv + BN to the teacher's channels at the teacher's size. Returns the output
    and the mixed feature the next (shallower) level fuses with."""

    def __init__(self, rank: int, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(conv(rank, in_channels, mid_channels, 1, bias=False), batch_norm(rank, mid_channels))
        self.output = nn.Sequential(conv(rank, mid_channels, out_channels, 3, padding=1, bias=False),
                                    batch_norm(rank, out_channels))
        self.attention = nn.Sequential(conv(rank, 2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.output[0].weight, a=1)

    def forward(self, feature: torch.Tensor, deeper: torch.Tensor | None, out_size: tuple[int, ...]):
        mixed = self.reduce(feature)
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=size_of(mixed), mode="nearest")
            attention = self.attention(torch.cat([mixed, deeper], dim=1))
            mixed = mixed * attention[:, :1] + deeper * attention[:, 1:]
        if size_of(mixed) != tuple(out_size):
            mixed = F.interpolate(mixed, size=out_size, mode="nearest")
        return self.output(mixed), mixed


class ReviewKD(PairedFeatureTerm):
    """The student's levels reviewed deep to shallow through ABFs, matched to the teacher's by HCL.

    The loss ramps up over the first ``warmup_epochs`` as mdistiller's ``min(epoch / 20, 1)``
    with its 1-based whole epochs (full weight outside training). Vectors (MLP stages,
    ``embedding``) are read as maps of one position (:mod:`kdrun.losses.maps`). mdistiller's
    teacher levels are pre-ReLU; kdrun's taps give the stage outputs. CIFAR-100 weights there:
    CE 1 + ReviewKD 1 (5 for resnet32x4 -> resnet8x4), mid channels ``min(512, last student width)``.
    """

    symbol = "ReviewKD"
    needs_setup = True

    def __init__(self, student_taps: Sequence[str] = ("stage1", "last_stage", "embedding"),
                 teacher_taps: Sequence[str] = ("stage1", "last_stage", "embedding"), warmup_epochs: float = 20,
                 max_mid_channels: int = 512, pool_sizes: Sequence[int] = (4, 2, 1)):
        super().__init__(student_taps, teacher_taps)
        if warmup_epochs < 0 or max_mid_channels < 1:
            raise ConfigError(f"loss.reviewkd needs warmup_epochs >= 0 and max_mid_channels >= 1 "
                              f"(got {warmup_epochs}, {max_mid_channels})")
        self.warmup_epochs, self.max_mid_channels = float(warmup_epochs), int(max_mid_channels)
        self.pool_sizes = tuple(int(size) for size in pool_sizes)
        self.fusions = nn.ModuleList()

    def describe(self) -> str:
        return f"ReviewKD({self.pair_names()})"

    def levels(self, outputs: StepOutputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Student and teacher levels as maps of one rank (the highest among them, at least 1-D)."""
        pairs = list(self.pairs(outputs))
        rank = max(3, *(feature.dim() for pair in pairs for feature in pair))
        return [as_map(s, rank) for s, _ in pairs], [as_map(t, rank) for _, t in pairs]

    def setup(self, probe: StepOutputs) -> None:
        students, teachers = self.levels(probe)
        rank, mid = students[0].dim(), min(self.max_mid_channels, students[-1].shape[1])
        last = len(students) - 1
        fusions = [AttentionFusion(rank, s.shape[1], mid, t.shape[1], fuse=i < last)
                   for i, (s, t) in enumerate(zip(students, teachers))]
        self.fusions = nn.ModuleList(fusions).to(students[0].device)

    def warmup(self, progress: float | None) -> float:
        if progress is None or self.warmup_epochs <= 0:
            return 1.0
        return min((math.floor(progress) + 1) / self.warmup_epochs, 1.0)

    def reviewed(self, students: list[torch.Tensor], teachers: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each level's fused output, from the deepest up, returned shallow to deep."""
        outputs, deeper = [], None
        for index in reversed(range(len(students))):
            output, deeper = self.fusions[index](students[index], deeper, size_of(teachers[index]))
            outputs.insert(0, output)
        return outputs

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        students, teachers = self.levels(outputs)
        return self.warmup(outputs.progress) * hcl_loss(self.reviewed(students, teachers), teachers, self.pool_sizes)
