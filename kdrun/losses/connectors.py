"""Terms that map the student's feature onto the teacher's through a learned connector and compare
them position by position: OFD (margin ReLU + partial L2), AB (activation boundaries) and CWD
(channel-wise distributions).

A connector is a convolution (1x1 unless set) + batch norm to the teacher's channels; a vector
student is mapped by a linear layer onto the teacher's whole map (channels and positions), so
the teacher's feature is compared as it is. Connector output and teacher feature are then
average-pooled to their common (smallest) size. Over several pairs (listed shallow to deep) OFD
and AB weight pair ``i`` of ``n`` by ``1 / 2^(n-1-i)``, as the authors' code does.
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
from kdrun.losses.maps import as_map, batch_norm, conv, pooled, smallest
from kdrun.losses.stages import Initialisation, check_epochs, epochs_text


def he_normal_(module: nn.Module) -> None:
    """Weights ~ N(0, 2 / (kernel positions x output channels)), BN at identity (OFD's and AB's init)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            fan_out = layer.weight[0, 0].numel() * layer.weight.shape[0]
            layer.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class Connector(nn.Module):
    """Student feature -> the teacher's channels: conv (+ BN, + ReLU) for a map; for a vector, a
    linear layer onto the teacher's channels x positions, reshaped to the teacher's map (+ BN, + ReLU)."""

    def __init__(self, student: torch.Tensor, teacher: torch.Tensor, kernel_size: int = 1, relu: bool = False):
        super().__init__()
        rank = teacher.dim()
        channels, positions = teacher.shape[1], teacher.shape[2:]
        if student.dim() == 2:
            layers = [nn.Linear(student.shape[1], channels * math.prod(positions), bias=False),
                      nn.Unflatten(1, (channels, *positions))]
        elif student.dim() == rank:
            layers = [conv(rank, student.shape[1], channels, kernel_size, padding=(kernel_size - 1) // 2, bias=False)]
        else:
            raise ConfigError(f"a connector cannot map a student feature {tuple(student.shape)} onto a teacher feature "
                              f"{tuple(teacher.shape)}; choose taps of the same kind")
        layers.append(batch_norm(rank, channels))
        self.layers = nn.Sequential(*layers, *([nn.ReLU()] if relu else []))
        he_normal_(self.layers)

    def forward(self, student: torch.Tensor) -> torch.Tensor:
        return self.layers(student)


class ConnectedTerm(PairedFeatureTerm):
    """Pairs ``student_taps[i] -> teacher_taps[i]`` through one connector each (built in setup)."""

    needs_setup = True
    kernel_size, relu = 1, False

    def __init__(self, student_taps: Sequence[str], teacher_taps: Sequence[str]):
        super().__init__(student_taps, teacher_taps)
        self.connectors = nn.ModuleList()

    def describe(self) -> str:
        return f"{self.symbol}({self.pair_names()})"

    def teacher_maps(self, outputs: StepOutputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each pair with the teacher as a map (a vector: one position, of the student's rank)."""
        return [(student, as_map(teacher, max(student.dim(), 3))) for student, teacher in self.pairs(outputs)]

    def setup(self, probe: StepOutputs) -> None:
        if len(self.connectors):  # built in an earlier stage of this run
            return
        connectors = [Connector(student, teacher, self.kernel_size, self.relu) for student, teacher in self.teacher_maps(probe)]
        self.connectors = nn.ModuleList(connectors).to(probe.student_logits.device)

    def connected(self, outputs: StepOutputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each pair as (connector(student), teacher), pooled to their common size."""
        pairs = []
        for (student, teacher), connector in zip(self.teacher_maps(outputs), self.connectors):
            student = connector(student)
            size = smallest(student, teacher)
            pairs.append((pooled(student, size), pooled(teacher, size)))
        return pairs


def ofd_margin(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """OFD's margin per channel: ``E[x | x < 0]`` for ``x ~ N(mean, std^2)``, the expected negative
    response (``-3 std`` where ``P(x < 0) <= 0.001``), as mdistiller's ``init_ofd_modules``."""
    std = std.abs()
    below = torch.special.ndtr(-mean / std)
    expected = -std * torch.exp(-((mean / std) ** 2) / 2) / math.sqrt(2 * math.pi) / below + mean
    return torch.where(below > 0.001, expected, -3 * std)


def ofd_partial_l2(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Heo et al. 2019, Eq. 6: the squared error against the teacher's margin-ReLU response
    ``max(t, margin)``, skipped where that response is <= 0 and the student already lies below
    it; summed over channels and positions, averaged over the batch (mdistiller ``feat_loss``)."""
    margin = margin.view(1, -1, *[1] * (student.dim() - 2)).to(student)
    loss = ((student - margin) ** 2 * ((student > margin) & (teacher <= margin)).float()
            + (student - teacher) ** 2 * ((student > teacher) & (teacher > margin) & (teacher <= 0)).float()
            + (student - teacher) ** 2 * (teacher > 0).float())
    return loss.mean(dim=0).sum()


class OFD(ConnectedTerm):
    """OFD (Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019).

    The margin of each teacher channel is the expected negative response of a Gaussian with the
    channel's mean and standard deviation. mdistiller reads them from the batch norm before the
    teacher's ReLU; a term sees features only, so kdrun measures them on the teacher's tapped
    feature over the probe batch (in eval mode, a BN output's mean and deviation per channel are
    its bias and scale). The paper taps pre-ReLU features; on post-ReLU stage outputs (what most
    models' taps give) every teacher response is >= 0 > margin, so the margin never binds and the
    loss is the partial L2 that spares student responses below zero where the teacher is silent.
    mdistiller's CIFAR-100 weights: CE 1 + OFD 0.001.
    """

    symbol = "OFD"

    def __init__(self, student_taps: Sequence[str] = ("stage1", "last_stage"),
                 teacher_taps: Sequence[str] = ("stage1", "last_stage"), kernel_size: int = 1):
        super().__init__(student_taps, teacher_taps)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"loss.ofd.kernel_size={kernel_size} must be an odd number >= 1")
        self.kernel_size = int(kernel_size)

    def setup(self, probe: StepOutputs) -> None:
        super().setup(probe)
        for i, (_, teacher) in enumerate(self.teacher_maps(probe)):
            per_channel = teacher.transpose(0, 1).flatten(1)
            self.register_buffer(f"margin_{i}", ofd_margin(per_channel.mean(dim=1), per_channel.std(dim=1).clamp(min=1e-6)))

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        pairs = self.connected(outputs)
        return sum(ofd_partial_l2(student, teacher, getattr(self, f"margin_{i}")) / 2 ** (len(pairs) - 1 - i)
                   for i, (student, teacher) in enumerate(pairs))


def alternative_l2(student: torch.Tensor, teacher: torch.Tensor, margin: float) -> torch.Tensor:
    """AB's loss (Heo et al., AAAI 2019, Eq. 7): a squared hinge that pushes the student's
    response beyond ``margin`` on the side of zero the teacher's response is on, summed."""
    return ((student + margin) ** 2 * ((student > -margin) & (teacher <= 0)).float()
            + (student - margin) ** 2 * ((student <= margin) & (teacher > 0)).float()).sum()


class ActivationBoundaries(Initialisation, ConnectedTerm):
    """AB (Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
    Neurons", AAAI 2019): the student, through connectors, learns on which side of zero each
    teacher neuron's response lies. AB is an initialisation: the student first trains on it alone
    for ``init_epochs`` (stage ``ab_init``, at this term's weight; connectors and student learn),
    and the term adds nothing after it, as RepDistiller's ``abound`` and the authors' code do. A
    teacher response only counts by its sign, so post-ReLU stage outputs lose nothing.
    Per batch, pair ``i`` of ``n`` weighs ``1 / 2^(n-1-i)``, divided by the batch size; the authors
    scale the sum by 3/1000 (the term's weight 0.003 here).
    """

    symbol = "AB"

    def __init__(self, student_taps: Sequence[str] = ("stage1", "last_stage"),
                 teacher_taps: Sequence[str] = ("stage1", "last_stage"), margin: float = 1.0, init_epochs: int = 5):
        super().__init__(student_taps, teacher_taps)
        if margin < 0:
            raise ConfigError(f"loss.ab.margin={margin} must be >= 0")
        self.margin, self.init_epochs = float(margin), check_epochs("loss.ab.init_epochs", init_epochs)

    def describe(self) -> str:
        return f"AB(m={self.margin:g}, {self.pair_names()}; initialisation only, {epochs_text(self.init_epochs)})"

    def initialisation_loss(self, outputs: StepOutputs) -> torch.Tensor:
        pairs = self.connected(outputs)
        total = sum(alternative_l2(student, teacher, self.margin) / 2 ** (len(pairs) - 1 - i)
                    for i, (student, teacher) in enumerate(pairs))
        return total / len(outputs.student_logits)


def channel_distribution_kl(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """CWD (Shu et al., ICCV 2021): each channel's map as a distribution over positions
    (``softmax(x / T)``), ``T^2 * KL(teacher || student)`` summed and divided by batch x channels
    (the authors' ``CriterionCWD(norm_type='channel', divergence='kl')``)."""
    batch, channels = student.shape[:2]
    log_q_student = F.log_softmax(student.flatten(2) / T, dim=2)
    log_q_teacher = F.log_softmax(teacher.flatten(2) / T, dim=2)
    kl = F.kl_div(log_q_student, log_q_teacher, reduction="sum", log_target=True)
    return kl / (batch * channels) * T * T


class ChannelWiseDistillation(ConnectedTerm):
    """CWD: the student's channels, through a 1x1 conv + BN + ReLU connector (the authors'
    ``cwd_feat``), match the teacher's channel-wise spatial distributions. Maps need positions: a
    vector student is mapped onto the teacher's map, and a teacher vector would give every channel
    one position (and the loss 0), so tap a map on the teacher. The authors' setting: T=4,
    weight 3 (their logit maps); summed over tap pairs."""

    symbol = "CWD"
    relu = True
    knobs = ("T",)

    def __init__(self, student_taps: Sequence[str] = ("last_stage",), teacher_taps: Sequence[str] = ("last_stage",),
                 T: float = 4.0):
        super().__init__(student_taps, teacher_taps)
        self.T = float(T)

    def describe(self) -> str:
        return f"CWD({self.show('T')}, {self.pair_names()})"

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return sum(channel_distribution_kl(student, teacher, self.T) for student, teacher in self.connected(outputs))
