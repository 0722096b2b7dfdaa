"""Every CUDA path on a real GPU: the perf switches, bf16 and fp16 autocast, torch.compile,
device-resident data with on-device augmentation, the teacher cache in GPU memory, torchrun
over NCCL, ``device=auto`` in a parallel sweep, and no host-device sync inside a training step.

Marked ``cuda``; skipped with the reason where there is no GPU. ``scripts/gpu_check.sh`` runs
them (``pytest -m cuda -n 0 tests/test_cuda.py``) and puts the outcome in its report. The
reference job is small (scikit-learn's digits, a CNN teacher and student, two student epochs)
so the module takes minutes on one GPU, compile included.

Tolerances: runs on a GPU are not bit-identical even with the same switches (cuDNN picks
algorithms; conv backward sums in varying order; TF32 convolutions), so "the same metrics"
means fp32 runs within ``FP32`` and autocast runs within ``AMP`` of the fp32 reference: losses
to a relative tolerance, accuracies to a number of percentage points (one digits validation
sample is 0.69 points). A broken switch (a wrong memory layout, stale cached outputs, batches in
another order, a corrupted pinned copy) moves them far more.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import kdrun_cli, make_cfg, read_metrics, read_summary
from kdrun.config import auto_device
from kdrun.data import build as build_data
from kdrun.data.augment import Augmentation, random_crop, random_roll
from kdrun.data.device import to_device
from kdrun.distiller import Distiller
from kdrun.engine import checkpoint
from kdrun.engine.loop import evaluate
from kdrun.engine.stats import StopCheck
from kdrun.models import build as build_model
from kdrun.models.weights import load_weights
from kdrun.run import run
from kdrun.tasks import Classification
from kdrun.teacher_cache import CachedTeacher

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False here); scripts/gpu_check.sh runs "
                              "these on a GPU machine"),
]

SHORT = ("epochs=2", "teacher_training.epochs=3", "scratch=false")
JOB = ("dataset=digits", "teacher=cnn", "student=cnn_small", *SHORT)
# MNIST-1D with its augmentation (random circular shifts), which device-resident data applies on the GPU.
AUGMENTED = ("dataset.source.num_samples=1000", "dataset.source.max_shift=2", *SHORT)
SWITCHES = ("channels_last", "cudnn_benchmark", "fused_optimizer", "pin_memory", "device_data", "teacher_cache")


def plain(job: tuple[str, ...], device: str = "cuda") -> tuple[str, ...]:
    """``job`` with every switch off, in fp32: the plain path each switch is compared with."""
    return (*job, f"device={device}", "amp=false", "perf.compile=false", *(f"perf.{name}=false" for name in SWITCHES))


PLAIN = plain(JOB)
FP32 = {"loss_rtol": 2e-2, "acc_points": 3.0}
AMP = {"loss_rtol": 5e-2, "acc_points": 5.0}
# What the "perf:" log line says when each switch is on.
ON = {"channels_last": "channels_last on", "cudnn_benchmark": "cudnn_benchmark on", "fused_optimizer": "fused_optimizer fused",
      "pin_memory": "pin_memory on", "device_data": "device_data on (", "teacher_cache": "teacher_cache on"}


def student_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in read_metrics(run_dir) if row["model"] == "student"]


def assert_same_training(run_dir: Path, reference: Path, loss_rtol: float, acc_points: float) -> None:
    """The student's per-epoch rows and test accuracy of two runs agree within the tolerances."""
    rows, expected = student_rows(run_dir), student_rows(reference)
    assert [(r["epoch"], r["split"]) for r in rows] == [(r["epoch"], r["split"]) for r in expected]
    for row, want in zip(rows, expected):
        assert set(row) == set(want)
        for key, value in want.items():
            if key == "loss" or key.startswith("loss/"):
                assert row[key] == pytest.approx(value, rel=loss_rtol), (key, row, want)
            elif key == "acc":
                assert row[key] == pytest.approx(value, abs=acc_points), (key, row, want)
            else:  # epoch, split, lr, T, alpha: the same schedule
                assert row[key] == value, (key, row, want)
    test, want = read_summary(run_dir)["student"]["test_acc"], read_summary(reference)["student"]["test_acc"]
    assert test == pytest.approx(want, abs=acc_points)
    assert want > 50  # the reference run learned something (chance is 10%)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """The reference: the job with every switch off, in fp32 (also trains and caches the teacher)."""
    run_dir = tmp_path_factory.mktemp("cuda") / "plain"
    assert run(make_cfg(*PLAIN), run_dir)["status"] == "completed"
    return run_dir


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_gives_the_metrics_of_the_plain_path(plain_run, tmp_path, switch):
    run(make_cfg(*PLAIN, f"perf.{switch}=true"), tmp_path)
    assert ON[switch] in (tmp_path / "kdrun.log").read_text()
    assert_same_training(tmp_path, plain_run, **FP32)


