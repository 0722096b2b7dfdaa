"""The one training loop: step, backward, optimizer, evaluation, checkpoints, resume."""

from __future__ import annotations

import logging
import sys
import threading
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from kdrun.data import DataBundle
from kdrun.engine import checkpoint, distributed
from kdrun.engine.perf import CACHE_MEMORY_SHARE, Perf, free_bytes
from kdrun.errors import Interrupted, TrainingError
from kdrun.reporting.metrics import MetricsLog

log = logging.getLogger(__name__)

NONFINITE_CHECK_EVERY = 25
# Set by the SIGINT/SIGTERM handlers (see kdrun.run); the loop stops at the next step
# boundary, so a signal never lands inside a checkpoint write or a log call.
STOP = threading.Event()


@dataclass
class FitSpec:
    """How one model is trained: epochs, optimizer and scheduler factories, clipping."""

    epochs: int
    optimizer: Callable[..., torch.optim.Optimizer]
    scheduler: Callable[..., Any]
    grad_clip: float | None = None


@dataclass
class FitResult:
    epochs: int
    best_val_acc: float
    final_val_acc: float
    history: list[dict[str, Any]] = field(default_factory=list)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it, fp16 (with a grad scaler) otherwise; none on CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def epoch_seed(seed: int, label: str, epoch: int) -> int:
    """Randomness of an epoch depends only on (seed, who trains, epoch), so resume is exact."""
    return (seed * 1_000_003 + zlib.crc32(label.encode()) + epoch * 7919) % (2**63)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None = None) -> tuple[float, float]:
    """Top-1 accuracy in percent and mean cross-entropy of ``model`` on ``loader``.

    Under DDP each rank evaluates its shard of the loader and the sums are added over
    ranks, so every rank returns the global figures (an unsharded loader gives the same
    ratios: numerator and denominator are both counted once per rank)."""
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    for batch in loader:
        inputs, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast(device, dtype):
            logits = model(inputs)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += labels.numel()
    model.train(was_training)
    totals = distributed.sum_over_ranks({"correct": correct, "loss_sum": loss_sum, "count": count}, device)
    correct, loss_sum, count = totals["correct"], totals["loss_sum"], totals["count"]
    return 100.0 * correct / max(count, 1), loss_sum / max(count, 1)


