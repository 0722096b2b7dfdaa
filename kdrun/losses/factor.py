"""Terms that distil through a paraphraser, an autoencoder of the teacher's feature trained
first: FT (factor transfer) and KTAAD (knowledge translation and adaptation + affinity).

Stage ``<symbol>_paraphraser`` trains the paraphraser to reconstruct the teacher's tapped
feature (MSE; KTAAD adds an L1 penalty on the code) while the student is held still; the run's
own training then holds the paraphraser still too (eval mode, no gradients) and matches the
student's adapted feature to its code, the teacher's "factor". Modules follow torchdistill's
``Paraphraser4FactorTransfer`` / ``Translator4FactorTransfer`` / ``Student4KTAAD``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.losses.base import StepOutputs, one_tap
from kdrun.losses.features import PairedFeatureTerm
from kdrun.losses.maps import as_map, batch_norm, conv, conv_transpose, pooled, smallest
from kdrun.losses.stages import PreStage, check_epochs, epochs_text, stage_of


def three_layers(kind, rank: int, in_channels: int, out_channels: int, norm: bool) -> nn.Sequential:
    """Three 3x3 (transposed) convolutions ``in -> in -> out -> out``, each (+ BN) + LeakyReLU(0.1)."""
    layers = []
    for cin, cout in ((in_channels, in_channels), (in_channels, out_channels), (out_channels, out_channels)):
        layers += [kind(rank, cin, cout, 3, stride=1, padding=1), *([batch_norm(rank, cout)] if norm else []), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """An encoder to ``rate`` x the channels (the factor) and a decoder back, on maps of ``rank``."""

    def __init__(self, rank: int, channels: int, rate: float, norm: bool):
        super().__init__()
        factor = self.factor_channels = max(int(channels * rate), 1)
        self.encoder = three_layers(conv, rank, channels, factor, norm)
        self.decoder = three_layers(conv_transpose, rank, factor, channels, norm)


def normalised_l1(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean |s / ||s|| - t / ||t|| |`` of the flattened features (FT's loss with p=1, torchdistill
    ``FTLoss``; KTAAD's ``KTALoss`` with p=1, q=2 is the same)."""
    return F.l1_loss(F.normalize(student.flatten(1), dim=1), F.normalize(teacher.flatten(1), dim=1))


