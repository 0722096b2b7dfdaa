"""Offline KD: a frozen, provisioned teacher distilled into a student."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import OmegaConf

from kdrun.distill import DistillTask, check_recipe
from kdrun.losses import build_recipe
from kdrun.teachers import fit_spec
from kdrun.strategies.common import (
    finish_model,
    knob_schedule,
    prepare,
    provide,
    scratch_baseline,
    scratch_section,
    student_section,
    student_training,
    teacher_section,
)

log = logging.getLogger(__name__)


class Offline:
    name = "offline"

    def run(self, ctx) -> dict[str, Any]:
        cfg = ctx.cfg
        recipe = build_recipe(cfg.loss)
        log.info("Recipe: %s", recipe)
        student = ctx.build_model(cfg.student)
        teacher = None
        if recipe.needs_teacher:
            teacher_model = ctx.build_model(cfg.teacher)
            # Fail fast on bad taps, before any teacher training.
            check_recipe(recipe, student, teacher_model)
            teacher = provide(ctx, "teacher", cfg.teacher, cfg.teacher_training, "teacher", model=teacher_model)

        if recipe.needs_index:
            ctx.data = ctx.data.indexed()
        task = DistillTask(student, recipe, teacher.model if teacher else None, knobs=knob_schedule(ctx, recipe))
        prepare(ctx, task)
        meta = {"arch": str(cfg.student.arch), "config": OmegaConf.to_container(cfg, resolve=True)}
        ckpt_dir = ctx.run_dir / "checkpoints"
        result = ctx.fit(task, fit_spec(student_training(cfg)), "student", ckpt_dir, meta)
        trained = finish_model(ctx, "student", student, "student", str(cfg.student.arch), result.epochs,
                               result.best_val_acc, ckpt_dir, meta)

        last_train = [r for r in ctx.metrics.rows() if r["model"] == "student" and r["split"] == "train"][-1:]
        scratch = scratch_baseline(ctx)
        models = {"teacher": teacher, "student": trained, "scratch": scratch}
        return {
            "recipe": str(recipe),
            "recipe_weights": dict(recipe.weights),
            "loss_parts": {k: v for row in last_train for k, v in row.items() if k.startswith("loss/")},
            "teacher": teacher_section(teacher),
            "student": student_section(trained),
            "scratch": scratch_section(scratch),
            "models": {label: m.entry for label, m in models.items() if m is not None},
            "_models": {"student": student, "teacher": teacher.model if teacher else None},
        }

