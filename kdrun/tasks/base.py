"""The task interface: batches, scored outputs and metrics.

A task turns what a loader yields into a :class:`Batch`, runs a model on it, picks the
*scored* positions of the output (every sample of a classifier; the real, predicted tokens
of a language model) as a 2-D ``(items, classes)`` tensor with one label per item, and sums
the statistics its metrics need. Sums are additive over batches and ranks, so evaluation
does one all-reduce; :meth:`Task.finish` turns them into the reported numbers.

Loss terms receive the scored logits, so a response term written for classifiers (KD, DKD,
DIST, ...) is token-level distillation on a language model without a line of change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

# Label of an item that is not scored (a hidden label, a padding or unmasked token).
IGNORE = -100


@dataclass(frozen=True)
class Metric:
    """One reported number: its key (``acc`` -> ``test_acc``, ``best_val_acc``), whether higher
    is better, and how tables show it."""

    name: str
    higher_is_better: bool
    title: str
    fmt: str = "{:.2f}"
    suffix: str = ""

    def show(self, value: float | None) -> str:
        return "-" if value is None else self.fmt.format(value) + self.suffix

    def better(self, value: float, than: float | None) -> bool:
        if than is None or not math.isfinite(than):
            return math.isfinite(value)
        return value > than if self.higher_is_better else value < than


@dataclass
class Batch:
    """One batch on its way through the loop.

    ``inputs`` is what the model takes (a tensor, or a dict of tensors for models that take
    keyword inputs), ``labels`` one per scored item (``IGNORE`` where none), ``index`` each
    sample's position in the training set (for per-sample memories and caches), ``mask`` the
    scored positions of a sequence batch (None: every sample is one item).
    """

    inputs: torch.Tensor | dict[str, torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def head(self, count: int) -> Batch:
        """The first ``count`` samples."""
        def cut(tensor):
            return None if tensor is None else tensor[:count]

        inputs = {k: cut(v) for k, v in self.inputs.items()} if isinstance(self.inputs, dict) else cut(self.inputs)
        return replace(self, inputs=inputs, labels=cut(self.labels), index=cut(self.index), mask=cut(self.mask),
                       extra={k: cut(v) for k, v in self.extra.items()})

    @property
    def size(self) -> int:
        """Samples in the batch."""
        return int(self.labels.shape[0])

    def to(self, device: torch.device, memory_format: torch.memory_format | None = None) -> Batch:
        def move(tensor):
            if tensor is None:
                return None
            tensor = tensor.to(device, non_blocking=True)
            if memory_format is not None and tensor.dim() == 4 and tensor.is_floating_point():
                tensor = tensor.contiguous(memory_format=memory_format)
            return tensor

        inputs = {k: move(v) for k, v in self.inputs.items()} if isinstance(self.inputs, dict) else move(self.inputs)
        return replace(self, inputs=inputs, labels=move(self.labels), index=move(self.index), mask=move(self.mask),
                       extra={k: move(v) for k, v in self.extra.items()})


class Task:
    """What a run learns and how it is measured. Subclasses set ``metrics`` (the first one is
    ``select``, the metric that picks ``best.pt`` and heads every table unless set otherwise)
    and implement the five methods below."""

    name = "task"
    metrics: tuple[Metric, ...] = ()
    select = ""
    # What one scored item is, for throughput figures (samples/s, tokens/s).
    unit = "samples"
    # The training row's throughput key (e.g. ``tokens_per_s``): scored items per second; None: none.
    rate_key: str | None = None
    # Whether a training sample reaches the models as the same input every epoch (masked LM
    # draws new masks): a frozen teacher's outputs may then be cached per sample.
    fixed_inputs = True

    @property
    def selected(self) -> Metric:
        return self.metric(self.select)

    def metric(self, name: str) -> Metric:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise KeyError(f"task {self.name} has no metric {name!r}")

    def brief(self, metrics: dict[str, float], split: str = "test") -> str:
        """``test acc 98.80%``: the selection metric of ``metrics``, for log lines."""
        return f"{split} {self.select} {self.selected.show(metrics.get(self.select))}"

    def prepare(self, data) -> None:
        """Learn what the task needs of the run's data (:class:`kdrun.data.DataBundle`), once, before
        any batch; refuse data it cannot work with (a ConfigError)."""

    def after_run(self, ctx, models: dict[str, nn.Module]) -> dict:
        """Once the run's models are trained (``models``: role -> model, e.g. teacher, student,
        scratch): extra ``summary.json`` sections, and files in ``ctx.run_dir`` (a language
        model's sample generations). Most tasks add nothing."""
        return {}

    def batch(self, loaded) -> Batch:
        """A :class:`Batch` from what the loader yields."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model's raw output on ``batch`` (logits; per position for sequences)."""
        raise NotImplementedError

    def scored(self, output: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The scored items of ``output`` as ``(items, classes)`` logits and their ``(items,)`` labels."""
        raise NotImplementedError

    def sums(self, logits: torch.Tensor, labels: torch.Tensor, train: bool = False) -> dict[str, torch.Tensor]:
        """Additive statistics of scored ``logits`` against ``labels`` (kept on the device); in
        training (``train``) only what the training row reports besides the recipe's loss."""
        raise NotImplementedError

    def finish(self, sums: dict[str, float]) -> dict[str, float]:
        """The metrics from summed statistics."""
        raise NotImplementedError

    def correct_items(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Whether each scored item is right (for a paired test of two models on the same items);
        None for a task whose selection metric is not a count of right items."""
        return None

    def weight(self, labels: torch.Tensor) -> int | torch.Tensor:
        """How much a batch counts in the epoch's mean training loss (samples, or scored tokens)."""
        return labels.numel()

    def describe(self) -> dict:
        """The task as ``summary.json`` records it (reports read the metric directions from it)."""
        return {
            "name": self.name, "select": self.select, "unit": self.unit,
            "metrics": {m.name: {"higher_is_better": m.higher_is_better, "title": m.title} for m in self.metrics},
        }
