"""Offline KD: a frozen, provisioned teacher distilled into a student."""

from __future__ import annotations

from kdrun.distiller import Distiller, check_recipe
from kdrun.losses.recipe import recipe_from
from kdrun.provision import provision
from kdrun.strategies.base import Strategy, StrategyResult
from kdrun.strategies.common import distill, start_from_teacher


class Offline(Strategy):
    name = "offline"

    def run(self, ctx) -> StrategyResult:
        cfg = ctx.cfg
        recipe = recipe_from(cfg)
        student = ctx.build_model(cfg.student)
        teacher = None
        if recipe.needs_teacher:
            teacher_model = ctx.build_model(cfg.teacher)
            check_recipe(recipe, student, teacher_model)  # bad taps fail here, before a teacher trains
            teacher = provision(ctx, "teacher", cfg.teacher, cfg.teacher_training, "teacher", model=teacher_model)
        if cfg.student.get("init", "random") == "teacher":
            start_from_teacher(student, teacher)
        distiller = Distiller(student, recipe, ctx.task, teacher.model if teacher else None)
        trained = distill(ctx, "student", distiller, role="student", arch=str(cfg.student.arch),
                          ckpt_dir=ctx.run_dir / "checkpoints")
        models = {m.name: m for m in (teacher, trained) if m is not None}
        return StrategyResult(student=trained, models=models, teacher=teacher, recipe=recipe)
