"""Provisioning of models trained on labels alone: teachers and scratch students.

A model comes from ``teacher.checkpoint`` when one is given, else from the cache
when a model with the same architecture, dataset, seed and training config was
trained before, else it is trained now and cached. The cache is shared by all
jobs (of a sweep, or of later runs); a file lock makes two jobs that ask at once
train it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from kdrun.distill import DistillTask
from kdrun.engine import checkpoint, distributed
from kdrun.engine.loop import FitSpec, evaluate, fit
from kdrun.losses.recipe import CE_ONLY, build_recipe
from kdrun.models import count_params, factory_options
from kdrun.reporting.metrics import MetricsLog

log = logging.getLogger(__name__)

# Bump when a change to kdrun makes earlier cached models differ from what it would train now.
CACHE_VERSION = 1
# Dataset keys that do not change what a model learns.
_DATASET_KEYS_IGNORED = ("num_workers", "eval_batch_size", "root", "download")
_SOURCE_KEYS_IGNORED = ("root", "cache_dir", "download")


@dataclass
class Provisioned:
    model: nn.Module
    source: str  # "checkpoint" | "cache" | "trained"
    test_acc: float
    best_val_acc: float | None
    path: Path


def dataset_identity(dataset_cfg: DictConfig) -> dict[str, Any]:
    identity = OmegaConf.to_container(dataset_cfg, resolve=True)
    for key in _DATASET_KEYS_IGNORED:
        identity.pop(key, None)
    for key in _SOURCE_KEYS_IGNORED:
        identity["source"].pop(key, None)
    return identity


def cache_key(
    model_cfg: DictConfig, dataset_cfg: DictConfig, seed: int, training: DictConfig, data_variant: dict | None = None
) -> str:
    identity = {
        "version": CACHE_VERSION,
        "model": factory_options(model_cfg),
        "dataset": dataset_identity(dataset_cfg),
        "seed": seed,
        "training": OmegaConf.to_container(training, resolve=True),
    }
    if data_variant:
        identity["data_variant"] = data_variant
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def fit_spec(training: DictConfig) -> FitSpec:
    from hydra.utils import instantiate

    return FitSpec(
        epochs=int(training.epochs),
        optimizer=instantiate(training.optim),
        scheduler=instantiate(training.sched),
        grad_clip=training.get("grad_clip"),
    )


def provision(
    role: str, model: nn.Module, model_cfg: DictConfig, training: DictConfig, ctx,
    seed: int | None = None, data_variant: dict | None = None,
) -> Provisioned:
    """Give ``model`` (freshly built, seeded) trained weights and report where they came from.

    ``seed`` (default ``cfg.seed``) tells apart several models of one arch (ensemble
    members); ``data_variant`` describes training data that differs from the
    configured dataset (e.g. its labelled share) and so belongs in the cache key.
    """
    seed = int(ctx.cfg.seed) if seed is None else seed
    given = model_cfg.get("checkpoint")
    if given:
        path = Path(os.path.expanduser(str(given))).resolve()
        checkpoint.load_weights(model, path, f"{role}.checkpoint")
        model.to(ctx.device)
        test_acc, _ = evaluate(model, ctx.data.test, ctx.device)
        log.info("%s: loaded from checkpoint %s (test acc %.2f%%)", role, path, test_acc)
        return Provisioned(model, "checkpoint", test_acc, None, path)

    key = cache_key(model_cfg, ctx.cfg.dataset, seed, training, data_variant)
    entry = Path(os.path.expanduser(str(ctx.cfg.paths.cache))) / "models" / f"{model_cfg.arch}_{ctx.data.name}_{key}"
    final = entry / "model.pt"
    # Under DDP rank 0 alone takes the lock and writes; the other ranks wait in its broadcast
    # of "cached or not", then load the cached model or train it along with rank 0.
    main = distributed.is_main()
    if main:
        entry.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock") if main else nullcontext():
        if distributed.broadcast_object(final.exists()):
            state = checkpoint.load_weights(model, final, f"cached {role}")
            log.info(
                "%s: reusing cached %s trained earlier with the same config (%s, test acc %.2f%%)",
                role, model_cfg.arch, entry, state["test_acc"],
            )
            return Provisioned(model, "cache", state["test_acc"], state["best_val_acc"], final)

        log.info(
            "%s: no cached %s for this dataset/seed/training config; training it now (%d epochs) and caching it in %s",
            role, model_cfg.arch, training.epochs, entry,
        )
        meta = {"arch": str(model_cfg.arch), "config": {"model": factory_options(model_cfg), "training": OmegaConf.to_container(training, resolve=True)}}
        task = DistillTask(model, build_recipe(CE_ONLY))
        result = fit(
            task, ctx.data, fit_spec(training), label=role, ckpt_dir=entry / "work",
            metrics=MetricsLog(entry / "metrics.jsonl"), device=ctx.device, seed=seed,
            amp=bool(ctx.cfg.amp), meta=meta, perf=getattr(ctx, "perf", None),
        )
        test_acc, _ = evaluate(model, ctx.data.test, ctx.device)
        if main:
            checkpoint.save_atomic(
                {"model": {k: v.cpu() for k, v in model.state_dict().items()}, **meta, "test_acc": test_acc,
                 "best_val_acc": result.best_val_acc, "params": count_params(model)},
                final,
            )
        log.info("%s: trained %s, test acc %.2f%%, cached as %s", role, model_cfg.arch, test_acc, final)
        return Provisioned(model, "trained", test_acc, result.best_val_acc, final)
