"""Speed and memory of kdrun's training step, as ratios measured in one run.

For one teacher, student and dataset (kdrun overrides on the command line):

(a) KD overhead: a kdrun KD training step / (a student CE training step + a teacher forward),
    the floor of distillation (goal <= 1.05);
(b) kdrun training throughput / that of a minimal hand-written PyTorch KD loop on the same
    models, loss and batches, its batches already on the device (goal >= 0.95);
(c) samples/s and peak memory (building the data and models plus a one-epoch warm-up fit)
    with each fast-path switch (``perf.*``) on and off;
(d) end-to-end wall time of the default job (``kdrun`` in a subprocess), warm and cold cache;
(e) with ``--peers``: kdrun training throughput / that of torchdistill's own training path on the
    same models, loss, optimizer and batches (see ``bench_peers.py``; ``pip install -e '.[peers]'``).

kdrun's step is timed through ``kdrun.engine.loop.fit`` itself (whole epochs, a one-batch
validation set so evaluation is negligible); the hand-written loops run over the batches
kdrun's own loader yields, held on the device. Every figure is a median over repeats after
a warm-up, the repeats of the compared variants taken in turns (so load drifts hit all
alike); CUDA is synchronised around each timing.

Usage: ``python scripts/bench.py [--preset cifar|lm] [--quick] [--peers] [kdrun overrides ...]``
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from itertools import count
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

import bench_peers
from kdrun import teacher_cache
from kdrun.config import register_resolvers
from kdrun.data import build as build_data
from kdrun.data.device import place
from kdrun.distiller import Distiller
from kdrun.engine import perf as fast_paths
from kdrun.engine.loop import FitRun, FitSpec, Placement, amp_dtype, autocast, fit
from kdrun.engine.perf import free_bytes
from kdrun.losses.logits import soft_target_kl
from kdrun.losses.recipe import recipe_from
from kdrun.models import build as build_model
from kdrun.reporting.metrics import MetricsLog
from kdrun.strategies.common import student_training

# The step figures compare kdrun with a hand-written loop and torchdistill, which run Hinton's KD,
# so every preset times KD; the end-to-end figures run the job as a user does (JOBS).
PRESETS = {
    "default": ["loss=kd"],  # the default job's pair, cnn -> mlp_small on MNIST-1D, with Hinton's KD
    "cifar": [
        "teacher=resnet32x4", "student=resnet8x4", "dataset=fake", "dataset.source.num_classes=100",
        "dataset.source.image_size=32", "dataset.source.channels=3", "optim=sgd", "loss=kd",
    ],
    "lm": ["experiment=lm_tiny"],  # GPT-2 4x128 -> 2x64 on the embedded corpus, token-level KD
}
JOBS = {"default": [], "lm": PRESETS["lm"]}  # `kdrun` (the default job, loss=kd_fitnet); lm_tiny
SWITCHES = ("device_data", "teacher_cache", "fused_optimizer", "channels_last", "cudnn_benchmark", "pin_memory", "compile")
CUDA_ONLY = ("channels_last", "cudnn_benchmark", "pin_memory")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import open_dict

    register_resolvers()
    with initialize_config_dir(config_dir=str(importlib.resources.files("kdrun.conf")), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a block above its start: CUDA allocator peak, or sampled RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.top = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.top = max(self.top, self.rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.top, self.rss()) - self.base


class Setup:
    """Data, models and recipe of one configuration (perf switches included), built fresh."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.perf = fast_paths.resolve(cfg, device)
        data = build_data(cfg.dataset, seed=int(cfg.seed), pin_memory=self.perf.pin_memory,
                          persistent_workers=self.perf.persistent_workers)
        data = place(data, self.perf)
        self.task = instantiate(cfg.task)
        self.task.prepare(data)
        # One validation batch: fit's per-epoch evaluation then costs next to nothing.
        self.data = replace(data, val=[next(iter(data.val))])
        torch.manual_seed(int(cfg.seed))
        self.teacher = build_model(cfg.teacher, data.num_classes, data.input_shape).to(device).eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        torch.manual_seed(int(cfg.seed))
        self.student = build_model(cfg.student, data.num_classes, data.input_shape).to(device)
        self.spec = FitSpec.from_config(student_training(cfg))
        self.dtype = amp_dtype(device, bool(cfg.amp))

    def batches(self) -> list:
        """One epoch of kdrun's training batches, on the device, in the memory format kdrun gives them."""
        loader = self.data.train
        if loader.generator is not None:
            loader.generator.manual_seed(0)
        layout = self.perf.memory_format([self.student, self.teacher], self.data.input_shape)
        return [Placement(self.task, self.device, layout)(b) for b in loader]

    def optimizer(self, params):
        return self.spec.optimizer(params=params, **self.perf.optimizer_kwargs(self.spec.optimizer))


