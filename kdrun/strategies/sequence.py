"""Sequence-level KD (Kim & Rush, EMNLP 2016): the student learns from the teacher's own text.

The frozen teacher continues every training block's first ``prompt_tokens`` tokens to a full
block (greedy, Kim & Rush's beam of 1, or sampled at ``temperature``); the student then trains
on those blocks with the recipe (``loss=ce``: sequence-level KD alone; a token term adds
word-level KD on the teacher's text). The generations are cached like a provisioned model,
keyed by the teacher, the data and the generation settings, and reused across runs. The scratch
baseline trains on the original text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from filelock import FileLock
from torch.utils.data import ConcatDataset, TensorDataset

from kdrun.distiller import Distiller, check_recipe
from kdrun.engine import distributed
from kdrun.engine.checkpoint import load, save_atomic
from kdrun.errors import ConfigError
from kdrun.losses.recipe import recipe_from
from kdrun.models.language import generate
from kdrun.provision import dataset_identity, provision
from kdrun.strategies.base import Strategy, StrategyResult, TrainedModel, number_in
from kdrun.strategies.common import distill

log = logging.getLogger(__name__)

GENERATION_BATCH = 64


def check_causal(cfg, strategy: str) -> None:
    if str(cfg.task.get("_target_")) != "kdrun.tasks.language.CausalLM":
        raise ConfigError(f"strategy={strategy} generates text: it needs task=causal_lm (and causal LMs), "
                          f"got task {cfg.task.get('_target_')}")


def _identity(teacher: TrainedModel) -> list:
    path = Path(str(teacher.checkpoint)) if teacher.checkpoint is not None else None
    stat = path.stat() if path is not None and path.is_file() else None
    return [teacher.arch, str(path), stat.st_size if stat else None, stat.st_mtime_ns if stat else None]


def generations_entry(ctx, teacher: TrainedModel, settings: dict) -> Path:
    """The cache entry of a teacher's generations: teacher (its weights file), data, settings."""
    identity = {"teacher": _identity(teacher), "dataset": dataset_identity(ctx.cfg.dataset), "seed": int(ctx.cfg.seed),
                "settings": settings}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(os.path.expanduser(str(ctx.cfg.paths.cache))) / "generations" / f"{teacher.arch}_{ctx.data.name}_{key}"


def teacher_blocks(ctx, teacher: TrainedModel, settings: dict) -> torch.Tensor:
    """Every training block's prompt continued by the teacher: (N, block_size) token ids."""
    train = ctx.data.train_set
    ids = torch.stack([train[i][0] for i in range(len(train))])
    prompt = int(settings["prompt_tokens"])
    generator = torch.Generator(device=ctx.device).manual_seed(int(ctx.cfg.seed))
    parts = []
    for start in range(0, len(ids), GENERATION_BATCH):
        prompts = ids[start:start + GENERATION_BATCH, :prompt].to(ctx.device)
        parts.append(generate(teacher.model, prompts, ids.shape[1] - prompt, greedy=settings["greedy"],
                              temperature=float(settings["temperature"]), generator=generator).cpu())
    return torch.cat(parts)


def cached_generations(ctx, teacher: TrainedModel, settings: dict) -> torch.Tensor:
    entry = generations_entry(ctx, teacher, settings)
    path = entry / "blocks.pt"
    with FileLock(str(entry) + ".lock") if distributed.is_main() else nullcontext():
        if distributed.broadcast_object(path.exists()):
            log.info("sequence KD: reusing the teacher's cached generations (%s)", path)
            return load(path, "cached generations")["ids"]
        log.info("sequence KD: the teacher continues %d training blocks after %d prompt tokens (%s); caching in %s",
                 len(ctx.data.train_set), settings["prompt_tokens"],
                 "greedy" if settings["greedy"] else f"sampled at T={settings['temperature']:g}", entry)
        ids = teacher_blocks(ctx, teacher, settings)
        if distributed.is_main():
            save_atomic({"ids": ids, "settings": settings}, path)
        return ids


class SequenceKD(Strategy):
    name = "sequence"

    def check(self, cfg) -> None:
        check_causal(cfg, self.name)
        block = int(cfg.dataset.source.block_size)
        number_in(cfg, "prompt_tokens", 1, block - 1, kind=int, why=f" (it must leave room in a block of {block})")
        number_in(cfg, "temperature", 0, open_low=True)
        if not isinstance(cfg.strategy.get("greedy"), bool) or not isinstance(cfg.strategy.get("keep_original"), bool):
            raise ConfigError("strategy.greedy and strategy.keep_original must be true or false")

    def run(self, ctx) -> StrategyResult:
        cfg = ctx.cfg
        settings = {key: cfg.strategy[key] for key in ("prompt_tokens", "greedy", "temperature")}
        recipe = recipe_from(cfg)
        student = ctx.build_model(cfg.student)
        teacher_model = ctx.build_model(cfg.teacher)
        check_recipe(recipe, student, teacher_model)
        teacher = provision(ctx, "teacher", cfg.teacher, cfg.teacher_training, "teacher", model=teacher_model)
        ids = cached_generations(ctx, teacher, settings)
        generated = TensorDataset(ids, torch.zeros(len(ids), 0, dtype=torch.bool))
        train_set = ConcatDataset([ctx.data.train_set, generated]) if cfg.strategy.keep_original else generated
        data = ctx.data.with_train_set(train_set)
        distiller = Distiller(student, recipe, ctx.task, teacher.model if recipe.needs_teacher else None)
        trained = distill(ctx, "student", distiller, role="student", arch=str(cfg.student.arch),
                          ckpt_dir=ctx.run_dir / "checkpoints", data=data)
        details = {"sequence_kd": {**settings, "blocks": len(ids), "keep_original": bool(cfg.strategy.keep_original)}}
        return StrategyResult(student=trained, models={"teacher": teacher, "student": trained}, teacher=teacher,
                              recipe=recipe, details=details)