def test_the_defaults_together_give_the_metrics_of_the_plain_path(plain_run, tmp_path):
    """Every switch at auto and bf16 autocast: what a user gets on a GPU."""
    run(make_cfg(*JOB, "device=cuda"), tmp_path)
    log = (tmp_path / "kdrun.log").read_text()
    assert all(ON[switch] in log for switch in SWITCHES if switch != "pin_memory")  # device data needs no pinning
    assert_same_training(tmp_path, plain_run, **AMP)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_bf16_and_fp16_with_its_grad_scaler(plain_run, tmp_path, monkeypatch, dtype):
    if dtype == "fp16":  # what a GPU without bf16 gets: fp16 autocast and the grad scaler
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    elif not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bf16")
    run(make_cfg(*PLAIN, "amp=true"), tmp_path)
    scaler = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["scaler"]
    assert ("scale" in scaler) == (dtype == "fp16")  # the scaler is on with fp16 only
    if dtype == "fp16":
        assert 0 < scaler["scale"] <= 2.0**16
    assert_same_training(tmp_path, plain_run, **AMP)


def test_compiled_run_matches_and_its_checkpoint_loads_uncompiled(plain_run, tmp_path):
    run(make_cfg(*PLAIN, "perf.compile=true"), tmp_path)
    assert "compile on" in (tmp_path / "kdrun.log").read_text()
    assert_same_training(tmp_path, plain_run, **FP32)
    final = checkpoint.load(tmp_path / "checkpoints" / "final.pt")
    assert not any("_orig_mod" in key for key in final["model"])
    cfg = make_cfg(*PLAIN)
    data = build_data(cfg.dataset, seed=0)
    student = build_model(cfg.student, data.num_classes, data.input_shape)
    load_weights(student, tmp_path / "checkpoints" / "final.pt", "compiled run's student")
    tested = evaluate(student.cuda(), data.test, Classification(), torch.device("cuda"))
    assert tested["acc"] == pytest.approx(final["test"]["acc"], abs=100 / len(data.test.dataset) + 1e-9)


