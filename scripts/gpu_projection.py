"""How long the CRD paper's CIFAR-100 recipe for resnet32x4 -> resnet8x4 (240 epochs, batch 64,
50,000 training and 10,000 test images) would take on one H100/H200-class GPU: a projection,
from kdrun's step measured here and counted work, until the GPU kit measures it.

    OMP_NUM_THREADS=2 python scripts/gpu_projection.py [--steps 8] [--repeats 3]

What it measures and counts (on this machine, CIFAR-100-shaped ``fake`` data, ``loss=kd``, SGD,
teacher forward in every step as with CIFAR's augmentation, so the teacher cache is off):

- kdrun's training step through the real loop (``bench.py``'s ``fit``-based timing), median of
  ``--repeats`` runs of ``--steps`` steps after a warm-up epoch, scaled to an epoch;
- the arithmetic of one step (``torch.utils.flop_counter``: convolutions and matrix products,
  forward and backward; 2 FLOPs per multiply-add) and of the per-epoch test pass;
- the operators one step dispatches (each is about one CUDA kernel launch in eager mode).

The GPU time is then projected two ways: compute-bound (the FLOPs over the H100/H200 dense
BF16 tensor rate, 989 TFLOPS, NVIDIA's H100 SXM datasheet figure of 1,979 with sparsity, at a
stated utilisation) and launch-bound (operators x an assumed host cost per eager operator).
The larger of the two is the projection; both are assumptions, not measurements.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import Setup, compose, interleaved, kdrun_runner  # noqa: E402
from kdrun.distiller import Distiller  # noqa: E402
from kdrun.engine.loop import Placement  # noqa: E402
from kdrun.engine.stats import EpochStats  # noqa: E402
from kdrun.losses.recipe import recipe_from  # noqa: E402
from kdrun.tasks import Classification  # noqa: E402

EPOCHS, TRAIN, TEST, BATCH = 240, 50_000, 10_000, 64
PEAK_BF16 = 989e12  # dense BF16 tensor FLOP/s of an H100 SXM (the H200 has the same compute)
UTILISATIONS = (0.1, 0.2, 0.4)
HOST_US_PER_OP = (5.0, 10.0)  # assumed host time per eager operator on a GPU machine (dispatch + launch)
OVERRIDES = [
    "teacher=resnet32x4", "student=resnet8x4", "loss=kd", "optim=sgd", "dataset=fake", "dataset.source.num_classes=100",
    "dataset.source.image_size=32", "dataset.source.channels=3", f"dataset.batch_size={BATCH}",
    "dataset.source.num_test=64", "perf.teacher_cache=false", "device=cpu",
]


class OperatorCount(TorchDispatchMode):
    """How many ATen operators run (each one kernel launch, roughly, in eager mode on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def one_step_counts(setup: Setup) -> dict[str, float]:
    """Per sample: FLOPs of a KD training step (teacher forward, student forward and backward), of
    the test pass (student forward) and of the teacher's forward; and the operators of one step as
    the loop runs it on a GPU (distiller forward and backward, fused SGD step, epoch statistics)."""
    task = Classification()
    distiller = Distiller(setup.student, recipe_from(setup.cfg), task, setup.teacher)
    batch = Placement(task, setup.device)(next(iter(setup.data.train)))
    optimizer = setup.spec.optimizer(params=list(setup.student.parameters()), fused=True)

    def step() -> None:
        total, parts, logits, labels = distiller(batch)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        EpochStats(task, setup.device).add(total, parts, logits, labels)

    with distiller, FlopCounterMode(display=False) as step_flops:
        step()
    with distiller, OperatorCount() as operators:
        step()
    with torch.no_grad(), FlopCounterMode(display=False) as test_flops:
        setup.student.eval()(batch.inputs)
    with torch.no_grad(), FlopCounterMode(display=False) as teacher_flops:
        setup.teacher(batch.inputs)
    setup.student.train()
    return {"step": step_flops.get_total_flops() / batch.size, "test": test_flops.get_total_flops() / batch.size,
            "teacher": teacher_flops.get_total_flops() / batch.size, "operators": operators.count}


def projection(step_s: float, counts: dict[str, float]) -> str:
    steps = math.ceil(TRAIN / BATCH)
    step_flops, operators = counts["step"], counts["operators"]
    work = EPOCHS * (TRAIN * step_flops + TEST * counts["test"])
    cpu_epoch = steps * step_s
    rate = step_flops * BATCH / step_s
    lines = [
        f"Measured on {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads, torch "
        f"{torch.__version__}): kdrun KD step, batch {BATCH}, {1000 * step_s:.0f} ms",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| kdrun step on this CPU (batch {BATCH}, teacher forward + student forward/backward + SGD) | {1000 * step_s:.0f} ms |",
        f"| one epoch on this CPU ({steps} steps, scaled from the measured step) | {cpu_epoch / 60:.1f} min |",
        f"| 240 epochs on this CPU (scaled) | {EPOCHS * cpu_epoch / 86400:.1f} days |",
        f"| work per training sample (resnet32x4 forward + resnet8x4 forward and backward) | {step_flops / 1e9:.2f} GFLOP |",
        f"| work per test sample (resnet8x4 forward) | {counts['test'] / 1e9:.2f} GFLOP |",
        f"| work of the whole recipe ({EPOCHS} x ({TRAIN:,} training + {TEST:,} test samples)) | {work / 1e15:.1f} PFLOP |",
        f"| rate achieved here (work of a step / its time) | {rate / 1e9:.0f} GFLOP/s |",
        f"| operators per training step (about one GPU kernel launch each, eager mode) | {operators:,} |",
    ]
    lines += [f"| compute-bound GPU time, the whole recipe's work at {u:.0%} of 989 TFLOPS (BF16, dense) | "
              f"{work / (PEAK_BF16 * u) / 60:.1f} min |" for u in UTILISATIONS]
    lines += [f"| launch-bound GPU time at {us:g} us of host time per operator | "
              f"{EPOCHS * steps * operators * us * 1e-6 / 60:.1f} min |" for us in HOST_US_PER_OP]
    lines += [
        f"| host time per step that 15 minutes allows ({EPOCHS * steps:,} steps) | {900 / (EPOCHS * steps) * 1e3:.1f} ms, "
        f"{900 / (EPOCHS * steps * operators) * 1e6:.0f} us per operator |",
        f"| the teacher's own {EPOCHS} epochs, if not given (resnet32x4 forward and backward, about 3x its forward) | "
        f"{EPOCHS * TRAIN * 3 * counts['teacher'] / 1e15:.1f} PFLOP |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", type=Path, help="a markdown page whose gpu_projection block receives the table")
    args = parser.parse_args()
    overrides = [*OVERRIDES, f"dataset.source.num_train={args.steps * BATCH}"]
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(compose(overrides), torch.device("cpu"))
        counts = one_step_counts(setup)
        step_s = interleaved({"step": kdrun_runner(setup, epochs=1, workdir=Path(tmp))}, args.repeats)["step"]
    text = projection(step_s, counts)
    print(text)
    if args.write:
        from docs_tables import provenance, write_block

        write_block(args.write, "gpu_projection", f"{provenance()}\n\n{text}")


if __name__ == "__main__":
    main()
