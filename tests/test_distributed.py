"""Data parallelism on the CPU (gloo): the sharded training order, 2-process runs through
torchrun that write one set of files and match one process with the same global batch,
and CRD's memory kept the same on every rank.

Run as a script (``python -m torch.distributed.run --nproc_per_node=2 tests/test_distributed.py OUT``)
this file is the per-rank worker of the CRD test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader


from kdrun.engine.distributed import ShardedRandomSampler, ShardedSequentialSampler, first_host, launch_env

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TORCHRUN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )


def shards(size: int, world: int, seed: int) -> list[list[int]]:
    """Each rank's order, each from a generator seeded alike (as the loop reseeds every rank's)."""
    return [
        list(ShardedRandomSampler(range(size), torch.Generator().manual_seed(seed), rank, world))
        for rank in range(world)
    ]


def test_shards_are_disjoint_and_cover_the_permutation_of_one_process():
    permutation = torch.randperm(12, generator=torch.Generator().manual_seed(3)).tolist()
    parts = shards(12, 3, seed=3)
    assert [len(p) for p in parts] == [4, 4, 4]
    assert sorted(i for p in parts for i in p) == list(range(12))  # disjoint and complete
    assert [i for step in zip(*parts) for i in step] == permutation  # step k of all ranks = step k of one process
    assert shards(12, 3, seed=3) == parts  # same seed (epoch), same order on every rank
    assert shards(12, 3, seed=4) != parts  # another epoch, another order


def test_uneven_sizes_are_padded_so_every_rank_takes_the_same_steps():
    parts = shards(11, 3, seed=0)
    assert [len(p) for p in parts] == [4, 4, 4]
    assert set(i for p in parts for i in p) == set(range(11))
    loaders = [
        DataLoader(range(11), batch_size=2, sampler=ShardedRandomSampler(range(11), torch.Generator().manual_seed(0), r, 3))
        for r in range(3)
    ]
    assert {len(loader) for loader in loaders} == {2}


def test_global_batches_match_one_process_with_the_same_global_batch():
    one = DataLoader(range(64), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(9))
    ranks = [
        DataLoader(range(64), batch_size=4, sampler=ShardedRandomSampler(range(64), generator, r, 2), generator=generator)
        for r, generator in enumerate((torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)))
    ]
    for batch, *halves in zip(one, *ranks):
        assert sorted(batch.tolist()) == sorted(torch.cat(halves).tolist())


def test_evaluation_shards_count_each_sample_once():
    parts = [list(ShardedSequentialSampler(range(10), r, 3)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(10))


def test_launch_is_read_from_torchrun_or_slurm_variables():
    assert launch_env({}) is None
    assert launch_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    torchrun_env = launch_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (torchrun_env["rank"], torchrun_env["world_size"], torchrun_env["local_rank"]) == (1, 4, 1)
    assert (torchrun_env["master_addr"], torchrun_env["master_port"]) == ("n1", 1234)
    slurm = launch_env({
        "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-10,12]", "SLURM_JOB_ID": "123456",
    })
    assert (slurm["rank"], slurm["world_size"], slurm["local_rank"]) == (5, 8, 1)
    assert slurm["master_addr"] == "gpu07" and slurm["master_port"] == 20000 + 123456 % 20000
    assert launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # one task: not distributed
    assert first_host("node1,node2") == "node1" and first_host("a-[3,5]-x") == "a-3-x"


@pytest.mark.slow
def test_two_processes_interrupted_and_resumed_write_one_set_of_files_and_match_one_process(tmp_path):
    from helpers import sigterm_when_logged, FAST, make_cfg, read_metrics, read_summary
    from kdrun.run import run

    overrides = [*FAST, "epochs=10", "scratch=false", "seed=23"]
    single = run(make_cfg(*overrides), tmp_path / "single")  # also caches the teacher both use

    _, rest = sigterm_when_logged("student epoch 1/10", "-m", "kdrun", *overrides, cwd=tmp_path, command=TORCHRUN)
    run_dirs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs  # both ranks in rank 0's directory
    run_dir = run_dirs[0]
    assert read_summary(run_dir)["status"] == "interrupted", rest[-3000:]
    assert max(r["epoch"] for r in read_metrics(run_dir) if r["model"] == "student") < 10

    resumed = torchrun("-m", "kdrun", f"resume={run_dir}", cwd=tmp_path)  # every rank loads last.pt
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming student" in resumed.stderr and "Data parallel: 2 processes, 32 samples per process" in resumed.stderr
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["teacher"]["source"] == "cache"

    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and "resumed_" not in str(p))
    assert files == [
        ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "checkpoints/best.pt",
        "checkpoints/final.pt", "checkpoints/last.pt", "config.yaml", "config_resolved.yaml", "kdrun.log",
        "metrics.jsonl", "summary.json",
    ]
    assert len(list(run_dir.glob(".hydra/resumed_*"))) == 1  # the resume's Hydra record, from rank 0 alone
    rows, single_rows = read_metrics(run_dir), read_metrics(tmp_path / "single")
    keys = [(r["epoch"], r["model"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys))  # no row twice
    assert keys == [(r["epoch"], r["model"], r["split"]) for r in single_rows]
    assert sum("student epoch 1/10" in line for line in (run_dir / "kdrun.log").read_text().splitlines()) == 1

    # Same global batch (2 x 32 = 64): the same samples per step and the mean gradient over them;
    # only float summation order differs. Losses agree to ~1e-7 (1e-4 allowed); an accuracy may
    # move by a prediction sitting on a tie: at most one test sample (0.25%) and one validation
    # sample (0.625%). (Measured: equal accuracies.)
    assert abs(summary["student"]["test_acc"] - single["student"]["test_acc"]) <= 0.25
    assert abs(summary["student"]["best_val_acc"] - single["student"]["best_val_acc"]) <= 0.625
    for ddp_row, one_row in zip(rows, single_rows):
        if ddp_row["model"] == "student" and ddp_row["split"] in ("train", "val"):
            assert ddp_row["loss"] == pytest.approx(one_row["loss"], rel=1e-4)
            assert ddp_row["acc"] == pytest.approx(one_row["acc"], abs=0.7)


def test_crd_memory_is_the_same_on_both_ranks(tmp_path):
    result = torchrun(__file__, str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for kind in ("bank", "queue"):
        rank0, rank1 = (torch.load(tmp_path / f"{kind}{r}.pt") for r in (0, 1))
        assert rank0.keys() == rank1.keys()
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), (kind, name)
    bank = torch.load(tmp_path / "bank0.pt")
    # 3 steps x 2 ranks x 4 samples: every sample pushed (labels known) on both ranks, by either rank.
    assert len(bank["memory.labels"]) == 24 and (bank["memory.labels"] >= 0).all()


def crd_worker(out: Path) -> None:
    """Each rank pushes its own samples; both ranks' memories must end up equal."""
    import torch.distributed as dist

    from kdrun.engine import distributed
    from kdrun.losses import StepOutputs
    from kdrun.losses.contrastive import CRD

    distributed.init_from_env("cpu")
    rank = dist.get_rank()
    for kind in ("bank", "queue"):
        torch.manual_seed(0)  # the same heads on both ranks, as DDP would make them
        term = CRD(feat_dim=8, nce_k=6, memory=kind, queue_size=10)
        term.setup(StepOutputs(
            student_logits=torch.zeros(4, 3), labels=torch.zeros(4, dtype=torch.long),
            student_features={"embedding": torch.zeros(4, 5)}, teacher_features={"embedding": torch.zeros(4, 7)},
        ))
        torch.manual_seed(100 + rank)  # ranks draw different negatives and new rows
        for step in range(3):
            index = torch.arange(4) + 4 * (2 * step + rank)
            data = torch.Generator().manual_seed(int(index[0]))
            outputs = StepOutputs(
                student_logits=torch.zeros(4, 3), labels=index % 3, index=index,
                student_features={"embedding": torch.randn(4, 5, generator=data)},
                teacher_features={"embedding": torch.randn(4, 7, generator=data)},
            )
            term(outputs).backward()
        torch.save({name: buffer for name, buffer in term.named_buffers()}, out / f"{kind}{rank}.pt")
    distributed.cleanup()


if __name__ == "__main__":
    crd_worker(Path(sys.argv[1]))
