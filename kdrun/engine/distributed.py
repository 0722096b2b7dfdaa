"""Data parallelism over processes: ``torchrun --nproc_per_node=N -m kdrun ...``, or N SLURM
tasks (``hydra/launcher=slurm`` with ``tasks_per_node``).

Who is who comes from the environment (torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``,
else SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``). In a single process
every helper here is a no-op, so the engine calls them unconditionally.

The contract: every rank runs the same code path and so reaches the same collectives in
the same order; rank 0 alone writes files; a rank that fails exits (torchrun then stops
the others) instead of waiting in a collective.
"""

from __future__ import annotations

import logging
import math
import os
import re
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Sampler

from kdrun.errors import ConfigError, KdrunError

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500
# Collectives wait this long before failing; a cached-teacher lock held by another job can
# keep ranks 1..N waiting in a broadcast for as long as that job trains its teacher.
TIMEOUT_MIN = int(os.environ.get("KDRUN_DIST_TIMEOUT_MIN", "60"))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    prefix, ranges, suffix = match.group(1), match.group(2), match.group(3)
    if not ranges:
        return prefix + suffix
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def launch_env(environ=None) -> dict[str, Any] | None:
    """Rank, world size, local rank and master address of a multi-process launch; None
    for a single process. torchrun's variables win over SLURM's (torchrun inside a job)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        found = {
            "rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]), "local_rank": int(env.get("LOCAL_RANK", 0)),
            "master_addr": env.get("MASTER_ADDR", "127.0.0.1"), "master_port": int(env.get("MASTER_PORT", DEFAULT_PORT)),
            "launcher": "torchrun",
        }
    elif "SLURM_PROCID" in env:
        # SLURM_STEP_NUM_TASKS is srun's count for this step; SLURM_NTASKS is the allocation's.
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        master = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        # One port per job, so two jobs sharing a node do not collide.
        port = env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        found = {
            "rank": int(env["SLURM_PROCID"]),
            "world_size": int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1),
            "local_rank": int(env.get("SLURM_LOCALID", 0)), "master_addr": master, "master_port": int(port),
            "launcher": "slurm",
        }
    else:
        return None
    return found if found["world_size"] > 1 else None


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    found = launch_env()
    return found["rank"] if found else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_cuda_index(local_rank: int) -> int:
    """The GPU of this rank: ``cuda:LOCAL_RANK``, or the one GPU a task sees when the
    scheduler gives each task its own (``CUDA_VISIBLE_DEVICES`` per task)."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local_rank >= count:
        raise ConfigError(
            f"process with local rank {local_rank} has no GPU of its own ({count} visible); "
            "start at most one process per GPU (torchrun --nproc_per_node, or SLURM tasks_per_node = gpus_per_node)"
        )
    return local_rank


def init_from_env(device: str = "auto") -> bool:
    """Join the process group of a multi-process launch; True when this call created it.

    nccl carries CUDA tensors and gloo CPU ones (both, when GPUs are there, so CPU-side
    collectives also work). With ``device`` auto or cuda each rank binds to its own GPU.
    """
    found = launch_env()
    if found is None or (dist.is_available() and dist.is_initialized()):
        return False
    # torch's env:// and other libraries (perf.py) read the same variables.
    os.environ.update(
        RANK=str(found["rank"]), WORLD_SIZE=str(found["world_size"]), LOCAL_RANK=str(found["local_rank"]),
        MASTER_ADDR=str(found["master_addr"]), MASTER_PORT=str(found["master_port"]),
    )
    use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local_cuda_index(found["local_rank"]))
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if use_cuda else "gloo", init_method="env://", rank=found["rank"],
        world_size=found["world_size"], timeout=timedelta(minutes=TIMEOUT_MIN),
    )
    return True


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: str = "auto"):
    """The process group for the duration of a run, when this run started it."""
    created = init_from_env(device)
    try:
        yield
    finally:
        if created:
            cleanup()


def local_device(name: str) -> torch.device | None:
    """This rank's device for ``device=name`` under DDP: ``auto`` (with GPUs) and ``cuda``
    mean ``cuda:LOCAL_RANK``; None in one process or for other names (resolve as usual)."""
    if not active() or not (name == "auto" and torch.cuda.is_available() or name.startswith("cuda")):
        return None
    if name not in ("auto", "cuda") and torch.cuda.device_count() > 1:
        raise ConfigError(
            f"device={name} would put every process on one GPU; with torchrun or SLURM tasks use "
            "device=auto (or cuda): each process takes the GPU of its local rank"
        )
    return torch.device("cuda", torch.cuda.current_device())


