"""Progressive distillation: a teacher-assistant chain (Mirzadeh et al., AAAI 2020) for a large
capacity gap, teacher -> TA_1 -> ... -> student, each stage distilled from the one before.
``T``/``alpha`` schedules (``schedule.*.per=stage``) can change the knobs from stage to stage."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import OmegaConf

from kdrun.distill import check_recipe
from kdrun.errors import ConfigError
from kdrun.losses import build_recipe
from kdrun.strategies.common import (
    distill_stage,
    export_student,
    provide,
    scratch_baseline,
    scratch_section,
    student_section,
    teacher_section,
)

log = logging.getLogger(__name__)


class Progressive:
    name = "progressive"

    def run(self, ctx) -> dict[str, Any]:
        cfg = ctx.cfg
        assistants = [OmegaConf.create(c) if not OmegaConf.is_config(c) else c for c in (cfg.strategy.chain or [])]
        recipe = build_recipe(cfg.loss)
        if not recipe.needs_teacher:
            raise ConfigError(f"strategy=progressive needs a recipe with a distillation term (e.g. loss=kd); got {recipe}")
        chain = [*assistants, cfg.student]
        labels = [f"ta{i}" for i in range(1, len(assistants) + 1)] + ["student"]
        # Every pair of neighbours must fit the recipe's taps before anything trains.
        built = [ctx.build_model(cfg.teacher)] + [ctx.build_model(c) for c in chain]
        for upper, lower in zip(built, built[1:]):
            check_recipe(recipe, lower, upper)
        log.info("Progressive chain: %s", " -> ".join([str(cfg.teacher.arch)] + [str(c.arch) for c in chain]))

        teacher = provide(ctx, "teacher", cfg.teacher, cfg.teacher_training, "teacher")
        previous, trained = teacher, []
        for stage, (label, model_cfg) in enumerate(zip(labels, chain)):
            title = f"stage {stage + 1}/{len(chain)} ({label}: {model_cfg.arch} <- {previous.entry['arch']})"
            previous = distill_stage(ctx, label, title, model_cfg, previous.model, "assistant" if label != "student" else "student",
                                     stage=stage, stages=len(chain))
            trained.append(previous)

        student = trained[-1]
        export_student(ctx, student)
        scratch = scratch_baseline(ctx)
        models = {"teacher": teacher.entry, **{t.label: t.entry for t in trained}}
        if scratch is not None:
            models["scratch"] = scratch.entry
        return {
            "recipe": str(recipe),
            "recipe_weights": dict(recipe.weights),
            "teacher": teacher_section(teacher),
            "student": student_section(student),
            "scratch": scratch_section(scratch),
            "chain": [{"model": t.label, "arch": t.entry["arch"], "test_acc": t.test_acc} for t in [teacher, *trained]],
            "models": models,
            "_models": {"student": student.model, "teacher": teacher.model},
        }
