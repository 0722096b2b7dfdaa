"""Logit methods beyond Hinton's KD: NKD (normalised KD), CTKD (a learned, adversarial,
curriculum temperature) and MLKD (multi-level logit alignment over temperatures and two views).

Each loss is a pure function of logits; the ``Term`` classes hold the settings (and CTKD's
temperature parameter) and read :class:`StepOutputs`. Constants follow the authors' code.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.data.augment import random_crop, random_roll
from kdrun.data.views import Views
from kdrun.errors import ConfigError
from kdrun.losses.base import StepOutputs, Term
from kdrun.losses.logits import soft_target_kl


def without_target(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B, K-1)``: each row without its label's column."""
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
    return logits[keep].view(len(logits), -1)


def nkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, T: float,
             gamma: float) -> torch.Tensor:
    """NKD (Yang et al., ICCV 2023): ``-mean(p_t^T log p_t^S)`` on the target class at temperature 1,
    plus ``-gamma T^2 mean sum(q^T log q^S)`` over the non-target classes renormalised at ``T``
    (a cross-entropy, as in the authors' ``NKDLoss``: the teacher's entropy is not subtracted)."""
    target = labels[:, None]
    log_p_student = F.log_softmax(student_logits, dim=1).gather(1, target)
    p_teacher = F.softmax(teacher_logits, dim=1).gather(1, target)
    target_part = -(p_teacher * log_p_student).mean()
    log_q_student = F.log_softmax(without_target(student_logits, labels) / T, dim=1)
    q_teacher = F.softmax(without_target(teacher_logits, labels) / T, dim=1)
    return target_part - gamma * T * T * (q_teacher * log_q_student).sum(dim=1).mean()


