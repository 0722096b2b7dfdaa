"""Response-based terms: terms that read only the two models' logits (and the labels).

Each loss is a pure function of tensors; the ``Term`` classes only hold the
hyper-parameters and read :class:`StepOutputs`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdrun.losses.base import StepOutputs, Term
from kdrun.tasks.base import IGNORE


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each sample's logits over the classes (Sun et al., CVPR 2024).

    The standard deviation is Bessel-corrected (``torch.std``) and ``eps`` is added
    to it, as in the authors' code; the paper writes the population deviation. The
    two differ by the constant ``sqrt((K-1)/K)``, i.e. by a rescaled temperature.
    """
    mean = logits.mean(dim=1, keepdim=True)
    return (logits - mean) / (logits.std(dim=1, keepdim=True) + eps)


def soft_target_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float, standardize_logits: bool = False
) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    The ``T^2`` factor (Hinton et al. 2015) keeps the gradient scale of the soft
    term independent of the temperature, so ``alpha`` means the same at any ``T``.
    With ``standardize_logits`` both logit vectors are z-scored first (see
    :func:`standardize`), so the student matches the teacher's logit *relations*
    rather than their range.
    """
    if standardize_logits:
        student_logits, teacher_logits = standardize(student_logits), standardize(teacher_logits)
    log_p_student = F.log_softmax(student_logits / T, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * T * T


def _kl_per_sample(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=1)


def decoupled_kd_parts(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, T: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(TCKD, NCKD)`` of Zhao et al., CVPR 2022, each times ``T^2``.

    TCKD is the KL between the binary distributions (p_target, 1 - p_target);
    NCKD the KL between the distributions renormalised over the non-target
    classes. Hinton's KD decomposes as ``KD = TCKD + (1 - p_target^teacher) * NCKD``
    (the paper's Eq. 1-3).
    Rather than masking the target with a large negative logit (mdistiller), the
    target column is dropped and the binary log-probabilities come from
    ``logsumexp``, which is exact and stays finite when ``p_target`` -> 1. The columns are
    gathered by index (not boolean masks), so the step needs no host-device sync.
    """
    batch, num_classes = student_logits.shape
    others = torch.arange(num_classes - 1, device=labels.device).expand(batch, -1)
    others = others + (others >= labels[:, None]).long()  # each row's classes but its target, in order

    def split(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = logits / T
        log_total = torch.logsumexp(scaled, dim=1)
        non_target = scaled.gather(1, others)
        target = scaled.gather(1, labels[:, None]).squeeze(1)
        log_binary = torch.stack([target, torch.logsumexp(non_target, dim=1)], dim=1) - log_total[:, None]
        return log_binary, F.log_softmax(non_target, dim=1)

    student_binary, student_rest = split(student_logits)
    teacher_binary, teacher_rest = split(teacher_logits)
    tckd = _kl_per_sample(student_binary, teacher_binary) * T * T
    nckd = _kl_per_sample(student_rest, teacher_rest) * T * T
    return tckd, nckd


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (``eps`` as in DIST's code)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, gamma: float, tau: float
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): ``tau^2 * (beta * inter + gamma * intra)``.

    ``inter`` = 1 - mean over samples of the correlation between the student's and
    the teacher's class-probability vectors; ``intra`` = the same over classes,
    each correlating one class's probabilities across the batch. Probabilities are
    softmaxes at ``tau``; the ``tau^2`` factor follows the authors' classification
    code (``image_classification_sota/lib/models/losses/dist_kd.py``).
    """
    p_student = F.softmax(student_logits / tau, dim=1)
    p_teacher = F.softmax(teacher_logits / tau, dim=1)
    inter = 1 - pearson_rows(p_student, p_teacher).mean()
    intra = 1 - pearson_rows(p_student.t(), p_teacher.t()).mean()
    return tau * tau * (beta * inter + gamma * intra)


class CrossEntropy(Term):
    symbol = "CE"
    needs_teacher = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def describe(self) -> str:
        return f"CE(ls={self.label_smoothing:g})" if self.label_smoothing else "CE"

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        logits, labels = outputs.student_logits, outputs.labels
        if not outputs.partial_labels:
            return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        # Mean over the labelled items only; a batch without any gives 0 (with a graph).
        per_item = F.cross_entropy(logits, labels, ignore_index=IGNORE, label_smoothing=self.label_smoothing, reduction="none")
        return per_item.sum() / (labels != IGNORE).sum().clamp(min=1)


class SoftTargets(Term):
    """Hinton's KD; ``standardize`` z-scores both logit vectors first (Sun et al., CVPR 2024).

    With standardisation the authors keep the ``T^2`` factor and, on CIFAR-100,
    use a base temperature of 2 (3 for some pairs) with weights 0.1*CE + 9*KD
    (their ``tools/train.py``: ``--base-temp 2 --kd-weight 9``); ``loss=kd_ls``.
    """

    symbol = "KD"
    knobs = ("T",)

    def __init__(self, T: float = 4.0, standardize: bool = False):
        super().__init__()
        self.T = float(T)
        self.standardize = bool(standardize)

    def describe(self) -> str:
        return f"KD({self.show('T')}{',std' if self.standardize else ''})"

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return soft_target_kl(outputs.student_logits, outputs.teacher_logits, self.T, self.standardize)


class DecoupledKD(Term):
    """DKD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``, batch mean.

    The loss ramps up over ``warmup_epochs`` as mdistiller's ``DKD.WARMUP``: ``min(e / warmup, 1)``
    with ``e`` the epoch counted from 1, constant within an epoch (1/20 in the first of 20);
    outside training (``progress`` None) it is at full weight. CIFAR-100 defaults: alpha=1,
    beta=8, T=4, warm-up 20, with CE weight 1.
    ``standardize`` applies the logit z-score of Sun et al. (CVPR 2024) first.
    """

    symbol = "DKD"
    knobs = ("T",)

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, warmup_epochs: float = 20, standardize: bool = False
    ):
        super().__init__()
        self.alpha, self.beta, self.T = float(alpha), float(beta), float(T)
        self.warmup_epochs = float(warmup_epochs)
        self.standardize = bool(standardize)

    def describe(self) -> str:
        return f"DKD(a={self.alpha:g},b={self.beta:g},{self.show('T')}{',std' if self.standardize else ''})"

    def warmup(self, progress: float | None) -> float:
        if progress is None or self.warmup_epochs <= 0:
            return 1.0
        return min((math.floor(progress) + 1) / self.warmup_epochs, 1.0)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        student, teacher = outputs.student_logits, outputs.teacher_logits
        if self.standardize:
            student, teacher = standardize(student), standardize(teacher)
        tckd, nckd = decoupled_kd_parts(student, teacher, outputs.targets(), self.T)
        return self.warmup(outputs.progress) * (self.alpha * tckd + self.beta * nckd).mean()


class DIST(Term):
    """DIST (Huang et al., NeurIPS 2022): Pearson-correlation relations instead of an exact KL match.

    Class defaults are the paper's ImageNet ones (beta=gamma=1, tau=1); on CIFAR-100
    the authors use tau=4 (``kd: dist_t4``) with the term weighted 2 beside CE
    weighted 1 (``configs/strategies/distill/dist_cifar.yaml``), as ``loss=dist`` does.
    """

    symbol = "DIST"
    knobs = ("tau",)

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0):
        super().__init__()
        self.beta, self.gamma, self.tau = float(beta), float(gamma), float(tau)

    def describe(self) -> str:
        return f"DIST(b={self.beta:g},g={self.gamma:g},{self.show('tau')})"

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        return dist_loss(outputs.student_logits, outputs.teacher_logits, self.beta, self.gamma, self.tau)
