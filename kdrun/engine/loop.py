"""The one training loop, and evaluation. ``fit`` reads top to bottom; its collaborators
are named pieces: the checkpointer (:mod:`kdrun.engine.checkpoint`), the epoch statistics and
the stop check (:mod:`kdrun.engine.stats`), batch placement (:class:`Placement`)."""

from __future__ import annotations

import logging
import sys
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from kdrun.engine import distributed
from kdrun.engine.checkpoint import Checkpointer
from kdrun.engine.perf import Perf
from kdrun.engine.stats import EpochStats, StopCheck
from kdrun.reporting.metrics import MetricsLog
from kdrun.tasks import Batch, Task

log = logging.getLogger(__name__)
# Per-epoch lines go to their own logger: in a terminal they stay in kdrun.log (see kdrun.cli).
epoch_log = logging.getLogger("kdrun.epochs")


@dataclass
class FitSpec:
    """How one model is trained: epochs, optimizer and scheduler factories, clipping."""

    epochs: int
    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[..., Any]
    grad_clip: float | None = None

    @classmethod
    def from_config(cls, training: DictConfig) -> FitSpec:
        """From ``{epochs, optim, sched, grad_clip}`` (``teacher_training``, or the student's)."""
        return cls(int(training.epochs), instantiate(training.optim), instantiate(training.sched), training.get("grad_clip"))


@dataclass
class FitResult:
    epochs: int
    best_val: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class FitRun:
    """Who is trained and where its records go: ``name`` labels its metrics rows, ``stream`` its
    random numbers (a scratch baseline shares the student's, so the two see the same data
    order and augmentation), ``title`` what the progress bar and log call it."""

    name: str
    ckpt_dir: Path
    metrics: MetricsLog
    device: torch.device
    seed: int
    amp: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    stream: str | None = None
    perf: Perf = field(default_factory=Perf)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it, fp16 (with a grad scaler) otherwise; none on CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def epoch_seed(seed: int, stream: str, epoch: int) -> int:
    """Randomness of an epoch depends only on (seed, stream, epoch), so resume is exact."""
    return (seed * 1_000_003 + zlib.crc32(stream.encode()) + epoch * 7919) % (2**63)


def seed_epoch(seed: int, stream: str, epoch: int, loader) -> None:
    # Per rank (dropout, in-process augmentation differ between ranks); the data order comes
    # from the loader's generator, the same on every rank.
    torch.manual_seed(epoch_seed(seed, stream, epoch) + distributed.rank())
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(epoch_seed(seed, stream, epoch))


class Placement:
    """Loader output -> :class:`Batch` on the device, in the models' memory format."""

    def __init__(self, task: Task, device: torch.device, memory_format: torch.memory_format | None = None):
        self.task, self.device, self.memory_format = task, device, memory_format

    def __call__(self, loaded) -> Batch:
        return self.task.batch(loaded).to(self.device, self.memory_format)


@torch.no_grad()
def evaluate(model: nn.Module, loader, task: Task, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, float]:
    """The task's metrics of ``model`` on ``loader``.

    Under DDP each rank evaluates its shard of the loader and the sums are added over ranks
    (one all-reduce), so every rank returns the global figures."""
    was_training = model.training
    model.eval()
    sums: dict[str, Any] = {}
    for loaded in loader:
        batch = Placement(task, device)(loaded)
        with autocast(device, dtype):
            output = task.forward(model, batch)
        for name, value in task.sums(*task.scored(output, batch)).items():
            sums[name] = sums.get(name, 0) + value
    model.train(was_training)
    return task.finish(distributed.sum_over_ranks(sums, device))


def show_progress() -> bool:
    return sys.stderr.isatty() and distributed.is_main()


