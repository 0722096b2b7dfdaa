"""Peers in the benchmark (``scripts/bench.py --peers``): one KD training step of torchdistill's
own training path, timed in turns with kdrun's step and the hand-written loop of bench.py.

torchdistill (``pip install -e '.[peers]'``, PyPI ``torchdistill``) gets the same teacher and
student modules, the same batches (already on the device, in the models' memory format), the
same loss (Hinton KD at the same ``T`` and ``alpha``; torchdistill's ``KDLoss`` weights CE by its
``alpha``, so it gets ``1 - alpha``) and the same optimizer class, settings and fused/foreach
implementation. Its step is what its ``DistillationBox`` does per batch in its training script
(``examples/torchvision/image_classification.py``, ``train_one_epoch``): ``forward_process``
then ``post_forward_process`` (backward, optimizer step), without that script's per-step
``loss.item()`` logging. Neither peer steps a learning-rate scheduler; kdrun's step does.
torchdistill has no autocast of its own (HF accelerate does it there), so its step runs inside
the same autocast region as kdrun's; with fp16 it has no grad scaler (timing only).

Before timing, torchdistill's loss on the first batch is checked against kdrun's KD formula, so
the peers are known to compute the same thing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdrun.engine.loop import autocast
from kdrun.losses.logits import soft_target_kl


def unavailable() -> str | None:
    """Why ``--peers`` cannot run here (None when it can)."""
    try:
        import torchdistill  # noqa: F401
    except ImportError as err:
        return f"--peers needs torchdistill, which cannot be imported ({err}); install it with pip install -e '.[peers]'"
    return None


def train_config(setup, epochs: int) -> dict:
    """torchdistill's training configuration for the bench's models, loss and optimizer."""
    factory = setup.spec.optimizer
    optimizer_kwargs = {**factory.keywords, **setup.perf.optimizer_kwargs(factory)}
    logits = {"student_module_path": ".", "student_module_io": "output",
              "teacher_module_path": ".", "teacher_module_io": "output"}
    kd = {**logits, "temperature": float(setup.cfg.T), "alpha": 1 - float(setup.cfg.alpha), "reduction": "batchmean"}
    return {
        "num_epochs": epochs,
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "requires_grad": True},
        "optimizer": {"key": factory.func.__name__, "kwargs": optimizer_kwargs},
        "criterion": {"key": "WeightedSumLoss",
                      "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}}},
    }


def check_same_loss(box, setup, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """torchdistill's loss on a batch equals ``(1 - alpha) * CE + alpha * T^2 * KL`` (kdrun's KD)."""
    T, alpha = float(setup.cfg.T), float(setup.cfg.alpha)
    with torch.no_grad():
        theirs = box.forward_process(inputs, labels, {})
        logits, teacher_logits = setup.student(inputs), setup.teacher(inputs)
        ours = (1 - alpha) * F.cross_entropy(logits, labels) + alpha * soft_target_kl(logits, teacher_logits, T)
    if not torch.allclose(theirs.float(), ours.float(), rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"torchdistill's KD loss {theirs.item():.6f} differs from kdrun's {ours.item():.6f}")


def runners(setup, epochs: int, timed) -> dict[str, Callable[[], float]]:
    """torchdistill's KD step over the hand-written loop's batches, as a timed repeat (bench.py's
    ``timed``: seconds per step)."""
    from torchdistill.core.distillation import get_distillation_box

    device, dtype = setup.device, setup.dtype
    batches = setup.batches()
    box = get_distillation_box(setup.teacher, setup.student, {}, train_config(setup, epochs), device,
                               [device.index] if device.type == "cuda" else None, distributed=False, lr_factor=1)
    check_same_loss(box, setup, batches[0].inputs, batches[0].labels)

    def step(batch) -> None:
        with autocast(device, dtype):
            loss = box.forward_process(batch.inputs, batch.labels, {})
        box.post_forward_process(loss=loss)

    return {"torchdistill_kd_step_s": timed(step, batches, device, epochs, before=lambda: box.pre_epoch_process(epoch=0))}


def ratios(results: dict) -> dict[str, float]:
    """kdrun's throughput over torchdistill's, teacher cache off (like for like) and at the defaults."""
    theirs = results["torchdistill_kd_step_s"]
    return {"throughput_vs_torchdistill_no_cache": theirs / results["kdrun_step_s_no_cache"],
            "throughput_vs_torchdistill": theirs / results["kdrun_step_s"]}


def rows(r: dict) -> list[str]:
    """The peers' lines of bench.py's table."""
    cache = r["perf"].get("teacher_cache", "?")
    return [
        f"| torchdistill KD step (DistillationBox forward_process + post_forward_process) | "
        f"{1000 * r['torchdistill_kd_step_s']:.3f} ms | |",
        f"| (e) throughput / torchdistill, teacher cache off (like for like: all run the teacher) | "
        f"{r['throughput_vs_torchdistill_no_cache']:.3f} | |",
        f"| (e) throughput / torchdistill, defaults (teacher cache {cache}; where on, kdrun skips the teacher forward "
        f"and the peers do not) | {r['throughput_vs_torchdistill']:.3f} | |",
    ]
