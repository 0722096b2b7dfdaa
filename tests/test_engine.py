"""Schedules as pure functions; checkpoints written atomically and loaded safely."""

from __future__ import annotations

import math

import pytest
import torch

from kdrun.engine import checkpoint
from kdrun.engine.schedule import constant, cosine, cosine_factor, multistep, multistep_factor
from kdrun.errors import CheckpointError


def test_cosine_factor_endpoints_and_midpoint():
    assert cosine_factor(0, 100) == pytest.approx(1.0)
    assert cosine_factor(50, 100) == pytest.approx(0.5)
    assert cosine_factor(100, 100) == pytest.approx(0.0)
    assert cosine_factor(100, 100, min_factor=0.1) == pytest.approx(0.1)


def test_cosine_warmup_is_linear():
    assert [cosine_factor(s, 100, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_factor(4, 100, warmup_steps=4) == pytest.approx(1.0)


def test_multistep_factor_counts_milestones_passed():
    assert [multistep_factor(s, [150, 180, 210], 0.1) for s in (0, 149, 150, 180, 239)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.01, 0.001]
    )


def _lrs(factory, steps, **kwargs):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = factory(optimizer, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedulers_step_per_batch_with_epoch_milestones():
    lrs = _lrs(multistep, 8, epochs=4, steps_per_epoch=2, milestones=[2, 3], gamma=0.5)
    assert lrs == pytest.approx([1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25])
    lrs = _lrs(cosine, 4, epochs=2, steps_per_epoch=2)
    assert lrs == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    assert _lrs(constant, 3, epochs=1, steps_per_epoch=3) == [1.0, 1.0, 1.0]


def test_checkpoint_roundtrip_and_atomic_replace(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    checkpoint.save_atomic({"model": {"w": torch.ones(2)}, "epoch": 1}, path)
    checkpoint.save_atomic({"model": {"w": torch.zeros(2)}, "epoch": 2}, path)
    state = checkpoint.load(path)
    assert state["epoch"] == 2 and torch.equal(state["model"]["w"], torch.zeros(2))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary files left


def test_corrupt_and_missing_checkpoints_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch checkpoint"):
        checkpoint.load(bad, "teacher.checkpoint")
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt", "teacher.checkpoint")


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": object()}, path)
    with pytest.raises(CheckpointError):
        checkpoint.load(path)


def test_model_state_strips_compile_and_ddp_prefixes():
    state = {"model": {"_orig_mod.fc.weight": torch.ones(1), "module.fc.bias": torch.zeros(1)}}
    assert set(checkpoint.model_state(state)) == {"fc.weight", "fc.bias"}


def test_projection_and_alignment_shapes():
    from kdrun.losses.adapters import align_maps, projection

    s_map, t_map = torch.randn(2, 8, 20), torch.randn(2, 16, 10)
    s, t = align_maps(s_map, t_map)
    assert s.shape == (2, 8, 10) and t.shape == (2, 16, 10)
    assert projection(s.shape, t.shape)(s).shape == t.shape
    s, t = align_maps(torch.randn(2, 32), t_map)  # vector student, map teacher
    assert s.shape == (2, 32) and t.shape == (2, 160)
    assert projection(s.shape, t.shape)(s).shape == (2, 160)