def fit(distiller, data, spec: FitSpec, run: FitRun) -> FitResult:
    """Train ``distiller`` (a :class:`kdrun.distiller.Distiller`) for ``spec.epochs`` epochs.

    ``last.pt`` in ``run.ckpt_dir`` is written at every epoch end and, when present at the
    start, training carries on from it; ``best.pt`` holds the student with the best value of
    the task's selection metric on the validation split. Per epoch the distiller's
    ``before_epoch`` sets scheduled knobs, and its ``evaluated()`` models (peers, heads) are
    validated beside the student.
    """
    task, device, title = distiller.task, run.device, run.title or run.name
    dtype = amp_dtype(device, run.amp)
    distiller.to(device)
    place = Placement(task, device, run.perf.prepare_models([distiller.student, distiller.teacher], data.input_shape))
    optimizer = spec.optimizer(params=[p for p in distiller.parameters() if p.requires_grad],
                               **run.perf.optimizer_kwargs(spec.optimizer))
    scheduler = spec.scheduler(optimizer, epochs=spec.epochs, steps_per_epoch=len(data.train))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ckpt = Checkpointer(run.ckpt_dir, run.meta, task.selected, distiller, optimizer, scheduler, scaler)
    if ckpt.resume(run.name):
        for name in (run.name, *distiller.evaluated()):
            run.metrics.drop_after(name, ckpt.epoch)
        if ckpt.epoch < spec.epochs:
            log.info("Resuming %s from %s (epoch %d of %d)", title, ckpt.last_path, ckpt.epoch, spec.epochs)
    step = distributed.data_parallel(distiller, device)
    with distiller:
        for epoch in range(ckpt.epoch + 1, spec.epochs + 1):
            started = time.perf_counter()
            seed_epoch(run.seed, run.stream or run.name, epoch, data.train)
            knobs = distiller.before_epoch(epoch, spec.epochs)
            distiller.train()
            stats, check = EpochStats(task, device), StopCheck(len(data.train), device, title, run.name, ckpt.last_path)
            bar = tqdm(data.train, desc=f"{title} epoch {epoch}/{spec.epochs}", unit="batch", leave=False,
                       disable=not show_progress(), dynamic_ncols=True)
            for i, loaded in enumerate(bar, start=1):
                batch = place(loaded)
                with autocast(device, dtype):
                    total, parts, logits, labels = step(batch, epoch - 1 + (i - 1) / len(data.train))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                if spec.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], spec.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                stats.add(total, parts, logits, labels)
                check.after_step(i, epoch, stats.loss)
            train = {**stats.finish(), "lr": optimizer.param_groups[0]["lr"], **knobs, "time_s": time.perf_counter() - started}
            val = {name: evaluate(model, data.val, task, device, dtype)
                   for name, model in {run.name: distiller.student, **distiller.evaluated()}.items()}
            ckpt.end_epoch(epoch, distiller.student, val[run.name], train)
            record_epoch(run, title, epoch, spec.epochs, train, val, knobs)
    return FitResult(epochs=spec.epochs, best_val=ckpt.best, history=ckpt.history)


def record_epoch(run: FitRun, title: str, epoch: int, epochs: int, train: dict, val: dict[str, dict], knobs: dict) -> None:
    """The epoch's rows in ``metrics.jsonl`` and its line in the log."""
    run.metrics.write(epoch=epoch, model=run.name, split="train", **train)
    for name, metrics in val.items():
        run.metrics.write(epoch=epoch, model=name, split="val", **metrics)
    measured = [key for key in train if key not in ("loss", "lr", "time_s", *knobs) and not key.startswith("loss/")]
    fields = [f"loss {train['loss']:.4f}", *(f"train_{key} {train[key]:.2f}" for key in measured)]
    fields += [f"val_{key} {value:.2f}" for key, value in val[run.name].items() if key != "loss"]
    fields += [f"{name} {next(iter(metrics.values())):.2f}" for name, metrics in list(val.items())[1:]]
    fields += [f"lr {train['lr']:.3g}", *(f"{knob} {value:.3g}" for knob, value in knobs.items()), f"{train['time_s']:.1f}s"]
    epoch_log.info("%s epoch %d/%d  %s", title, epoch, epochs, "  ".join(fields))