def quiet_other_ranks() -> None:
    """Ranks other than 0 write no log file and print warnings and errors only."""
    if is_main():
        return
    for logger in (logging.getLogger(), logging.getLogger("kdrun")):
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
                handler.close()
            else:
                handler.setLevel(max(handler.level, logging.WARNING))


# Collectives (no-ops in one process) -------------------------------------------------------


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. downloads into a shared cache), then the others. An
    error of rank 0 there is raised on every rank (the others would wait for rank 0 in vain)."""
    if not active():
        yield
        return
    if is_main():
        try:
            yield
        except Exception as err:
            broadcast_object(err if isinstance(err, KdrunError) else KdrunError(f"rank 0 failed: {err}"))
            raise
        broadcast_object(None)
    else:
        failure = broadcast_object(None)
        if failure is not None:
            raise failure
        yield


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a decision made once, e.g. "resume from last.pt")."""
    if not active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if active():
        dist.broadcast(tensor, src=src)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(*flags: bool, device: torch.device | None = None) -> tuple[bool, ...]:
    """Whether each flag is set on some rank (one small all-reduce)."""
    if not active():
        return tuple(bool(flag) for flag in flags)
    votes = all_reduce_sum(torch.tensor([int(bool(flag)) for flag in flags], device=device))
    return tuple(bool(vote) for vote in votes.tolist())


def sum_over_ranks(values: dict[str, Any], device: torch.device | None = None) -> dict[str, float]:
    """Each (scalar) value summed over ranks, in float64, in one all-reduce."""
    if not active():
        return {name: float(value) for name, value in values.items()}
    stacked = torch.stack([torch.as_tensor(value, device=device).detach().to(torch.float64).reshape(()) for value in values.values()])
    return dict(zip(values, all_reduce_sum(stacked).tolist()))


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0, in rank order (lengths may differ)."""
    if not active():
        return tensor
    size = torch.tensor([len(tensor)], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    lengths = [int(s.item()) for s in sizes]
    longest = max(lengths)
    padded = torch.cat([tensor, tensor.new_zeros((longest - len(tensor), *tensor.shape[1:]))]) if len(tensor) < longest else tensor
    gathered = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([part[:length] for part, length in zip(gathered, lengths)])


# Samplers ----------------------------------------------------------------------------------


class ShardedRandomSampler(Sampler[int]):
    """This rank's share of the shuffled training order.

    Every rank draws the same permutation from ``generator`` (the loader's, reseeded by the
    loop from (seed, model, epoch), so resume stays exact) and takes every
    ``world_size``-th index from its rank on. The order is padded by its own start to a
    multiple of ``world_size``, so all ranks take the same number of steps. Step k's
    batches of all ranks together are step k's batch of one process with the same global
    batch.
    """

    def __init__(self, data_source, generator: torch.Generator, rank: int, world_size: int):
        self.size, self.generator, self.rank, self.world_size = len(data_source), generator, rank, world_size

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=self.generator).tolist()
        total = len(self) * self.world_size
        while len(order) < total:
            order += order[: total - len(order)]
        yield from order[self.rank:total:self.world_size]


class ShardedSequentialSampler(Sampler[int]):
    """Evaluation: every ``world_size``-th sample from ``rank`` on, no padding (each sample is
    counted once; the sums are all-reduced)."""

    def __init__(self, data_source, rank: int, world_size: int):
        self.size, self.rank, self.world_size = len(data_source), rank, world_size

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))


# DDP ---------------------------------------------------------------------------------------


def data_parallel(distiller: nn.Module, device: torch.device):
    """``distiller`` itself in one process; under a multi-process launch the distiller wrapped in
    ``DistributedDataParallel`` (its teacher is not a submodule, so it stays outside). Buffers of
    modules that keep themselves in step across ranks (``syncs_across_ranks``, e.g. CRD's memory)
    are broadcast once here instead of at every step."""
    if not active():
        return distiller
    from torch.nn.parallel import DistributedDataParallel

    self_synced = [
        (f"{prefix}.{name}" if prefix else name, buffer)
        for prefix, sub in distiller.named_modules() if getattr(sub, "syncs_across_ranks", False)
        for name, buffer in sub.named_buffers(recurse=False)
    ]
    for _, buffer in self_synced:
        broadcast_(buffer)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(distiller, [name for name, _ in self_synced])
    # A term active only in some epochs leaves its adapters without gradients in the others.
    return DistributedDataParallel(
        distiller, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=distiller.recipe.partial,
    )