def kdrun_runner(setup: Setup, epochs: int, workdir: Path) -> Callable[[], float]:
    """One timed repeat of ``fit`` (the config's recipe, ``epochs`` epochs): seconds per step.
    Making it builds the distiller and runs a one-epoch warm-up fit. Each repeat starts with an
    empty teacher-output cache (where it applies), as a run does."""
    task = setup.task
    distiller = Distiller(setup.student, recipe_from(setup.cfg), task, setup.teacher)
    distiller.to(setup.device)
    distiller.setup(Placement(task, setup.device)(next(iter(setup.data.train))))
    plain_teacher = distiller.teacher_outputs
    steps, runs = len(setup.data.train), count()

    def run(n_epochs: int = epochs) -> float:
        spec = replace(setup.spec, epochs=n_epochs)
        distiller.teacher_outputs = plain_teacher
        data = teacher_cache.install(distiller, setup.data, setup.perf.teacher_cache_setting, free_bytes(setup.device), "bench")
        fit_run = FitRun(name="student", ckpt_dir=workdir / f"run{next(runs)}", metrics=MetricsLog(None), device=setup.device,
                         seed=int(setup.cfg.seed), amp=bool(setup.cfg.amp), perf=setup.perf)
        sync(setup.device)
        start = time.perf_counter()
        fit(distiller, data, spec, fit_run)
        sync(setup.device)
        return (time.perf_counter() - start) / (n_epochs * steps)

    run(1)
    return run