class NKD(Term):
    """Normalised KD: the target class and the renormalised non-target classes are matched apart.
    The authors' CIFAR-100 setting (``configs/distillers/cifar100/res34_distill_res18_cifar.py``)
    is T=3, gamma=3.5 beside CE weighted 1; on ImageNet T=1, gamma=1.5 (``NKDLoss`` defaults)."""

    symbol = "NKD"
    knobs = ("T",)

    def __init__(self, T: float = 1.0, gamma: float = 1.5):
        super().__init__()
        self.T, self.gamma = float(T), float(gamma)

    def describe(self) -> str:
        return f"NKD({self.show('T')},gamma={self.gamma:g})"

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return nkd_loss(outputs.student_logits, outputs.teacher_logits, outputs.targets(), self.T, self.gamma)


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-strength`` (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.strength * grad, None


def cosine_curriculum(epoch: int, start: float, end: float, epochs: int) -> float:
    """``start`` at epoch 0 to ``end`` from epoch ``epochs`` on, along half a cosine (CTKD's ``CosineDecay``)."""
    step = min(max(epoch, 0), epochs)
    return start + (end - start) * (1 - math.cos(math.pi * step / epochs)) / 2


class CurriculumTemperature(Term):
    """CTKD (Li et al., AAAI 2023): KD at a temperature the term learns, adversarially.

    ``T = t_min + t_span * sigmoid(theta)`` with ``theta`` a parameter trained with the student
    (``Global_T``, initial 1). Its gradient passes a gradient-reversal layer, so ``theta`` ascends the
    KD loss the student descends (the student meets ever harder temperatures); the reversal's
    strength follows a curriculum, from ``reversal_start`` to ``reversal_end`` over the first
    ``reversal_epochs`` epochs on half a cosine (the authors' ``--decay_max 0 --decay_min -1
    --decay_loops 10``, read in whole 1-based epochs as their loop does). The loss is
    ``T^2 * KL(softmax(t/T) || softmax(s/T))``; weights 0.1 * CE + 0.9 * CTKD as their CIFAR-100 script.
    """

    symbol = "CTKD"

    def __init__(self, t_min: float = 1.0, t_span: float = 20.0, reversal_start: float = 0.0, reversal_end: float = 1.0,
                 reversal_epochs: int = 10):
        super().__init__()
        if t_min <= 0 or t_span < 0 or reversal_epochs < 1:
            raise ConfigError(f"loss.ctkd needs t_min > 0, t_span >= 0 and reversal_epochs >= 1 "
                              f"(got t_min={t_min}, t_span={t_span}, reversal_epochs={reversal_epochs})")
        self.t_min, self.t_span = float(t_min), float(t_span)
        self.reversal_start, self.reversal_end, self.reversal_epochs = float(reversal_start), float(reversal_end), int(reversal_epochs)
        self.theta = nn.Parameter(torch.ones(1))

    def describe(self) -> str:
        return (f"CTKD(T learned in [{self.t_min:g}, {self.t_min + self.t_span:g}], now {self.temperature().item():.3g}; "
                f"reversal {self.reversal_start:g}->{self.reversal_end:g} over {self.reversal_epochs} epochs)")

    def strength(self, progress: float | None) -> float:
        """The reversal's strength in the epoch of ``progress`` (full outside training)."""
        epoch = self.reversal_epochs if progress is None else math.floor(progress) + 1
        return cosine_curriculum(epoch, self.reversal_start, self.reversal_end, self.reversal_epochs)

    def temperature(self, strength: float = 0.0) -> torch.Tensor:
        return self.t_min + self.t_span * torch.sigmoid(GradientReversal.apply(self.theta, strength))

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        T = self.temperature(self.strength(outputs.progress))
        log_p_student = F.log_softmax(outputs.student_logits / T, dim=1)
        p_teacher = F.softmax(outputs.teacher_logits / T, dim=1)
        return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * T.squeeze() ** 2


def class_correlation(logits: torch.Tensor, T: float) -> torch.Tensor:
    """``P^T P`` (classes x classes) of the softened predictions ``P`` of a batch."""
    probs = F.softmax(logits / T, dim=1)
    return probs.t() @ probs


def batch_correlation(logits: torch.Tensor, T: float) -> torch.Tensor:
    """``P P^T`` (samples x samples) of the softened predictions."""
    probs = F.softmax(logits / T, dim=1)
    return probs @ probs.t()


def below_median(values: torch.Tensor) -> torch.Tensor:
    """The share of ``values`` at or below their median (linear interpolation, as ``np.percentile``)."""
    return (values <= torch.quantile(values, 0.5)).float().mean()


def mlkd_loss(weak_student: torch.Tensor, weak_teacher: torch.Tensor, strong_student: torch.Tensor,
              strong_teacher: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """MLKD (Jin et al., CVPR 2023), as the authors' ``KD_ours.forward_train`` computes it.

    Over every temperature: instance KD (``T^2 KL``) on both views, class correlation
    (``||C_s - C_t||^2 / K``, ``C = P^T P``) and batch correlation (``||B_s - B_t||^2 / N``,
    ``B = P P^T``) on the weak view. As in that code, the confidence masks multiply losses already
    averaged over the batch, so they scale each weak-view part by the share of samples (for the
    class term: of classes) whose teacher confidence is at or below the median; and the strong-view
    KD at the last two temperatures reads the weak view's logits.
    """
    p_teacher = F.softmax(weak_teacher, dim=1)
    sample_share = below_median(p_teacher.max(dim=1).values)
    class_share = below_median(p_teacher.sum(dim=0))
    batch, classes = weak_teacher.shape
    total = weak_student.new_zeros(())
    for i, T in enumerate(temperatures):
        strong_pair = (strong_student, strong_teacher) if i < len(temperatures) - 2 else (weak_student, weak_teacher)
        total = total + sample_share * soft_target_kl(weak_student, weak_teacher, T) + soft_target_kl(*strong_pair, T)
        class_gap = (class_correlation(weak_teacher, T) - class_correlation(weak_student, T)).pow(2).sum() / classes
        batch_gap = (batch_correlation(weak_teacher, T) - batch_correlation(weak_student, T)).pow(2).sum() / batch
        total = total + class_share * class_gap + sample_share * batch_gap
    return total


def strong_augmentation(inputs: torch.Tensor) -> list[torch.Tensor]:
    """MLKD's strongly augmented copy (RandAugment(2, 10) on images in the authors' data code),
    as kdrun does it on tensors: for images a crop shifted by up to 1/8 of the side, a flip and a
    cutout of half the side; for signals a circular shift by up to 1/8 of the length and Gaussian
    noise of a tenth of the batch's standard deviation. Draws come from torch's RNG, which the
    loop seeds per epoch, so a resumed run sees the same copies."""
    generator = torch.Generator(device=inputs.device).manual_seed(int(torch.randint(0, 2**62, ())))
    if inputs.dim() == 4:
        side = inputs.shape[-1]
        strong = random_crop(inputs, max(side // 8, 1), (0.0,), generator)
        flipped = torch.rand(len(inputs), device=inputs.device, generator=generator) < 0.5
        strong = torch.where(flipped.view(-1, 1, 1, 1), strong.flip(-1), strong)
        return [cutout(strong, max(side // 2, 1), generator)]
    if inputs.dim() == 3:
        strong = random_roll(inputs, max(inputs.shape[-1] // 8, 1), generator)
        noise = torch.randn(inputs.shape, device=inputs.device, generator=generator, dtype=inputs.dtype)
        return [strong + 0.1 * inputs.std() * noise]
    raise ConfigError(f"MLKD's strong view needs images or signals; the inputs are {tuple(inputs.shape)}")


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Each image with a ``size`` x ``size`` square (clipped at the border) set to zero at a random centre."""
    batch, _, height, width = images.shape
    centre_y = torch.randint(0, height, (batch, 1, 1), device=images.device, generator=generator)
    centre_x = torch.randint(0, width, (batch, 1, 1), device=images.device, generator=generator)
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    hole = ((rows - centre_y).abs() <= size // 2) & ((cols - centre_x).abs() <= size // 2)
    return images.masked_fill(hole[:, None], 0.0)


STRONG_VIEW = Views("a strongly augmented copy", 2, strong_augmentation, labelled=True)


class MultiLevelKD(Term):
    """MLKD: instance, class and batch relations of the predictions at several temperatures, on the
    batch as loaded (weak view) and a strongly augmented copy (:data:`STRONG_VIEW`; both keep the
    label, so CE sees both views, as the authors' ``loss_ce`` sums them). Their CIFAR-100 weights are
    0.1 * (CE_weak + CE_strong) + 0.9 * (the sum below), i.e. 0.2 * CE (a mean over both views) +
    0.9 * MLKD; temperatures 4, 3, 5, 2, 6 (their base T=4 first)."""

    symbol = "MLKD"
    views = STRONG_VIEW

    def __init__(self, temperatures=(4.0, 3.0, 5.0, 2.0, 6.0)):
        super().__init__()
        if len(temperatures) < 2 or any(T <= 0 for T in temperatures):
            raise ConfigError(f"loss.mlkd.temperatures={list(temperatures)} must list at least two temperatures > 0")
        self.temperatures = tuple(float(T) for T in temperatures)

    def describe(self) -> str:
        return f"MLKD(T={','.join(f'{T:g}' for T in self.temperatures)}; weak+strong views)"

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        student, teacher = outputs.student_logits, outputs.teacher_logits
        return mlkd_loss(student[0::2], teacher[0::2], student[1::2], teacher[1::2], self.temperatures)
