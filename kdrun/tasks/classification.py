"""Single-label classification: top-1 accuracy (percent) and mean cross-entropy."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdrun.tasks.base import IGNORE, Batch, Metric, Task


class Classification(Task):
    """A batch is ``(inputs, labels[, index])``; every sample is one scored item. A label below 0
    marks a sample without one (a hidden label): it is not scored, and loss terms read it as
    ``IGNORE``."""

    name = "classification"
    metrics = (
        Metric("acc", higher_is_better=True, title="acc %", suffix="%"),
        Metric("loss", higher_is_better=False, title="loss", fmt="{:.4f}"),
    )
    select = "acc"

    def batch(self, loaded) -> Batch:
        inputs, labels = loaded[0], loaded[1]
        return Batch(inputs, labels, index=loaded[2] if len(loaded) > 2 else None)

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch.inputs)

    def scored(self, output: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return output, batch.labels.masked_fill(batch.labels < 0, IGNORE)

    def sums(self, logits: torch.Tensor, labels: torch.Tensor, train: bool = False) -> dict[str, torch.Tensor]:
        labelled = labels >= 0
        sums = {"correct": ((logits.detach().argmax(1) == labels) & labelled).sum(), "count": labelled.sum()}
        if not train:  # in training the recipe's total is the loss
            sums["nll"] = F.cross_entropy(logits.detach().float(), labels, ignore_index=IGNORE, reduction="sum").double()
        return sums

    def correct_items(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1) == labels

    def finish(self, sums: dict[str, float]) -> dict[str, float]:
        count = max(sums["count"], 1)
        metrics = {"acc": 100.0 * sums["correct"] / count}
        if "nll" in sums:
            metrics["loss"] = sums["nll"] / count
        return metrics