def hand_runners(setup: Setup, epochs: int) -> dict[str, Callable[[], float]]:
    """Minimal hand-written loops over kdrun's batches held on the device, one timed repeat each
    (seconds per step): student on CE, teacher forward alone, student + teacher on KD."""
    batches = setup.batches()
    device, dtype = setup.device, setup.dtype
    T, alpha = float(setup.cfg.T), float(setup.cfg.alpha)
    student, teacher, task = setup.student, setup.teacher, setup.task
    optimizer = setup.optimizer([p for p in student.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def scored(model, batch):
        return task.scored(task.forward(model, batch), batch)

    def ce_step(batch):
        with autocast(device, dtype):
            logits, labels = scored(student, batch)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def teacher_forward(batch):
        with torch.no_grad(), autocast(device, dtype):
            task.forward(teacher, batch)

    def kd_step(batch):
        with autocast(device, dtype):
            with torch.no_grad():
                teacher_logits, _ = scored(teacher, batch)
            logits, labels = scored(student, batch)
            loss = (1 - alpha) * F.cross_entropy(logits, labels) + alpha * soft_target_kl(logits, teacher_logits, T)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return {name: timed(step, batches, device, epochs, before=student.train)
            for name, step in (("student_ce_step_s", ce_step), ("teacher_forward_s", teacher_forward),
                               ("hand_kd_step_s", kd_step))}


def timed(step, batches, device: torch.device, epochs: int, before: Callable[[], object]) -> Callable[[], float]:
    """One timed repeat of ``step(batch)`` over ``batches`` for ``epochs`` epochs, after ``before()``:
    seconds per step. Making it runs one warm-up step."""

    def run() -> float:
        before()
        sync(device)
        start = time.perf_counter()
        for _ in range(epochs):
            for batch in batches:
                step(batch)
        sync(device)
        return (time.perf_counter() - start) / (epochs * len(batches))

    step(batches[0])
    return run


def interleaved(runners: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of each runner's repeats, taken in turns, so drifts in machine load hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(run())
    return {name: statistics.median(values) for name, values in times.items()}


def prepared(overrides: list[str], device: torch.device, epochs: int, workdir: Path) -> tuple[Setup, Callable, float]:
    """A configuration built and warmed up, with the peak memory that took (data, models, one epoch)."""
    with PeakMemory(device) as memory:
        setup = Setup(compose(overrides), device)
        run = kdrun_runner(setup, epochs, workdir)
    return setup, run, memory.peak


def end_to_end(quick: bool, preset: str = "default") -> dict[str, float]:
    """Wall time of the preset's job as a user runs it (``kdrun``), cold cache then warm cache."""
    shorter = ["dataset.source.num_samples=1000"] if preset == "default" else ["dataset.source.max_chars=100000"]
    overrides = [*JOBS[preset], *(["epochs=2", "teacher_training.epochs=2", *shorter] if quick else [])]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "KDRUN_CACHE_DIR": str(Path(tmp) / "cache"), "PYTHONUNBUFFERED": "1"}

        def job(name: str, extra: list[str] = ()) -> float:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "kdrun", f"hydra.run.dir={tmp}/{name}", *overrides, *extra],
                           check=True, capture_output=True, env=env)
            return time.perf_counter() - start

        cold = job("cold")
        warm = job("warm")
        plain = job("plain", ["perf.device_data=false", "perf.teacher_cache=false", "perf.fused_optimizer=false"])
    return {"e2e_cold_s": cold, "e2e_warm_s": warm, "e2e_warm_fast_paths_off_s": plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="kdrun overrides, e.g. teacher=resnet20 student=resnet8")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--quick", action="store_true", help="a sub-minute smoke run (few steps, no compile)")
    parser.add_argument("--epochs", type=int, help="epochs per timed repeat")
    parser.add_argument("--repeats", type=int, help="timed repeats (median)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end kdrun runs")
    parser.add_argument("--peers", action="store_true", help="also time torchdistill's KD step (pip install -e '.[peers]')")
    parser.add_argument("--switches", nargs="+", choices=SWITCHES,
                        help="switches to time on and off (default: each one that acts on this device; --quick leaves "
                             "out compile)")
    parser.add_argument("--out", default="outputs/bench/bench.json")
    parser.add_argument("--write", nargs=2, metavar=("PAGE", "BLOCK"),
                        help="also put the table between the page's <!-- table:BLOCK --> markers, under the command")
    args = parser.parse_args()
    if args.peers and bench_peers.unavailable():
        parser.exit(2, f"bench: error: {bench_peers.unavailable()}\n")

    from kdrun.config import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    overrides = list(PRESETS[args.preset])
    if args.preset == "cifar" and not cuda:
        # A CPU step of resnet32x4 -> resnet8x4 takes seconds: a few small batches.
        overrides += ["dataset.source.num_train=192", "dataset.source.num_test=64", "dataset.batch_size=32"]
    elif args.preset == "cifar":
        overrides += ["dataset.source.num_train=8192", "dataset.source.num_test=512", "dataset.batch_size=128"]
    if args.quick:
        overrides += {"default": ["dataset.source.num_samples=1000"], "lm": ["dataset.source.max_chars=100000"]}.get(args.preset, [])
    overrides += [f"device={device}", *args.overrides]
    epochs = args.epochs or (1 if args.quick else 3)
    repeats = args.repeats or (1 if args.quick else 3)
    switches = [s for s in SWITCHES if cuda or s not in CUDA_ONLY]
    if args.quick:
        switches = [s for s in switches if s != "compile"]
    switches = args.switches or switches

    results: dict = {
        "preset": args.preset, "overrides": overrides, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "epochs": epochs, "repeats": repeats,
    }
    knobs = compose(overrides)
    results.update(T=float(knobs.T), alpha=float(knobs.alpha))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup, kdrun_default, _ = prepared(overrides, device, epochs, work / "defaults")
        _, kdrun_no_cache, _ = prepared([*overrides, "perf.teacher_cache=false"], device, epochs, work / "no_cache")
        results["perf"] = setup.perf.notes
        results["steps_per_epoch"] = len(setup.data.train)
        results["batch_size"] = int(setup.cfg.dataset.batch_size)
        peers = bench_peers.runners(setup, epochs, timed) if args.peers else {}
        results.update(interleaved(
            {"kdrun_step_s": kdrun_default, "kdrun_step_s_no_cache": kdrun_no_cache, **hand_runners(setup, epochs), **peers},
            repeats,
        ))
        floor = results["student_ce_step_s"] + results["teacher_forward_s"]
        results["kd_overhead_ratio"] = results["kdrun_step_s"] / floor
        results["kd_overhead_ratio_no_cache"] = results["kdrun_step_s_no_cache"] / floor
        results["throughput_vs_hand_loop"] = results["hand_kd_step_s"] / results["kdrun_step_s"]
        results["throughput_vs_hand_loop_no_cache"] = results["hand_kd_step_s"] / results["kdrun_step_s_no_cache"]
        if args.peers:
            results.update(bench_peers.ratios(results))

        batch = results["batch_size"]
        results["switches"] = {}
        for switch in switches:
            row, runners = {}, {}
            for value in (True, False):
                state = "on" if value else "off"
                try:
                    _, runners[state], peak = prepared([*overrides, f"perf.{switch}={str(value).lower()}"], device,
                                                       epochs, work / f"{switch}_{state}")
                    row[state] = {"peak_mem_mb": peak / 2**20}
                except Exception as err:  # e.g. compile without a toolchain: reported, not fatal
                    row[state] = {"error": " ".join(str(err).split())[:200]}
            for state, step in interleaved(runners, repeats).items():
                row[state]["samples_per_s"] = batch / step
            results["switches"][switch] = row
            print(f"  {switch}: {row}", file=sys.stderr, flush=True)
    if args.preset in ("default", "lm") and not args.no_e2e:
        results.update(end_to_end(args.quick, args.preset))
    if setup.task.unit == "tokens":
        predicted = int(setup.cfg.dataset.batch_size) * (int(setup.cfg.dataset.source.block_size) - 1)
        results["kdrun_tokens_per_s"] = predicted / results["kdrun_step_s"]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(table(results))
    print(f"\nwritten to {out}")
    if args.write:
        from docs_tables import provenance, write_block

        write_block(Path(args.write[0]), args.write[1], f"{provenance()}\n\n{table(results)}")


