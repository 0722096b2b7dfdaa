"""SSKD (Xu et al., "Knowledge Distillation Meets Self-Supervision", ECCV 2020).

Every training sample comes with three transformed copies (:data:`ROTATED_VIEWS`: an image
turned by 90, 180, 270 degrees), which carry no label, so CE sees the originals only. A
self-supervision head on each model's pooled feature scores, for every copy, which original it
came from (cosine similarities, a contrastive prediction). The teacher's head is trained first
on that task (stage ``sskd_teacher_head``, teacher and student held still); the student then
learns, beside CE on the originals, KD on the originals, the teacher's similarity structure
(ss), and the teacher's predictions on the copies (tf), each restricted to the copies the
teacher ranks well (all its correct ones and the best ``ratio`` of the rest). As torchdistill's
``AuxSSKDLoss`` / ``SSKDLoss`` / ``SSWrapper4SSKD``, which refactor the authors' ``student.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.data.views import Views, rotations
from kdrun.errors import ConfigError
from kdrun.losses.base import StepOutputs, Term, one_tap
from kdrun.losses.logits import soft_target_kl
from kdrun.losses.projector import pooled_vector
from kdrun.losses.stages import PreStage, check_epochs, epochs_text, stage_of

ROTATED_VIEWS = Views("rotated copies", 4, rotations, labelled=False)
VIEWS = ROTATED_VIEWS.count


def copy_similarities(head_outputs: torch.Tensor) -> torch.Tensor:
    """``(3B, B)``: the cosine similarity of each copy's head output with each original's."""
    originals, copies = head_outputs[0::VIEWS], split_copies(head_outputs)
    return F.cosine_similarity(copies.unsqueeze(2), originals.t().unsqueeze(0), dim=1)


def split_copies(items: torch.Tensor) -> torch.Tensor:
    """The copies' rows (every item but each sample's first), in sample order."""
    keep = torch.arange(len(items), device=items.device) % VIEWS != 0
    return items[keep]


def copy_owners(samples: int, device) -> torch.Tensor:
    """For each copy, the index of its original: 0, 0, 0, 1, 1, 1, ..."""
    return torch.arange(samples, device=device).repeat_interleave(VIEWS - 1)


def well_ranked(scores: torch.Tensor, targets: torch.Tensor, ratio: float) -> torch.Tensor:
    """Rows whose target the teacher ranks first, and the best-ranked ``ratio`` of the others
    (by the target's rank), in row order (SSKD's error-level ranking)."""
    order = torch.argsort(scores, dim=1, descending=True)
    ranks = torch.argmax(torch.eq(order, targets.unsqueeze(1)).long(), dim=1)
    wrong = int(torch.count_nonzero(ranks))
    keep = len(ranks) - wrong + int(wrong * ratio)
    return torch.sort(torch.argsort(ranks)[:keep])[0]


def self_supervision_loss(head_outputs: torch.Tensor) -> torch.Tensor:
    """The head's own task: cross-entropy of each copy's similarities against its original."""
    similarities = copy_similarities(head_outputs)
    return F.cross_entropy(similarities, copy_owners(similarities.shape[1], similarities.device))


def sskd_loss(student_logits, teacher_logits, student_heads, teacher_heads, labels, settings: dict) -> torch.Tensor:
    """``kl_weight * KD(originals) + ss_weight * KD(similarities, ranked) + tf_weight * KD(copies,
    ranked)``; ``labels`` are the originals'. CE on the originals is the recipe's own term."""
    originals = labels.shape[0]
    kd = soft_target_kl(student_logits[0::VIEWS], teacher_logits[0::VIEWS], settings["kl_T"])
    copy_teacher = F.softmax(split_copies(teacher_logits) / settings["tf_T"], dim=1)
    tf_rows = well_ranked(copy_teacher, labels.repeat_interleave(VIEWS - 1), settings["tf_ratio"])
    tf = soft_target_kl(split_copies(student_logits)[tf_rows], split_copies(teacher_logits)[tf_rows], settings["tf_T"])
    teacher_similarities = copy_similarities(teacher_heads).detach()
    ss_rows = well_ranked(teacher_similarities, copy_owners(originals, labels.device), settings["ss_ratio"])
    ss = soft_target_kl(copy_similarities(student_heads)[ss_rows], teacher_similarities[ss_rows], settings["ss_T"])
    return settings["kl_weight"] * kd + settings["ss_weight"] * ss + settings["tf_weight"] * tf


def head(width: int) -> nn.Sequential:
    """The self-supervision head: linear, ReLU, linear at the feature's width."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


