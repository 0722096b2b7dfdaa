"""Contrastive representation distillation (Tian, Krishnan, Isola, "Contrastive
Representation Distillation", ICLR 2020).

Student and teacher features are embedded (learned linear heads, L2-normalised) in
one space; each sample's student embedding must pick out the teacher embedding of
the same sample among ``nce_k`` negatives (embeddings of other samples) drawn from a
memory, and the other way round. The loss is the paper's NCE (as RepDistiller's
``ContrastLoss``, which cites the paper's Eq. 18) or, optionally, InfoNCE (softmax
cross-entropy); the default is NCE since its Z estimate is reproduced exactly.

Memories (buffers, so they are checkpointed and resumed):

- ``bank``: the paper's one row per training sample and side, updated with momentum.
  The number of samples N is not known when the term is built, so the bank starts
  empty and grows (``torch.cat`` of new random rows) to ``max(index) + 1`` as indices
  arrive; with a shuffled loader that happens a handful of times in the first epoch.
- ``queue``: a fixed FIFO of the last ``queue_size`` embeddings (MoCo style), so memory
  does not grow with the dataset. The positive is then the current batch's embedding;
  it and the queue's entries come from EMA copies of the heads (``key_momentum``, like
  MoCo's keys), so the positive is no fresher than the negatives.

Both start with rows drawn uniformly from ``[-sqrt(3/d), sqrt(3/d)]`` (unit norm on average), as
RepDistiller's ``ContrastMemory`` starts its bank, so the first batches' scores and Z match it.
Negatives are drawn uniformly with replacement (as RepDistiller's ``AliasMethod``
draws), so ``nce_k`` may exceed the memory's size, and never from the anchor's own
sample; with ``negatives: other_class`` (default) not from its class either, as
RepDistiller's ``CIFAR100InstanceSample`` draws them.

Under DDP every rank writes every rank's batch into its memory (an ``all_gather`` of
indices, labels and embeddings before the update) and the bank's new random rows come
from rank 0, so all ranks hold the same memory, as one process with the global batch would.
"""

from __future__ import annotations

from collections.abc import Sequence

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.engine import distributed
from kdrun.errors import ConfigError
from kdrun.losses.adapters import projection
from kdrun.losses.base import StepOutputs, Term, one_tap

# Rounds of redrawing negatives that clash with the anchor (same sample, or same class).
# With c balanced classes a class clash survives them with probability (1/c)^5.
REDRAW_ROUNDS = 4


def nce_loss(scores: torch.Tensor, log_mean_exp: torch.Tensor | float, T: float) -> torch.Tensor:
    """The CRD NCE loss; ``scores`` are ``(B, 1 + K)`` cosine similarities, column 0 the positive.

    RepDistiller's ``ContrastLoss``: ``P = exp(s/T) / Z`` with ``Z = N * mean(exp(s/T))``
    estimated once, noise ``Pn = 1/N``, ``D = P / (P + K*Pn)``, and
    ``L = -[sum log D(pos) + sum log(1 - D(neg))] / B``. N cancels in ``D``:
    ``D = e / (e + K * mean_exp)``, so the loss needs only ``log(mean_exp)``, and it is
    computed in log space (``e`` reaches ``exp(1/0.07) ~ 1.6e6``).
    """
    logits = scores / T
    num_negatives = scores.shape[1] - 1
    log_noise = math.log(num_negatives) + torch.as_tensor(log_mean_exp, dtype=logits.dtype, device=logits.device)
    log_denominator = torch.logaddexp(logits, log_noise)
    log_d_positive = logits[:, 0] - log_denominator[:, 0]
    log_d_negative = log_noise - log_denominator[:, 1:]
    return -(log_d_positive.sum() + log_d_negative.sum()) / scores.shape[0]


def info_nce_loss(scores: torch.Tensor, T: float) -> torch.Tensor:
    """Softmax cross-entropy of the positive (column 0) against the negatives."""
    return F.cross_entropy(scores / T, torch.zeros(len(scores), dtype=torch.long, device=scores.device))


