"""Fast paths (``perf.*``): every switch runs on the CPU and gives the result it should."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers import FAST, kdrun_cli, make_cfg, read_metrics
from kdrun.config import validate
from kdrun.data import build as build_data
from kdrun.data.augment import Augmentation, random_crop, random_roll
from kdrun.data.device import DeviceLoader, place, to_device
from kdrun.distiller import Distiller
from kdrun.engine import checkpoint
from kdrun.engine.perf import Perf, resolve
from kdrun.errors import ConfigError
from kdrun.losses import build_recipe
from kdrun.models import build as build_model
from kdrun.models.weights import load_weights
from kdrun.run import run
from kdrun.tasks import Batch, Classification
from kdrun.teacher_cache import CachedTeacher, TeacherCache

REPO = Path(__file__).resolve().parents[1]


def student_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in read_metrics(run_dir) if row["model"] == "student"]


@pytest.mark.parametrize("override, field", [("perf.compile=maybe", "perf.compile"), ("+perf.turbo=true", "perf.turbo")])
def test_bad_perf_values_are_config_errors(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(make_cfg(override))


def test_auto_resolves_to_the_cpu_fallbacks():
    perf = resolve(make_cfg(), torch.device("cpu"))
    assert (perf.channels_last, perf.cudnn_benchmark, perf.pin_memory, perf.compile) == (False, False, False, False)
    assert perf.optimizer_impl == "foreach"
    assert perf.notes["channels_last"] == "off (CPU)" and "auto" in perf.notes["teacher_cache"]


@pytest.mark.parametrize("drop_last", [False, True])
def test_device_loader_gives_the_dataloader_batches(drop_last):
    cfg = make_cfg(*FAST, "dataset.batch_size=100", f"+dataset.drop_last={str(drop_last).lower()}")
    data = build_data(cfg.dataset, seed=0)
    resident = to_device(data, torch.device("cpu"))
    assert isinstance(resident.train, DeviceLoader) and len(resident.train) == len(data.train)
    for epoch_seed in (3, 4):  # the loop reseeds the generator every epoch
        data.train.generator.manual_seed(epoch_seed)
        resident.train.generator.manual_seed(epoch_seed)
        for ours, theirs in zip(resident.train, data.train, strict=True):
            assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    indexed, resident_indexed = data.indexed(), resident.indexed()
    indexed.train.generator.manual_seed(1)
    resident_indexed.train.generator.manual_seed(1)
    for ours, theirs in zip(resident_indexed.train, indexed.train, strict=True):
        assert len(ours) == 3 and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    for split in ("val", "test"):
        for ours, theirs in zip(getattr(resident, split), getattr(data, split), strict=True):
            assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_device_data_true_is_refused_where_it_cannot_apply():
    data = build_data(make_cfg(*FAST).dataset, seed=0)
    with pytest.raises(ConfigError, match="perf.device_data=true .* read from files"):
        place(replace(data, in_memory=False), Perf(device_data=True))
    auto = Perf(device_data="auto")
    assert place(replace(data, in_memory=False), auto).train is data.train
    assert auto.notes["device_data"].startswith("off (")


@pytest.mark.slow
def test_device_data_gives_the_same_metrics_as_the_dataloader(tmp_path):
    common = (*FAST, "perf.teacher_cache=false")
    run(make_cfg(*common, "perf.device_data=true"), tmp_path / "device")
    run(make_cfg(*common, "perf.device_data=false"), tmp_path / "loader")
    assert "device_data on" in (tmp_path / "device" / "kdrun.log").read_text()
    assert student_rows(tmp_path / "device") == student_rows(tmp_path / "loader")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kd", "fitnet"])
def test_teacher_cache_gives_the_same_metrics_as_the_teacher(tmp_path, loss):
    common = (*FAST, "epochs=3", f"loss={loss}")
    run(make_cfg(*common, "perf.teacher_cache=true"), tmp_path / "cache")
    run(make_cfg(*common, "perf.teacher_cache=false"), tmp_path / "teacher")
    log = (tmp_path / "cache" / "kdrun.log").read_text()
    assert "teacher_cache on" in log and "Teacher cache:" in log
    assert student_rows(tmp_path / "cache") == student_rows(tmp_path / "teacher")


@pytest.mark.slow
def test_teacher_cache_is_refused_for_augmented_data(tmp_path):
    result = kdrun_cli(*FAST, "perf.teacher_cache=true", "dataset.source.max_shift=2", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "perf.teacher_cache=true" in lines[0] and "augment" in lines[0]
    assert not list(tmp_path.glob("**/metrics.jsonl"))  # refused before any training


def test_teacher_cache_turns_itself_off_above_its_limit():
    cache = TeacherCache(size=1000, limit_bytes=1000)
    cache.write(torch.arange(4), torch.zeros(4, 10), {})
    assert cache.disabled and cache.read(torch.arange(4)) is None
    with pytest.raises(ConfigError, match="perf.teacher_cache=true"):
        TeacherCache(size=1000, limit_bytes=1000, strict=True).write(torch.arange(4), torch.zeros(4, 10), {})


def test_device_augmentation_crops_flips_and_rolls():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    rng = torch.Generator().manual_seed(0)
    cropped = random_crop(images, 1, (-1.0, -2.0, -3.0), rng)
    assert cropped.shape == images.shape
    padded = nn.functional.pad(images, (1, 1, 1, 1))
    for c, fill in enumerate((-1.0, -2.0, -3.0)):
        padded[:, c][padded[:, c] == 0] = fill
    padded[0, 0, 1, 1] = 0.0  # the one real zero pixel
    for i in range(2):
        windows = [padded[i, :, y:y + 4, x:x + 4] for y in range(3) for x in range(3)]
        assert any(torch.equal(cropped[i], w) for w in windows)
    signals = torch.arange(10, dtype=torch.float32).repeat(5, 1, 1)
    rolled = random_roll(signals, 2, rng)
    for row in rolled:
        assert any(torch.equal(row, torch.roll(signals[0], s, -1)) for s in range(-2, 3))
    flipped = Augmentation(flip=True)(images, torch.Generator().manual_seed(1))
    assert all(torch.equal(f, x) or torch.equal(f, x.flip(-1)) for f, x in zip(flipped, images))


def test_device_data_augments_on_the_device():
    cfg = make_cfg(*FAST, "dataset.source.max_shift=3", "dataset.source.noise=0.05")
    data = build_data(cfg.dataset, seed=0)
    assert data.augmentation == Augmentation(max_shift=3, noise=0.05)
    loader = to_device(data, torch.device("cpu")).train
    loader.generator.manual_seed(0)
    first = next(iter(loader))
    loader.generator.manual_seed(0)
    again = next(iter(loader))
    assert torch.equal(first[0], again[0])  # the epoch seed fixes the augmentation too
    data.train.generator.manual_seed(0)
    plain = next(iter(data.train))
    assert torch.equal(first[1], plain[1]) and not torch.equal(first[0], plain[0])


@pytest.mark.slow
def test_augmented_run_augments_on_the_device_without_the_teacher_cache(tmp_path):
    summary = run(make_cfg(*FAST, "epochs=1", "scratch=false", "dataset.source.max_shift=2"), tmp_path)
    assert summary["status"] == "completed"
    log = (tmp_path / "kdrun.log").read_text()
    assert "augmentation on the device" in log and "teacher_cache off (training inputs are augmented)" in log


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.SGD])
@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_fused_and_foreach_optimizers_step(optimizer, impl):
    factory = partial(optimizer, lr=0.1)
    kwargs = Perf(optimizer_impl=impl).optimizer_kwargs(factory)
    assert kwargs == {impl: True}
    model = nn.Linear(4, 2)
    before = model.weight.detach().clone()
    opt = factory(params=model.parameters(), **kwargs)
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    assert not torch.equal(before, model.weight)
    assert Perf(optimizer_impl="fused").optimizer_kwargs(partial(torch.optim.Adadelta)) == {}


@pytest.mark.slow
def test_cuda_switches_and_fused_optimizer_run_on_cpu(tmp_path):
    """channels_last, cudnn_benchmark, pin_memory and fused kernels forced on, on the CPU, conv nets on images."""
    summary = run(make_cfg(
        "dataset=fake", "teacher=cnn", "student=cnn_small", "epochs=1", "teacher_training.epochs=1", "scratch=false",
        "perf.channels_last=true", "perf.cudnn_benchmark=true", "perf.pin_memory=true", "perf.fused_optimizer=true",
        "perf.persistent_workers=false",
    ), tmp_path)
    assert summary["status"] == "completed"
    log = (tmp_path / "kdrun.log").read_text()
    assert "channels_last on" in log and "fused_optimizer fused" in log


def test_frozen_teacher_builds_no_autograd_graph():
    cfg = make_cfg("loss=fitnet")
    student = build_model(cfg.student, 10, (1, 40))
    teacher = build_model(cfg.teacher, 10, (1, 40))
    distiller = Distiller(student, build_recipe(cfg.loss), Classification(), teacher)
    batch = Batch(torch.randn(16, 1, 40), torch.randint(0, 10, (16,)), index=torch.arange(16))
    distiller.setup(batch)
    cache = TeacherCache(size=16, limit_bytes=2**30)
    distiller.teacher_outputs = CachedTeacher(distiller.teacher_outputs, cache)
    with distiller:
        for _ in range(2):  # computed, then read from the cache
            outputs = distiller.step_outputs(batch)
            for tensor in (outputs.teacher_logits, *outputs.teacher_features.values()):
                assert tensor.requires_grad is False and tensor.grad_fn is None
            total, _ = distiller.recipe(outputs)
            total.backward()
            distiller.before_epoch(2, 2)
    assert cache.complete
    assert "teacher" not in dict(distiller.named_modules()) and not any(k.startswith("teacher") for k in distiller.state_dict())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


@pytest.mark.slow
def test_compiled_models_match_and_their_checkpoints_load_uncompiled(tmp_path):
    cfg = make_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.student, 10, (1, 40)).eval()
    reference = build_model(cfg.student, 10, (1, 40)).eval()
    reference.load_state_dict(model.state_dict())
    Perf(compile=True).prepare_models([model], (1, 40))
    inputs = torch.randn(32, 1, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), reference(inputs), rtol=1e-4, atol=1e-5)
    assert set(model.state_dict()) == set(reference.state_dict())
    checkpoint.save_atomic({"model": model.state_dict()}, tmp_path / "best.pt")
    fresh = build_model(cfg.student, 10, (1, 40)).eval()
    load_weights(fresh, tmp_path / "best.pt", "compiled checkpoint")
    with torch.no_grad():
        torch.testing.assert_close(fresh(inputs), reference(inputs))


@pytest.mark.slow
def test_bench_quick_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--no-e2e", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    for key in ("kd_overhead_ratio", "throughput_vs_hand_loop", "student_ce_step_s", "teacher_forward_s",
                "kdrun_step_s", "hand_kd_step_s", "switches", "perf"):
        assert key in report
    assert {"device_data", "teacher_cache", "fused_optimizer"} <= set(report["switches"])
    assert report["switches"]["device_data"]["on"]["samples_per_s"] > 0
    assert "| (a) KD overhead ratio" in result.stdout
