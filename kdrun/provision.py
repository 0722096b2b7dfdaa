"""Provisioning of models trained on labels alone: teachers and scratch students.

A model comes from its config's ``checkpoint`` when one is given, from its ``path`` (a
pretrained model directory, used as given), else from the cache
when a model with the same architecture, dataset, seed, random stream and training config
was trained before, else it is trained now and cached. The cache is shared by all jobs (of
a sweep, or of later runs); a file lock makes two jobs that ask at once train it once.
Reading a cached model needs no write access; a cached file that cannot be read is moved
aside and the model trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch.nn as nn
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from kdrun.distiller import Distiller
from kdrun.engine import distributed
from kdrun.engine.checkpoint import cpu_state, save_atomic
from kdrun.engine.loop import FitSpec, evaluate
from kdrun.errors import CheckpointError, ConfigError
from kdrun.losses.recipe import CE_ONLY, build_recipe
from kdrun.models import count_params, factory_options
from kdrun.models.weights import load_weights
from kdrun.reporting.metrics import MetricsLog
from kdrun.strategies.base import TrainedModel

log = logging.getLogger(__name__)

# Bump when a change to kdrun makes earlier cached models differ from what it would train now.
CACHE_VERSION = 2
# Dataset keys that do not change what a model learns.
_DATASET_KEYS_IGNORED = ("num_workers", "eval_batch_size", "root", "download", "preprocess")
_SOURCE_KEYS_IGNORED = ("root", "cache_dir", "download")


def dataset_identity(dataset_cfg: DictConfig) -> dict[str, Any]:
    identity = OmegaConf.to_container(dataset_cfg, resolve=True)
    for key in _DATASET_KEYS_IGNORED:
        identity.pop(key, None)
    for key in _SOURCE_KEYS_IGNORED:
        identity["source"].pop(key, None)
    return identity


def cache_key(model_cfg: DictConfig, dataset_cfg: DictConfig, seed: int, training: DictConfig,
              variant: dict | None = None, stream: str = "teacher", task: str = "classification") -> str:
    identity = {
        "version": CACHE_VERSION,
        "model": factory_options(model_cfg),
        "dataset": dataset_identity(dataset_cfg),
        "task": task,
        "seed": seed,
        "stream": stream,
        "training": OmegaConf.to_container(training, resolve=True),
    }
    if variant:
        identity["data_variant"] = variant
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def stream_of(role: str) -> str:
    """Teachers train on the teacher stream; a student trained on labels alone (scratch, born-again's
    generation 0) on the student's, so it sees the distilled student's data order and augmentation."""
    return "teacher" if role == "teacher" else "student"


def provision(ctx, name: str, model_cfg: DictConfig, training: DictConfig, role: str, *, seed: int | None = None,
              data=None, variant: dict | None = None, model: nn.Module | None = None) -> TrainedModel:
    """A model trained on labels alone: from a checkpoint, the cache, or trained now and cached.

    ``seed`` (default ``cfg.seed``) tells apart several models of one arch (ensemble members);
    ``data`` and ``variant`` give training data that differs from the run's (e.g. its labelled
    share; ``variant`` describes it for the cache key). ``model`` is the freshly built model
    when the caller already built it (with the same ``seed``).
    """
    seed = int(ctx.cfg.seed) if seed is None else seed
    data = data or ctx.data
    model = ctx.build_model(model_cfg, seed) if model is None else model
    if model_cfg.get("checkpoint"):
        trained = from_checkpoint(ctx, name, model_cfg, role, model, data)
    elif model_cfg.get("path"):
        trained = pretrained(ctx, name, model_cfg, role, model, data)
    else:
        trained = from_cache(ctx, name, model_cfg, training, role, model, seed, data, variant)
    # A resumed run provides its models again; their row is already there.
    if not any(r.get("model") == name and r.get("epoch") == 0 and r.get("split") == "test" for r in ctx.metrics.rows()):
        ctx.metrics.write(epoch=0, model=name, split="test", **trained.test, source=trained.source)
    return trained


def from_checkpoint(ctx, name: str, model_cfg: DictConfig, role: str, model: nn.Module, data) -> TrainedModel:
    path = Path(os.path.expanduser(str(model_cfg.checkpoint))).resolve()
    load_weights(model, path, f"{role}.checkpoint", arch=str(model_cfg.arch))
    model.to(ctx.device)
    test = evaluate(model, data.test, ctx.task, ctx.device)
    log.info("%s: loaded from checkpoint %s (%s)", name, path, ctx.task.brief(test))
    return TrainedModel(name, role, str(model_cfg.arch), model, test, None, "checkpoint", path)


def pretrained(ctx, name: str, model_cfg: DictConfig, role: str, model: nn.Module, data) -> TrainedModel:
    """A model its factory loaded from a local directory (``path``): used as it is, not trained."""
    model.to(ctx.device)
    test = evaluate(model, data.test, ctx.task, ctx.device)
    log.info("%s: pretrained %s from %s, used as given (%s)", name, model_cfg.arch, model_cfg.path, ctx.task.brief(test))
    return TrainedModel(name, role, str(model_cfg.arch), model, test, None, "pretrained", Path(str(model_cfg.path)))


def _read_cached(ctx, name: str, model_cfg: DictConfig, role: str, model: nn.Module, final: Path) -> TrainedModel | None:
    """The cached model at ``final``; None when the file is unreadable (it is then moved aside)."""
    try:
        state = load_weights(model, final, f"cached {role}", arch=str(model_cfg.arch))
    except CheckpointError as err:
        aside = final.with_name(f"model.pt.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            final.replace(aside)
        except OSError as move_err:
            raise CheckpointError(
                f"{err}; it cannot be moved aside ({move_err}); delete it or set paths.cache to another directory"
            ) from err
        log.warning("%s: the cached %s could not be read (%s); moved it to %s and training it again", name,
                    model_cfg.arch, err, aside)
        return None
    model.to(ctx.device)
    log.info("%s: reusing cached %s trained earlier with the same config (%s, %s)", name, model_cfg.arch,
             final.parent, ctx.task.brief(state["test"]))
    return TrainedModel(name, role, str(model_cfg.arch), model, state["test"], state.get("best_val"), "cache", final)


def writable_entry(entry: Path) -> None:
    try:
        entry.mkdir(parents=True, exist_ok=True)
        probe = entry / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot write to the model cache at {entry} ({err.strerror or err}); make it writable, or set "
            "paths.cache=<a writable directory> (or the KDRUN_CACHE_DIR environment variable)"
        ) from err


def from_cache(ctx, name: str, model_cfg: DictConfig, training: DictConfig, role: str, model: nn.Module, seed: int,
               data, variant: dict | None) -> TrainedModel:
    stream = stream_of(role)
    key = cache_key(model_cfg, ctx.cfg.dataset, seed, training, variant, stream, ctx.task.name)
    entry = Path(os.path.expanduser(str(ctx.cfg.paths.cache))) / "models" / f"{model_cfg.arch}_{data.name}_{key}"
    final = entry / "model.pt"
    # Rank 0 decides and alone takes the lock and writes; the other ranks wait in its broadcasts,
    # then load the cached model or train it along with rank 0.
    main = distributed.is_main()
    if distributed.broadcast_object(final.exists()):
        cached = _read_cached(ctx, name, model_cfg, role, model, final)
        if distributed.broadcast_object(cached is not None):
            return cached
    if main:
        writable_entry(entry)
    with FileLock(str(entry) + ".lock") if main else nullcontext():
        if distributed.broadcast_object(final.exists()):  # another job trained it while we waited
            cached = _read_cached(ctx, name, model_cfg, role, model, final)
            if distributed.broadcast_object(cached is not None):
                return cached
        log.info("%s: no cached %s for this dataset/seed/training config; training it now (%d epochs) and caching it in %s",
                 name, model_cfg.arch, training.epochs, entry)
        meta = {"arch": str(model_cfg.arch),
                "config": {"model": factory_options(model_cfg), "training": OmegaConf.to_container(training, resolve=True)}}
        distiller = Distiller(model, build_recipe(CE_ONLY), ctx.task)
        result = ctx.fit(distiller, FitSpec.from_config(training), name, entry / "work", meta, data=data, stream=stream,
                         metrics=MetricsLog(entry / "metrics.jsonl"))
        test = evaluate(model, data.test, ctx.task, ctx.device)
        if main:
            save_atomic({"model": cpu_state(model), **meta, "test": test, "best_val": result.best_val,
                         "params": count_params(model)}, final)
        log.info("%s: trained %s, %s, cached as %s", name, model_cfg.arch, ctx.task.brief(test), final)
        return TrainedModel(name, role, str(model_cfg.arch), model, test, result.best_val, "trained", final)
