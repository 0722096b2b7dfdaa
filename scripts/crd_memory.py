"""Bytes held by CRD's memory, per-sample bank vs fixed queue, as the training set grows.

Each size is measured on a real ``CRD`` term fed every index of a shuffled dataset
once (synthetic features, no training), so the numbers are the buffers a run would
checkpoint. Usage: ``python scripts/crd_memory.py [--sizes 1000 10000 ...] [--write docs/losses.md]``
(the table goes between the page's ``<!-- table:crd_memory -->`` markers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from docs_tables import provenance, write_block

from kdrun.losses import StepOutputs
from kdrun.losses.contrastive import CRD

FEATURE_DIM = 64  # width of the synthetic tapped features; the memory holds feat_dim-wide rows


def batch(indices: torch.Tensor, labels: torch.Tensor) -> StepOutputs:
    features = torch.randn(len(indices), FEATURE_DIM)
    return StepOutputs(
        student_logits=torch.zeros(len(indices), 1), labels=labels, index=indices,
        student_features={"embedding": features}, teacher_features={"embedding": features},
    )


@torch.no_grad()
def memory_bytes(memory: str, num_samples: int, feat_dim: int, queue_size: int, batch_size: int) -> int:
    torch.manual_seed(0)
    # nce_k does not change the memory's size; a small one keeps the feeding quick.
    term = CRD(feat_dim=feat_dim, nce_k=16, memory=memory, queue_size=queue_size)
    labels = torch.randint(0, 100, (num_samples,))
    term.setup(batch(torch.arange(2), labels[:2]))
    for indices in torch.randperm(num_samples).split(batch_size):
        term(batch(indices, labels[indices]))
    return sum(buffer.nbytes for buffer in term.memory.buffers())


def human(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{num_bytes} B"
        num_bytes /= 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**3, 10**4, 10**5, 10**6])
    parser.add_argument("--feat-dim", type=int, default=128)
    parser.add_argument("--queue-size", type=int, default=16384)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--write", type=Path, help="a markdown page whose crd_memory block receives the table")
    args = parser.parse_args()
    lines = ["| training samples | bank | queue |", "|---:|---:|---:|"]
    for num_samples in args.sizes:
        bank, queue = (memory_bytes(memory, num_samples, args.feat_dim, args.queue_size, args.batch_size) for memory in ("bank", "queue"))
        lines.append(f"| {num_samples:,} | {human(bank)} | {human(queue)} |")
        print(lines[-1], flush=True)
    if args.write:
        head = (f"{provenance()} CRD memory with feat_dim {args.feat_dim}, queue_size {args.queue_size}: student and "
                "teacher rows, labels and indices.")
        write_block(args.write, "crd_memory", head + "\n\n" + "\n".join(lines))

if __name__ == "__main__":
    main()
