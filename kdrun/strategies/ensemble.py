"""Distillation from an ensemble of teachers: each teacher is provisioned (and cached) like a
single one, and the target is the (optionally weighted) mean of their softened outputs."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import OmegaConf

from kdrun.distill import DistillTask, check_recipe
from kdrun.errors import ConfigError
from kdrun.losses import build_recipe
from kdrun.models.ensemble import Ensemble
from kdrun.strategies.common import (
    entry,
    finish_model,
    knob_schedule,
    prepare,
    provide,
    scratch_baseline,
    scratch_section,
    student_section,
    student_training,
)
from kdrun.engine.loop import evaluate
from kdrun.teachers import fit_spec

log = logging.getLogger(__name__)


class TeacherEnsemble:
    name = "ensemble"

    def run(self, ctx) -> dict[str, Any]:
        cfg, strategy = ctx.cfg, ctx.cfg.strategy
        members = [OmegaConf.create(c) if not OmegaConf.is_config(c) else c for c in (strategy.teachers or [])]
        if len(members) < 2:
            raise ConfigError(f"strategy.teachers lists {len(members)} teacher(s); an ensemble needs at least 2")
        weights = list(strategy.weights) if strategy.get("weights") is not None else None
        if weights is not None and (len(weights) != len(members) or any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ConfigError(f"strategy.weights={weights} must list {len(members)} non-negative numbers, not all 0")
        recipe = build_recipe(cfg.loss)
        if not recipe.needs_teacher:
            raise ConfigError(f"strategy=ensemble needs a recipe with a distillation term (e.g. loss=kd); got {recipe}")
        student = ctx.build_model(cfg.student)
        # Member i is seeded with seed + i - 1: copies of one arch differ, and member 1 is the
        # teacher that offline KD with the same seed uses (the cache serves both).
        seeds = [int(cfg.seed) + i for i in range(len(members))]
        built = [ctx.build_model(member, seed) for member, seed in zip(members, seeds)]
        check_recipe(recipe, student, Ensemble(built))
        teachers = [provide(ctx, f"teacher{i}", member, cfg.teacher_training, "teacher", seed=seed, model=model)
                    for i, (member, seed, model) in enumerate(zip(members, seeds, built), start=1)]
        ensemble = Ensemble([t.model for t in teachers], weights, T=float(cfg.T)).to(ctx.device)
        arch = "ensemble(" + ",".join(t.entry["arch"] for t in teachers) + ")"
        ensemble.T = 1.0
        ensemble_acc, _ = evaluate(ensemble, ctx.data.test, ctx.device)
        ctx.metrics.write(epoch=0, model="teacher_ensemble", split="test", acc=ensemble_acc)
        log.info("Teacher ensemble %s: test acc %.2f%% (members %s)", arch, ensemble_acc,
                 ", ".join(f"{t.test_acc:.2f}%" for t in teachers))

        def follow_T(values: dict[str, float]) -> None:
            ensemble.T = values.get("T", float(cfg.T))

        if recipe.needs_index:
            ctx.data = ctx.data.indexed()
        task = prepare(ctx, DistillTask(student, recipe, ensemble, knobs=knob_schedule(ctx, recipe, also=[follow_T])))
        ensemble.T = float(cfg.T)
        ckpt_dir = ctx.run_dir / "checkpoints"
        meta = {"arch": str(cfg.student.arch), "config": OmegaConf.to_container(cfg, resolve=True)}
        result = ctx.fit(task, fit_spec(student_training(cfg)), "student", ckpt_dir, meta)
        trained = finish_model(ctx, "student", student, "student", str(cfg.student.arch), result.epochs,
                               result.best_val_acc, ckpt_dir, meta)
        scratch = scratch_baseline(ctx)
        teacher_entry = {**entry("teacher", arch, ensemble, ensemble_acc, None, None, "ensemble"),
                         "members": [t.label for t in teachers], "weights": ensemble.weights.tolist()}
        models = {**{t.label: t.entry for t in teachers}, "teacher_ensemble": teacher_entry, "student": trained.entry}
        if scratch is not None:
            models["scratch"] = scratch.entry
        return {
            "recipe": str(recipe),
            "recipe_weights": dict(recipe.weights),
            "teacher": {"arch": arch, "params": teacher_entry["params"], "test_acc": ensemble_acc, "source": "ensemble",
                        "path": None, "members": [t.entry for t in teachers], "weights": ensemble.weights.tolist()},
            "student": student_section(trained),
            "scratch": scratch_section(scratch),
            "models": models,
            "_models": {"student": student, "teacher": ensemble},
        }