def fit(
    task,
    data: DataBundle,
    spec: FitSpec,
    *,
    label: str,
    ckpt_dir: Path,
    metrics: MetricsLog,
    device: torch.device,
    seed: int,
    amp: bool = True,
    meta: dict[str, Any] | None = None,
    title: str | None = None,
    perf: Perf | None = None,
) -> FitResult:
    """Train ``task`` (see :class:`kdrun.distill.DistillTask`) for ``spec.epochs`` epochs.

    ``ckpt_dir/last.pt`` is written at every epoch end and, when present at the
    start, training carries on from it. ``best.pt`` holds the student with the
    best validation accuracy; ``meta`` (arch, config, ...) goes into both.
    ``label`` names the model in metrics and seeds; ``title`` (default: the
    label) is what the progress bar and the log call it, e.g. "generation 2/3".

    Per epoch the task's ``before_epoch(epoch, epochs)`` sets scheduled knobs and
    returns them for the log, and ``extra_evaluations()`` names further models
    (peers, auxiliary heads, ensembles) whose validation accuracy is logged too.
    Samples labelled ``< 0`` (hidden labels) do not count in training accuracy.
    ``perf`` (see :mod:`kdrun.engine.perf`) picks the fast paths: fused/foreach
    optimizer, channels_last, torch.compile, the teacher-output cache.
    """
    title = title or label
    perf = perf or Perf(device=device)
    dtype = amp_dtype(device, amp)
    task.to(device)
    memory_format = perf.prepare_models([task.student, getattr(task, "teacher", None)], data.input_shape)
    use_cache, cache_note = perf.teacher_cache(task, data)
    if use_cache:
        from kdrun.distill import TeacherCache

        data = data.indexed()
        task.teacher_cache = TeacherCache(
            len(data.train_set), int(CACHE_MEMORY_SHARE * free_bytes(device)), strict=perf.teacher_cache_setting is True
        )
    if cache_note and perf.teacher_cache_setting is not False:
        log.info("%s: teacher_cache %s", title, cache_note)
    steps_per_epoch = len(data.train)
    optimizer = spec.optimizer(params=task.parameters(), **perf.optimizer_kwargs(spec.optimizer))
    scheduler = spec.scheduler(optimizer, epochs=spec.epochs, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    meta = dict(meta or {})
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"

    start_epoch, best_val, history = 0, -1.0, []
    # Rank 0 decides: it may already have written last.pt when another rank looks.
    resuming = distributed.broadcast_object(last_path.exists())
    if resuming:
        state = checkpoint.load(last_path, f"{label} checkpoint")
        task.load_state_dict(state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_val, history = state["epoch"], state["best_val_acc"], state["history"]
        for name in (label, *task.extra_evaluations()):
            metrics.drop_after(name, start_epoch)
        if start_epoch < spec.epochs:
            log.info("Resuming %s from %s (epoch %d of %d)", title, last_path, start_epoch, spec.epochs)

    def save_last(epoch: int) -> None:
        if not distributed.is_main():
            return
        checkpoint.save_atomic(
            {
                **task.state_dict(),
                **meta,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "best_val_acc": best_val,
                "history": history,
                "rng": {"torch": torch.get_rng_state()},
            },
            last_path,
        )

    if not resuming:
        save_last(0)  # so an interrupt during the first epoch still leaves a resumable state

    show_bar = sys.stderr.isatty() and distributed.is_main()
    train_step = distributed.data_parallel(task, device)
    with task:
        for epoch in range(start_epoch + 1, spec.epochs + 1):
            epoch_start = time.perf_counter()
            # Per rank (dropout, in-process augmentation differ between ranks); the data order
            # comes from the loader's generator, the same on every rank.
            torch.manual_seed(epoch_seed(seed, label, epoch) + distributed.rank())
            if data.train.generator is not None:
                data.train.generator.manual_seed(epoch_seed(seed, label, epoch))
            knobs = task.before_epoch(epoch, spec.epochs)
            task.train()
            loss_sum = torch.zeros((), device=device)
            part_sums: dict[str, torch.Tensor] = {}
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen, labeled_seen = 0, torch.zeros((), device=device, dtype=torch.long)
            bar = tqdm(data.train, desc=f"{title} epoch {epoch}/{spec.epochs}", unit="batch", leave=False, disable=not show_bar, dynamic_ncols=True)
            for step, batch in enumerate(bar, start=1):
                inputs = batch[0].to(device, non_blocking=True)
                if memory_format is not None and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=memory_format)
                labels = batch[1].to(device, non_blocking=True)
                index = batch[2].to(device, non_blocking=True) if len(batch) > 2 else None
                with autocast(device, dtype):
                    total, parts, logits = train_step(inputs, labels, index, epoch - 1 + (step - 1) / steps_per_epoch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                if spec.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(task.parameters(), spec.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()

                batch_size = labels.numel()
                seen += batch_size
                loss_sum += total.detach().float() * batch_size
                for name, value in parts.items():
                    part_sums[name] = part_sums.get(name, 0.0) + value.detach().float() * batch_size
                has_label = labels >= 0
                correct += ((logits.detach().argmax(1) == labels) & has_label).sum()
                labeled_seen += has_label.sum()
                # Checking finiteness syncs the GPU, so do it every few steps, not every step.
                at_check = step % NONFINITE_CHECK_EVERY == 0 or step == steps_per_epoch
                stop, nonfinite = STOP.is_set(), at_check and not torch.isfinite(loss_sum)
                if distributed.active():
                    # Ranks stop together, at check steps: one that raised alone would leave the
                    # others waiting in the next all-reduce.
                    stop, nonfinite = distributed.any_rank(stop, nonfinite, device=device) if at_check else (False, False)
                if stop:
                    raise Interrupted(f"{title} stopped in epoch {epoch}; last.pt holds epoch {epoch - 1}")
                if at_check:
                    if nonfinite:
                        raise TrainingError(
                            f"{label}: loss became non-finite in epoch {epoch} (by step {step}); "
                            f"lower the learning rate or set grad_clip; last good checkpoint: {last_path} "
                            f"(epoch {epoch - 1})"
                        )
                    if show_bar:
                        bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}")

            val_acc, val_loss = evaluate(task.student, data.val, device, dtype)
            extra_val = {name: evaluate(model, data.val, device, dtype) for name, model in task.extra_evaluations().items()}
            # What is logged is global: the sums of all ranks (one all-reduce per epoch).
            sums = distributed.sum_over_ranks(
                {"loss": loss_sum, "correct": correct, "labeled": labeled_seen, "seen": seen, **part_sums}, device
            )
            train_row = {
                "epoch": epoch,
                "model": label,
                "split": "train",
                "acc": 100.0 * sums["correct"] / max(sums["labeled"], 1),
                "loss": sums["loss"] / sums["seen"],
                **{name: sums[name] / sums["seen"] for name in part_sums},
                "lr": optimizer.param_groups[0]["lr"],
                **knobs,
                "time_s": time.perf_counter() - epoch_start,
            }
            val_row = {"epoch": epoch, "model": label, "split": "val", "acc": val_acc, "loss": val_loss}
            history.append({"epoch": epoch, "train_acc": train_row["acc"], "train_loss": train_row["loss"], "val_acc": val_acc})
            if val_acc > best_val:
                best_val = val_acc
                if distributed.is_main():
                    best = {"model": task.student.state_dict(), **meta, "epoch": epoch, "val_acc": val_acc}
                    checkpoint.save_atomic(best, best_path)
            save_last(epoch)
            metrics.write(**train_row)
            metrics.write(**val_row)
            for name, (acc, loss) in extra_val.items():
                metrics.write(epoch=epoch, model=name, split="val", acc=acc, loss=loss)
            others = "".join(f"  {name} {acc:.2f}" for name, (acc, _) in extra_val.items())
            scheduled = "".join(f"  {knob} {value:.3g}" for knob, value in knobs.items())
            log.info(
                "%s epoch %d/%d  loss %.4f  train_acc %.2f  val_acc %.2f%s  lr %.3g%s  %.1fs",
                title, epoch, spec.epochs, train_row["loss"], train_row["acc"], val_acc, others, train_row["lr"],
                scheduled, train_row["time_s"],
            )

    if use_cache:
        task.teacher_cache = None  # this fit's; frees its memory
    final_val = history[-1]["val_acc"] if history else float("nan")
    return FitResult(epochs=spec.epochs, best_val_acc=best_val, final_val_acc=final_val, history=history)