class SelfSupervisedKD(Term):
    """SSKD on the pooled features (``embedding``); a tapped map is averaged over its positions.
    Defaults: torchdistill's ImageNet config (T 4 / 0.5 / 4, ratios 0.75 / 1.0, weights
    CE 1, KD 0.9, ss 10, tf 2.7); the teacher's head trains for ``head_epochs`` first."""

    symbol = "SSKD"
    views = ROTATED_VIEWS
    needs_setup = True

    def __init__(self, student_taps: str = "embedding", teacher_taps: str = "embedding", kl_T: float = 4.0,
                 ss_T: float = 0.5, tf_T: float = 4.0, ss_ratio: float = 0.75, tf_ratio: float = 1.0,
                 kl_weight: float = 0.9, ss_weight: float = 10.0, tf_weight: float = 2.7, head_epochs: int = 5):
        super().__init__()
        self.student_taps, self.teacher_taps = one_tap(self.symbol, student_taps, teacher_taps)
        if min(kl_T, ss_T, tf_T) <= 0 or not (0 <= ss_ratio <= 1 and 0 <= tf_ratio <= 1):
            raise ConfigError(f"loss.sskd needs temperatures > 0 and ratios in [0, 1] (got kl_T={kl_T}, ss_T={ss_T}, "
                              f"tf_T={tf_T}, ss_ratio={ss_ratio}, tf_ratio={tf_ratio})")
        self.settings = {"kl_T": float(kl_T), "ss_T": float(ss_T), "tf_T": float(tf_T), "ss_ratio": float(ss_ratio),
                         "tf_ratio": float(tf_ratio), "kl_weight": float(kl_weight), "ss_weight": float(ss_weight),
                         "tf_weight": float(tf_weight)}
        self.head_epochs = check_epochs("loss.sskd.head_epochs", head_epochs)
        self.teacher_head: nn.Module | None = None

    def describe(self) -> str:
        s = self.settings
        return (f"SSKD({s['kl_weight']:g}*KD(T={s['kl_T']:g}) + {s['ss_weight']:g}*SS(T={s['ss_T']:g}) + "
                f"{s['tf_weight']:g}*TF(T={s['tf_T']:g}); teacher head trained first, {epochs_text(self.head_epochs)})")

    def pooled(self, outputs: StepOutputs, side: str) -> torch.Tensor:
        taps = self.student_taps if side == "student" else self.teacher_taps
        return pooled_vector(getattr(outputs, f"{side}_features")[taps[0]])

    def prestages(self, weight: float) -> list[PreStage]:
        return [stage_of(self, "sskd_teacher_head", self.head_epochs, 1.0, trains_student=False, symbol="SSKD-head",
                         teacher_only=True)]

    def build_teacher_head(self, probe: StepOutputs) -> None:
        if self.teacher_head is None:  # else trained by the stage earlier in this run
            teacher = self.pooled(probe, "teacher")
            self.teacher_head = head(teacher.shape[1]).to(teacher.device)

    def stage_setup(self, stage: str, probe: StepOutputs) -> None:
        self.build_teacher_head(probe)

    def stage_loss(self, stage: str, outputs: StepOutputs) -> torch.Tensor:
        return self_supervision_loss(self.teacher_head(self.pooled(outputs, "teacher").detach()))

    def setup(self, probe: StepOutputs) -> None:
        self.build_teacher_head(probe)
        self.teacher_head.requires_grad_(False)
        student = self.pooled(probe, "student")
        self.student_head = head(student.shape[1]).to(student.device)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        with torch.no_grad():
            teacher_heads = self.teacher_head(self.pooled(outputs, "teacher"))
        student_heads = self.student_head(self.pooled(outputs, "student"))
        labels = outputs.targets()[0::VIEWS]
        return sskd_loss(outputs.student_logits, outputs.teacher_logits, student_heads, teacher_heads, labels, self.settings)