def windows(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop (and its mirror) of ``image`` zero-padded by ``padding``: what a random crop + flip may give."""
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    height, width = image.shape[-2:]
    crops = [padded[..., y:y + height, x:x + width] for y in range(2 * padding + 1) for x in range(2 * padding + 1)]
    return crops + [crop.flip(-1) for crop in crops]


def test_device_augmentation_runs_on_the_gpu_and_draws_valid_crops_flips_and_shifts(tmp_path):
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(16, 3, 8, 8, device=device)
    augmented = Augmentation(crop_padding=2, flip=True)(images, generator)
    assert augmented.device.type == "cuda" and augmented.shape == images.shape
    assert all(any(torch.equal(out, w) for w in windows(image, 2)) for out, image in zip(augmented, images))
    assert not torch.equal(augmented, images)
    assert torch.equal(random_crop(images, 0, (0.0,), generator), images)
    signals = torch.arange(12.0, device=device).repeat(8, 1, 1)
    rolled = random_roll(signals, 3, generator)
    assert all(any(torch.equal(row, signals[0].roll(s, -1)) for s in range(-3, 4)) for row in rolled)

    data = build_data(make_cfg(*AUGMENTED).dataset, seed=0)
    resident, loader = to_device(data, device).indexed().train, data.indexed().train
    resident.generator.manual_seed(5)
    loader.generator.manual_seed(5)
    for (inputs, labels, index), (_, _, plain_index) in zip(resident, loader, strict=True):
        assert inputs.device.type == "cuda" and torch.equal(index.cpu(), plain_index)  # the DataLoader's order
        assert torch.equal(labels, resident.labels[index])
        for signal, original in zip(inputs, resident.inputs[index]):
            assert any(torch.equal(signal, original.roll(s, -1)) for s in range(-2, 3))
    summary = run(make_cfg(*AUGMENTED, "device=cuda"), tmp_path)
    log = (tmp_path / "kdrun.log").read_text()
    assert summary["status"] == "completed" and "augmentation on the device" in log and "on cuda" in log


class SyncGuard:
    """``torch.cuda.set_sync_debug_mode("error")`` over every training step of the real loop, except
    the syncs the code documents: the stop / non-finite check (``StopCheck``, every 25 steps and at
    an epoch's last) and everything at the epoch's start and end (teacher-cache completeness, the
    statistics' all-reduce, validation, checkpoints). On from the first step's forward to the
    epoch's last step, so every later batch's loading and placement is checked too."""

    def __init__(self, monkeypatch):
        self.steps, self.epoch_steps, self.distillers = 0, 0, []
        forward, after_step = Distiller.forward, StopCheck.after_step
        guard = self

        def checked_forward(distiller, batch, progress=None):
            torch.cuda.set_sync_debug_mode("error")
            guard.steps += 1
            if distiller not in guard.distillers:
                guard.distillers.append(distiller)
            return guard.off_on_error(forward, distiller, batch, progress)

        def checked_after_step(check, step, epoch, loss_sum):
            if check.due(step):
                torch.cuda.set_sync_debug_mode(0)  # documented: the stop / non-finite check
            guard.off_on_error(after_step, check, step, epoch, loss_sum)
            guard.epoch_steps = check.steps
            torch.cuda.set_sync_debug_mode("error" if step < check.steps else 0)

        monkeypatch.setattr(Distiller, "forward", checked_forward)
        monkeypatch.setattr(StopCheck, "after_step", checked_after_step)

    @staticmethod
    def off_on_error(function, *args):
        try:
            return function(*args)
        except BaseException:
            torch.cuda.set_sync_debug_mode(0)  # the failure's own handling is not a training step
            raise


@pytest.fixture
def sync_guard(monkeypatch):
    guard = SyncGuard(monkeypatch)
    probe = torch.zeros(1, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    with pytest.raises(RuntimeError, match="synchroniz"):  # the mode does catch a sync on this build
        probe.item()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield guard
    finally:
        torch.cuda.set_sync_debug_mode(0)


KNOWN_SYNCS = {
    "crd": "CRD's bank memory syncs in the first epoch: SampleBank.reserve reads int(index.max()) until the "
           "bank holds every training sample (kdrun/losses/contrastive.py)",
}
# name: (overrides, fp16 instead of bf16)
SYNC_CASES = {
    "kd-bf16-teacher-cache": ((*JOB, "loss=kd", "perf.teacher_cache=true"), False),
    "kd-fp32-dataloader-pinned": ((*JOB, "loss=kd", "amp=false", "perf.device_data=false", "perf.teacher_cache=false"), False),
    "fitnet-fp16-grad-clip": ((*JOB, "loss=fitnet", "perf.teacher_cache=false", "grad_clip=1.0"), True),
    "kd-augmented-on-device": ((*AUGMENTED, "loss=kd"), False),
    "crd": ((*JOB, "loss=crd", "loss.crd.nce_k=256", "perf.teacher_cache=false"), False),
    "dkd": ((*JOB, "loss=dkd", "perf.teacher_cache=false"), False),
}


@pytest.mark.parametrize("case", [
    pytest.param(name, marks=pytest.mark.xfail(raises=RuntimeError, strict=True, reason=KNOWN_SYNCS[name]))
    if name in KNOWN_SYNCS else name for name in SYNC_CASES
])
def test_no_host_device_sync_inside_a_training_step(sync_guard, tmp_path, monkeypatch, case):
    overrides, fp16 = SYNC_CASES[case]
    if fp16:  # fp16 autocast with the grad scaler (fused optimizer: its inf check stays on the device)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    try:
        # cuDNN's autotuner (perf.cudnn_benchmark) times kernels once per new input shape, which may sync;
        # it is off here, so that every step, the first ones included, is checked.
        summary = run(make_cfg(*overrides, "device=cuda", "perf.cudnn_benchmark=false"), tmp_path)
    except RuntimeError as err:
        assert "synchroniz" in str(err), err  # a sync is the only failure this test lets through
        raise
    assert summary["status"] == "completed"
    assert sync_guard.epoch_steps > 1 and sync_guard.steps >= 2 * sync_guard.epoch_steps  # the student's 2 epochs
    if "perf.teacher_cache=true" in overrides:  # the cache lives in GPU memory and served the second epoch
        cached = sync_guard.distillers[-1].teacher_outputs
        assert isinstance(cached, CachedTeacher) and cached.cache.complete
        assert all(stored.device.type == "cuda" for stored in cached.cache.stored.values())


def test_torchrun_over_the_gpus_matches_one_process(tmp_path):
    """torchrun with one process per GPU (two at most, to stay short; one on a one-GPU machine, where
    kdrun runs a single process without a process group, since NCCL puts one rank on each GPU).
    MLPs: a model with BatchNorm normalises over each rank's share of the batch, so it would not
    train as one process with the global batch does."""
    processes = min(torch.cuda.device_count(), 2)
    # device=auto: each rank takes cuda:LOCAL_RANK
    overrides = plain(("dataset=digits", "teacher=mlp", "student=mlp_small", *SHORT), device="auto")
    run(make_cfg(*overrides), tmp_path / "one")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "kdrun",
         *overrides, f"hydra.run.dir={tmp_path / 'torchrun'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_DEBUG": "INFO"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "torchrun" / "kdrun.log").read_text()
    assert re.search(r"on digits \(cuda(:0)?\)", log)
    if processes > 1:
        assert f"Data parallel: {processes} processes" in log and "NCCL INFO" in result.stderr
    assert_same_training(tmp_path / "torchrun", tmp_path / "one", **FP32)


def test_auto_device_spreads_parallel_sweep_jobs_over_the_gpus(tmp_path):
    sweep = tmp_path / "sweep"
    result = kdrun_cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *JOB, "epochs=1",
                       "teacher_training.epochs=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(path for path in sweep.iterdir() if path.is_dir())
    assert len(jobs) == 2
    for job_num, job in enumerate(jobs):
        expected = auto_device(torch.cuda.device_count(), job_num)
        assert re.search(rf"on digits \({re.escape(expected)}(:0)?\)", (job / "kdrun.log").read_text()), (job, expected)
        assert read_summary(job)["status"] == "completed"