def table(r: dict) -> str:
    ms = lambda s: f"{1000 * s:.3f} ms"  # noqa: E731
    lines = [
        f"kdrun bench, preset {r['preset']} on {r['device']} ({r['device_name']}, torch {r['torch']}, "
        f"{r['threads']} threads), batch {r['batch_size']}, {r['steps_per_epoch']} steps/epoch, "
        f"median of {r['repeats']} x {r['epochs']} epochs; the steps run Hinton's KD (T={r.get('T', 0):g}, "
        f"alpha {r.get('alpha', 0):g}) in every loop, the end-to-end rows the job as `kdrun` runs it",
        "",
        "| figure | value | goal |",
        "|---|---|---|",
        f"| student CE step + teacher forward (floor) | {ms(r['student_ce_step_s'])} + {ms(r['teacher_forward_s'])} | |",
        f"| kdrun KD step, defaults (teacher cache {r['perf'].get('teacher_cache', '?')}) | {ms(r['kdrun_step_s'])} | |",
        f"| kdrun KD step, teacher cache off | {ms(r['kdrun_step_s_no_cache'])} | |",
        f"| hand-written KD step | {ms(r['hand_kd_step_s'])} | |",
        *([f"| kdrun KD training, tokens/s | {r['kdrun_tokens_per_s']:,.0f} | |"] if "kdrun_tokens_per_s" in r else []),
        f"| (a) KD overhead ratio, defaults | {r['kd_overhead_ratio']:.3f} | <= 1.05 |",
        f"| (a) KD overhead ratio, teacher cache off | {r['kd_overhead_ratio_no_cache']:.3f} | <= 1.05 |",
        f"| (b) throughput / hand-written loop, defaults | {r['throughput_vs_hand_loop']:.3f} | >= 0.95 |",
        f"| (b) throughput / hand-written loop, teacher cache off (like for like) | {r['throughput_vs_hand_loop_no_cache']:.3f} | >= 0.95 |",
    ]
    if "torchdistill_kd_step_s" in r:
        lines += bench_peers.rows(r)
    if "e2e_warm_s" in r:
        lines += [
            f"| (d) default job end to end, warm cache | {r['e2e_warm_s']:.1f} s | |",
            f"| (d) default job end to end, warm cache, fast paths off | {r['e2e_warm_fast_paths_off_s']:.1f} s | |",
            f"| (d) default job end to end, cold cache (teacher and scratch trained) | {r['e2e_cold_s']:.1f} s | |",
        ]
    lines += ["", "(c) each switch on / off (others at their defaults)", "",
              "| switch | on: samples/s | off: samples/s | on/off | on: peak MiB | off: peak MiB |", "|---|---|---|---|---|---|"]
    for switch, row in r["switches"].items():
        on, off = row.get("on", {}), row.get("off", {})
        if "error" in on or "error" in off:
            lines.append(f"| {switch} | {on.get('error', '')} | {off.get('error', '')} | | | |")
            continue
        lines.append(
            f"| {switch} | {on['samples_per_s']:,.0f} | {off['samples_per_s']:,.0f} | "
            f"{on['samples_per_s'] / off['samples_per_s']:.2f}x | {on['peak_mem_mb']:.1f} | {off['peak_mem_mb']:.1f} |"
        )
    lines.append("")
    lines.append("resolved switches (defaults): " + ", ".join(f"{k} {v}" for k, v in r["perf"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