def similarities(anchor: torch.Tensor, positive: torch.Tensor, memory: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """``(B, 1 + K)``: each anchor's dot product with its positive, then with its ``K`` negative rows of ``memory``.

    RepDistiller gathers the ``B x K`` rows (``B*K*D`` floats: 0.5 GB at B=64, K=16384).
    When the memory has no more rows than ``K`` it is cheaper, in time and memory, to
    score every row once (``B x N``) and pick the drawn ones; the values are the same.
    """
    positive_score = (anchor * positive).sum(dim=1, keepdim=True)
    if len(memory) <= negatives.shape[1]:
        # a copy: the matmul keeps it for backward, and the memory is updated in place after
        negative_scores = (anchor @ memory.t().clone()).gather(1, negatives)
    else:
        negative_scores = torch.bmm(memory[negatives], anchor[:, :, None]).squeeze(2)
    return torch.cat([positive_score, negative_scores], dim=1)


def random_rows(rows: int, dim: int, device=None) -> torch.Tensor:
    """Rows uniform in ``[-sqrt(3/dim), sqrt(3/dim)]``: unit norm on average (RepDistiller's memory init)."""
    bound = math.sqrt(3 / dim)
    return (torch.rand(rows, dim, device=device) * 2 - 1) * bound


class _Memory(nn.Module):
    """Student and teacher embeddings of past samples, with their labels (-1: none yet)."""

    # Updated alike on every rank (see the module docstring), so DDP need not broadcast it.
    syncs_across_ranks = True

    def __init__(self, rows: int, feat_dim: int, exclude_class: bool):
        super().__init__()
        self.exclude_class = exclude_class
        self.register_buffer("student", random_rows(rows, feat_dim))
        self.register_buffer("teacher", random_rows(rows, feat_dim))
        self.register_buffer("labels", torch.full((rows,), -1, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.labels)

    def sample_index(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reserve(self, index: torch.Tensor) -> None:
        """Make room for the samples ``index`` (all ranks' batch) before they are read or pushed."""

    def clashes(self, rows: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        clash = self.sample_index(rows) == index[:, None]
        return clash | (self.labels[rows] == labels[:, None]) if self.exclude_class else clash

    def negatives(self, index: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
        """``(B, k)`` memory rows drawn uniformly; clashes are redrawn a few times
        (a fixed number of rounds, so no device sync; the rare survivor stays)."""
        rows = torch.randint(len(self), (len(index), k), device=index.device)
        for _ in range(REDRAW_ROUNDS):
            rows = torch.where(self.clashes(rows, index, labels), torch.randint_like(rows, len(self)), rows)
        return rows

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A fresh bank is empty (it grows with the indices seen): take the saved sizes first.
        for name, buffer in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != buffer.shape:
                self._buffers[name] = buffer.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SampleBank(_Memory):
    """The paper's memory: row ``i`` holds the running embeddings of training sample ``i``."""

    def __init__(self, feat_dim: int, momentum: float, exclude_class: bool):
        super().__init__(0, feat_dim, exclude_class)
        self.momentum = momentum
        self.capacity: int | None = None  # the number of training samples, once known

    def sample_index(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def grow(self, size: int) -> None:
        extra = size - len(self)
        if extra <= 0:
            return
        dim, device = self.student.shape[1], self.student.device
        # Ranks draw different rows: rank 0's go into every rank's bank (all grow at the same step).
        new_student = distributed.broadcast_(random_rows(extra, dim, device))
        new_teacher = distributed.broadcast_(random_rows(extra, dim, device))
        self.student = torch.cat([self.student, new_student])
        self.teacher = torch.cat([self.teacher, new_teacher])
        self.labels = torch.cat([self.labels, self.labels.new_full((extra,), -1)])

    def reserve(self, index: torch.Tensor) -> None:
        # Reading the largest index syncs the device: done only until the bank holds every training
        # sample (the size comes with bind_data), i.e. in the first epoch.
        if self.capacity is None or len(self) < self.capacity:
            self.grow(int(index.max()) + 1)

    def positives(self, index, student, teacher) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student[index], self.teacher[index]

    @torch.no_grad()
    def push(self, index, labels, student, teacher) -> None:
        """``row <- normalise(momentum * row + (1 - momentum) * embedding)`` (RepDistiller ``ContrastMemory``)."""
        for memory, embedding in ((self.student, student), (self.teacher, teacher)):
            memory[index] = F.normalize(self.momentum * memory[index] + (1 - self.momentum) * embedding, dim=1)
        self.labels[index] = labels


class FeatureQueue(_Memory):
    """A FIFO of the last ``size`` embeddings; its bytes do not depend on the dataset's size."""

    def __init__(self, size: int, feat_dim: int, exclude_class: bool):
        super().__init__(size, feat_dim, exclude_class)
        self.register_buffer("index", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("head", torch.zeros((), dtype=torch.long))

    def sample_index(self, rows: torch.Tensor) -> torch.Tensor:
        return self.index[rows]

    def positives(self, index, student, teacher) -> tuple[torch.Tensor, torch.Tensor]:
        return student, teacher

    @torch.no_grad()
    def push(self, index, labels, student, teacher) -> None:
        """Overwrite the oldest entries; of a batch longer than the queue only its tail stays."""
        slots = (self.head + torch.arange(len(index), device=index.device)) % len(self)
        keep = slice(max(len(index) - len(self), 0), None)
        for memory, values in ((self.student, student), (self.teacher, teacher), (self.labels, labels), (self.index, index)):
            memory[slots[keep]] = values[keep]
        self.head.add_(len(index)).remainder_(len(self))


class CRD(Term):
    symbol = "CRD"
    needs_index = True
    needs_setup = True

    def __init__(
        self,
        student_taps: str | Sequence[str] = "embedding",
        teacher_taps: str | Sequence[str] = "embedding",
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        memory: str = "bank",
        queue_size: int = 16384,
        objective: str = "nce",
        negatives: str = "other_class",
        key_momentum: float = 0.99,
    ):
        super().__init__()
        choices = {"memory": ("bank", "queue"), "objective": ("nce", "infonce"), "negatives": ("other_class", "other_sample")}
        for name, value in (("memory", memory), ("objective", objective), ("negatives", negatives)):
            if value not in choices[name]:
                raise ConfigError(f"loss.crd.{name}={value!r} is not one of {', '.join(choices[name])}")
        for name, value in (("feat_dim", feat_dim), ("nce_k", nce_k), ("queue_size", queue_size)):
            if value < 1:
                raise ConfigError(f"loss.crd.{name}={value} must be >= 1")
        if nce_t <= 0 or not 0 <= momentum < 1 or not 0 <= key_momentum < 1:
            raise ConfigError(
                f"loss.crd needs nce_t > 0 and momentum, key_momentum in [0, 1) "
                f"(got nce_t={nce_t}, momentum={momentum}, key_momentum={key_momentum})"
            )
        self.student_taps, self.teacher_taps = one_tap(self.symbol, student_taps, teacher_taps)
        self.feat_dim, self.nce_k, self.nce_t, self.objective = feat_dim, nce_k, nce_t, objective
        self.key_momentum = key_momentum
        exclude_class = negatives == "other_class"
        self.memory = (
            SampleBank(feat_dim, momentum, exclude_class) if memory == "bank" else FeatureQueue(queue_size, feat_dim, exclude_class)
        )
        # log(mean exp(s/T)) of the first batch, per direction (student anchor, teacher
        # anchor): the paper's Z / N, estimated once and kept fixed. NaN = not yet set.
        self.register_buffer("log_mean_exp", torch.full((2,), float("nan")))
        self.estimated: list[bool] | None = None

    def describe(self) -> str:
        kind = "bank" if isinstance(self.memory, SampleBank) else f"queue={len(self.memory)}"
        loss = ",infonce" if self.objective == "infonce" else ""
        return f"CRD({kind},k={self.nce_k},T={self.nce_t:g}{loss})"

    def bind_data(self, train_samples: int) -> None:
        if isinstance(self.memory, SampleBank):
            self.memory.capacity = train_samples

    def data_warning(self, name: str, train_samples: int) -> str | None:
        rows = train_samples if isinstance(self.memory, SampleBank) else min(train_samples, len(self.memory))
        if self.nce_k < rows:
            return None
        return (f"loss.{name}.nce_k={self.nce_k} is not below the {rows} samples the memory holds, so each anchor's "
                f"negatives repeat samples (drawn with replacement); a smaller nce_k (e.g. {max(1, rows // 4)}) "
                "contrasts as many distinct samples for less time")

    def setup(self, probe: StepOutputs) -> None:
        # Linear heads to feat_dim (RepDistiller's ``Embed``); maps are flattened first.
        student = probe.student_features[self.student_taps[0]]
        teacher = probe.teacher_features[self.teacher_taps[0]]
        out_shape = (len(student), self.feat_dim)
        self.embed_student = projection(student.shape, out_shape, norm=False).to(student.device)
        self.embed_teacher = projection(teacher.shape, out_shape, norm=False).to(teacher.device)
        if isinstance(self.memory, FeatureQueue):
            # With live heads the positive would be fresher than every queued negative, and
            # the student learns that shortcut (MNIST-1D, 20 epochs: 47.7% test vs 58.9%
            # with EMA heads, 57.7% with the bank, 58.8% with CE alone).
            self.key_heads = nn.ModuleList([copy.deepcopy(self.embed_student), copy.deepcopy(self.embed_teacher)]).requires_grad_(False)

    @torch.no_grad()
    def _keys(self, student_features, teacher_features, student, teacher):
        """What is written to memory: the live embeddings (bank), or the EMA heads' (queue)."""
        if not isinstance(self.memory, FeatureQueue):
            return student.detach(), teacher.detach()
        for key, live in zip(self.key_heads, (self.embed_student, self.embed_teacher)):
            for key_param, live_param in zip(key.parameters(), live.parameters()):
                key_param.lerp_(live_param, 1 - self.key_momentum)
        return F.normalize(self.key_heads[0](student_features), dim=1), F.normalize(self.key_heads[1](teacher_features), dim=1)

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        if outputs.index is None:
            raise ValueError("CRD needs each sample's index (outputs.index); the data pipeline adds it when needs_index")
        index, labels = outputs.index, outputs.targets()
        # Similarities at T=0.07 need full precision: keep the term out of autocast.
        with torch.autocast(index.device.type, enabled=False):
            student_features = outputs.student_features[self.student_taps[0]].float()
            teacher_features = outputs.teacher_features[self.teacher_taps[0]].float()
            student = F.normalize(self.embed_student(student_features), dim=1)
            teacher = F.normalize(self.embed_teacher(teacher_features), dim=1)
            student_key, teacher_key = self._keys(student_features, teacher_features, student, teacher)
            # All ranks' samples go into the memory (one process: just this batch).
            index_labels = distributed.all_gather(torch.stack([index, labels], dim=1))
            keys = distributed.all_gather(torch.cat([student_key, teacher_key], dim=1))
            self.memory.reserve(index_labels[:, 0])
            student_positive, teacher_positive = self.memory.positives(index, student_key, teacher_key)
            negatives = self.memory.negatives(index, labels, self.nce_k)
            scores = (
                similarities(student, teacher_positive, self.memory.teacher, negatives),  # student anchor
                similarities(teacher, student_positive, self.memory.student, negatives),  # teacher anchor
            )
            loss = sum(self._loss(direction, s) for direction, s in enumerate(scores))
            self.memory.push(index_labels[:, 0], index_labels[:, 1], *keys.split(student_key.shape[1], dim=1))
        return loss

    def _loss(self, direction: int, scores: torch.Tensor) -> torch.Tensor:
        if self.objective == "infonce":
            return info_nce_loss(scores, self.nce_t)
        if not self._estimated()[direction]:
            logits = scores.detach() / self.nce_t
            # Over all ranks' scores, so Z is the same on every rank (ranks' batches are equal in size).
            per_rank = distributed.all_gather(torch.logsumexp(logits.flatten(), 0).reshape(1))
            self.log_mean_exp[direction] = torch.logsumexp(per_rank, 0) - math.log(logits.numel() * len(per_rank))
            self.estimated[direction] = True
        return nce_loss(scores, self.log_mean_exp[direction], self.nce_t)

    def _estimated(self) -> list[bool]:
        """Which of the two Z estimates are set, kept on the host (a check of the buffer would sync the
        device every step): read from the buffer once, after construction or a checkpoint load."""
        if self.estimated is None:
            self.estimated = [not math.isnan(value) for value in self.log_mean_exp.tolist()]
        return self.estimated

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.estimated = None
