"""Born-again networks (Furlanello et al., ICML 2018): generation k, a fresh model of the
student's architecture, learns from generation k-1; generation 0 is the student trained on
labels (or the configured teacher). Reports every generation and their ensemble."""

from __future__ import annotations

import logging

from kdrun.distiller import Distiller, check_recipe
from kdrun.errors import ConfigError
from kdrun.losses.recipe import recipe_from
from kdrun.models.ensemble import Ensemble
from kdrun.provision import provision
from kdrun.strategies.base import Strategy, StrategyResult, number_in
from kdrun.strategies.common import best_of, distill, export_student, finish, student_training

log = logging.getLogger(__name__)


class BornAgain(Strategy):
    name = "born_again"
    needs_distillation = True

    def check(self, cfg) -> None:
        number_in(cfg, "generations", 1, kind=int)
        if cfg.strategy.get("gen0") not in ("student", "teacher"):
            raise ConfigError(f"strategy.gen0={cfg.strategy.get('gen0')!r} must be student (the student trained on labels) or teacher")

    def run(self, ctx) -> StrategyResult:
        cfg, strategy = ctx.cfg, ctx.cfg.strategy
        generations = int(strategy.generations)
        gen0_cfg = cfg.student if strategy.gen0 == "student" else cfg.teacher
        gen0_model = ctx.build_model(gen0_cfg)
        check_recipe(recipe_from(cfg), ctx.build_model(cfg.student), gen0_model)
        training = student_training(cfg) if strategy.gen0 == "student" else cfg.teacher_training
        role = "generation" if strategy.gen0 == "student" else "teacher"
        previous = provision(ctx, "gen0", gen0_cfg, training, role, model=gen0_model)
        log.info("Born-again: generation 0 is %s (%s), %s; %d generation(s) follow",
                 gen0_cfg.arch, previous.source, ctx.task.brief(previous.test), generations)
        trained = [previous]
        for k in range(1, generations + 1):
            recipe = recipe_from(cfg, stage=k - 1, stages=generations)
            student = ctx.build_model(cfg.student, int(cfg.seed) + k)
            current = distill(ctx, f"gen{k}", Distiller(student, recipe, ctx.task, previous.model), role="generation",
                              arch=str(cfg.student.arch), title=f"generation {k}/{generations}")
            trained.append(current)
            if strategy.stop_when_no_gain and k < generations and not ctx.task.selected.better(current.best_val, previous.best_val):
                log.info("generation %d did not improve its validation %s (%s after %s); stopping here "
                         "(strategy.stop_when_no_gain)", k, ctx.task.select, ctx.task.selected.show(current.best_val),
                         ctx.task.selected.show(previous.best_val))
                break
            previous = current
        return self.result(ctx, trained, recipe)

    @staticmethod
    def result(ctx, trained, recipe) -> StrategyResult:
        students = trained[1:]
        models = {t.name: t for t in trained}
        if len(students) > 1:
            ensemble_model = Ensemble([t.model for t in students]).to(ctx.device)
            models["ensemble"] = finish(ctx, "ensemble", ensemble_model, "ensemble", f"ensemble(gen1-gen{len(students)})",
                                        ctx.run_dir / "checkpoints" / "ensemble", epochs=int(ctx.cfg.epochs), best_val=None)
            models["ensemble"].info["members"] = [t.name for t in students]
        chosen = best_of(students, ctx)
        export_student(ctx, chosen)
        return StrategyResult(student=chosen, models=models, teacher=trained[0], recipe=recipe)