def affinity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KTAAD's affinity distillation: per channel, the ``positions x positions`` affinity of its
    map (normalised over positions) divided by the positions; Frobenius norms of the differences
    summed over channels, averaged over the batch (torchdistill ``AffinityLoss``)."""
    student, teacher = F.normalize(student.flatten(2), dim=2), F.normalize(teacher.flatten(2), dim=2)
    positions = student.shape[2]
    total = 0.0
    # Channel by channel, as the reference: a (batch, positions, positions) affinity at a time.
    for channel in range(student.shape[1]):
        s, t = student[:, channel], teacher[:, channel]
        difference = (s.unsqueeze(2) * s.unsqueeze(1) - t.unsqueeze(2) * t.unsqueeze(1)) / positions
        total = total + difference.flatten(1).norm(dim=1)
    return total.mean()


class Paraphrased(PairedFeatureTerm):
    """The shared part: one student tap, one teacher tap, a paraphraser trained in a pre-stage."""

    needs_setup = True
    code_penalty = 0.0
    paraphraser_norm = False

    def __init__(self, student_taps, teacher_taps, rate: float, paraphraser_epochs: int):
        super().__init__(*one_tap(self.symbol, student_taps, teacher_taps))
        if not 0 < rate <= 1:
            raise ConfigError(f"loss.{self.symbol.lower()}.rate={rate} must be in (0, 1] (the paraphrase rate k)")
        self.rate, self.paraphraser_epochs = float(rate), check_epochs(f"loss.{self.symbol.lower()}.paraphraser_epochs", paraphraser_epochs)
        self.paraphraser: Paraphraser | None = None
        self.frozen = False

    def teacher_map(self, outputs: StepOutputs) -> torch.Tensor:
        return as_map(outputs.teacher_features[self.teacher_taps[0]].detach())

    def pair(self, outputs: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's feature as a map of the teacher map's rank (the paraphraser's)."""
        teacher = self.teacher_map(outputs)
        student = as_map(outputs.student_features[self.student_taps[0]], teacher.dim())
        if student.dim() != teacher.dim():
            raise ConfigError(f"{self.symbol} pairs maps of one kind; got a student feature {tuple(student.shape)} and a "
                              f"teacher feature {tuple(teacher.shape)}")
        return student, teacher

    def prestages(self, weight: float) -> list[PreStage]:
        return [stage_of(self, f"{self.symbol.lower()}_paraphraser", self.paraphraser_epochs, 1.0, trains_student=False,
                         symbol=f"{self.symbol}-paraphraser", teacher_only=True)]

    def build_paraphraser(self, probe: StepOutputs) -> None:
        if self.paraphraser is None:  # else trained by the stage earlier in this run
            teacher = self.teacher_map(probe)
            paraphraser = Paraphraser(teacher.dim(), teacher.shape[1], self.rate, self.paraphraser_norm)
            self.paraphraser = paraphraser.to(teacher.device)

    def stage_setup(self, stage: str, probe: StepOutputs) -> None:
        self.build_paraphraser(probe)

    def stage_loss(self, stage: str, outputs: StepOutputs) -> torch.Tensor:
        """Reconstruction of the teacher's feature (+ the L1 penalty on the code, for KTAAD)."""
        teacher = self.teacher_map(outputs)
        code = self.paraphraser.encoder(teacher)
        loss = F.mse_loss(self.paraphraser.decoder(code), teacher)
        return loss + self.code_penalty * code.abs().sum() if self.code_penalty else loss

    def setup(self, probe: StepOutputs) -> None:
        """The run's own training: the paraphraser (trained in its stage) is held still."""
        self.build_paraphraser(probe)
        self.paraphraser.requires_grad_(False)
        self.frozen = True

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.paraphraser.eval()
        return self

    def factor(self, teacher: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.paraphraser.encoder(teacher)


class FactorTransfer(Paraphrased):
    """FT (Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer",
    NeurIPS 2018): a translator (three 3x3 convs) maps the student's feature to the size of the
    teacher's factor, matched by the L1 distance of L2-normalised vectors. Paraphrase rate k=0.5,
    no BN (torchdistill's ImageNet config); weights CE 1 + FT 200 (RepDistiller ``-b 200``;
    torchdistill's ImageNet config uses 1000). Translator output and factor are pooled to their
    common size where the two maps differ."""

    symbol = "FT"

    def __init__(self, student_taps: str | Sequence[str] = "last_stage", teacher_taps: str | Sequence[str] = "last_stage",
                 rate: float = 0.5, paraphraser_epochs: int = 5):
        super().__init__(student_taps, teacher_taps, rate, paraphraser_epochs)
        self.translator: nn.Module | None = None

    def describe(self) -> str:
        return f"FT(k={self.rate:g}, {self.pair_names()}; paraphraser trained first, {epochs_text(self.paraphraser_epochs)})"

    def setup(self, probe: StepOutputs) -> None:
        super().setup(probe)
        student, _ = self.pair(probe)
        channels = self.paraphraser.factor_channels
        self.translator = three_layers(conv, student.dim(), student.shape[1], channels, False).to(student.device)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        student, teacher = self.pair(outputs)
        translated, factor = self.translator(student), self.factor(teacher)
        size = smallest(translated, factor)
        return normalised_l1(pooled(translated, size), pooled(factor, size))


class KnowledgeAdaptation(Paraphrased):
    """KTAAD (He et al., "Knowledge Adaptation for Efficient Semantic Segmentation", CVPR 2019): a
    feature adapter (3x3 conv + BN + ReLU) matches the teacher's factor by normalised L1 (KTA), and
    an affinity adapter (3x3 conv) matches the factor's per-channel spatial affinities. Paraphraser
    with BN, k=0.5, trained with MSE + 1e-7 x the code's L1 norm; weights CE 1 + 50 KTA + 1 affinity
    (torchdistill's COCO config). Affinities need positions: tap maps on both models."""

    symbol = "KTAAD"
    code_penalty = 1e-7
    paraphraser_norm = True

    def __init__(self, student_taps: str | Sequence[str] = "last_stage", teacher_taps: str | Sequence[str] = "last_stage",
                 rate: float = 0.5, paraphraser_epochs: int = 5, adaptation_weight: float = 50.0,
                 affinity_weight: float = 1.0):
        super().__init__(student_taps, teacher_taps, rate, paraphraser_epochs)
        self.adaptation_weight, self.affinity_weight = float(adaptation_weight), float(affinity_weight)
        self.feature_adapter: nn.Module | None = None
        self.affinity_adapter: nn.Module | None = None

    def describe(self) -> str:
        return (f"KTAAD({self.adaptation_weight:g}*KTA + {self.affinity_weight:g}*Affinity, k={self.rate:g}, "
                f"{self.pair_names()}; paraphraser trained first, {epochs_text(self.paraphraser_epochs)})")

    def setup(self, probe: StepOutputs) -> None:
        super().setup(probe)
        student, _ = self.pair(probe)
        rank, channels = student.dim(), self.paraphraser.factor_channels
        adapter = conv(rank, student.shape[1], channels, 3, stride=1, padding=1)
        self.feature_adapter = nn.Sequential(adapter, batch_norm(rank, channels), nn.ReLU()).to(student.device)
        self.affinity_adapter = conv(rank, student.shape[1], channels, 3, stride=1, padding=1).to(student.device)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        student, teacher = self.pair(outputs)
        factor = self.factor(teacher)
        adapted, affine = self.feature_adapter(student), self.affinity_adapter(student)
        size = smallest(adapted, factor)
        adapted, affine, factor = pooled(adapted, size), pooled(affine, size), pooled(factor, size)
        return self.adaptation_weight * normalised_l1(adapted, factor) + self.affinity_weight * affinity_loss(affine, factor)
