"""What the loop keeps per epoch: summed statistics (on the device, one all-reduce per epoch)
and the stop / non-finite check."""

from __future__ import annotations

import threading
import time

import torch

from kdrun.engine import distributed
from kdrun.errors import Interrupted, TrainingError
from kdrun.tasks import Task

# Set by the SIGINT/SIGTERM handlers (see kdrun.run); the loop stops at the next step
# boundary, so a signal never lands inside a checkpoint write or a log call.
STOP = threading.Event()
NONFINITE_CHECK_EVERY = 25


class EpochStats:
    """Sums of one epoch's training: the recipe's total and parts (weighted by what a batch
    counts for, see :meth:`Task.weight`) and the task's statistics of the student's outputs."""

    def __init__(self, task: Task, device: torch.device):
        self.task, self.device = task, device
        self.started = time.perf_counter()
        self.loss = torch.zeros((), device=device)
        self.parts: dict[str, torch.Tensor] = {}
        self.task_sums: dict[str, torch.Tensor] = {}
        self.seen = 0

    def add(self, total: torch.Tensor, parts: dict[str, torch.Tensor], logits: torch.Tensor, labels: torch.Tensor) -> None:
        weight = self.task.weight(labels)
        self.seen = self.seen + weight
        self.loss += total.detach().float() * weight
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + value.detach().float() * weight
        for name, value in self.task.sums(logits, labels, train=True).items():
            self.task_sums[name] = self.task_sums.get(name, 0) + value

    def finish(self) -> dict[str, float]:
        """The epoch's means over every rank (one all-reduce): the task's metrics, ``loss`` (the
        recipe's total) and each ``loss/<part>``."""
        names = list(self.task_sums)
        sums = distributed.sum_over_ranks(
            {"loss": self.loss, "seen": self.seen, **self.parts, **{f"task/{name}": self.task_sums[name] for name in names}},
            self.device,
        )
        row = self.task.finish({name: sums[f"task/{name}"] for name in names})
        seen = max(sums["seen"], 1)
        row["loss"] = sums["loss"] / seen
        if self.task.rate_key:
            row[self.task.rate_key] = sums["seen"] / (time.perf_counter() - self.started)
        row.update({name: sums[name] / seen for name in self.parts})
        return row


class StopCheck:
    """A stop request (Ctrl-C, SIGTERM) and a non-finite loss, checked every few steps and at the
    epoch's last (checking finiteness syncs the GPU). Under DDP ranks vote, so they stop together
    rather than one raising alone while the others wait in the next all-reduce."""

    def __init__(self, steps: int, device: torch.device, title: str, name: str, last_path):
        self.steps, self.device, self.title, self.name, self.last_path = steps, device, title, name, last_path

    def due(self, step: int) -> bool:
        return step % NONFINITE_CHECK_EVERY == 0 or step == self.steps

    def after_step(self, step: int, epoch: int, loss_sum: torch.Tensor) -> None:
        due = self.due(step)
        stop, nonfinite = STOP.is_set(), due and not bool(torch.isfinite(loss_sum))
        if distributed.active():
            stop, nonfinite = distributed.any_rank(stop, nonfinite, device=self.device) if due else (False, False)
        if stop:
            raise Interrupted(f"{self.title} stopped in epoch {epoch}; {self.last_path} holds epoch {epoch - 1}")
        if nonfinite:
            raise TrainingError(
                f"{self.name}: loss became non-finite in epoch {epoch} (by step {step}); lower the learning rate "
                f"or set grad_clip; last good checkpoint: {self.last_path} (epoch {epoch - 1})"
            )
