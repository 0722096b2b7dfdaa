"""Distillation from an ensemble of teachers: each teacher is provisioned (and cached) like a
single one, and the target is the (optionally weighted) mean of their softened outputs."""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from kdrun.distiller import Distiller, check_recipe
from kdrun.engine.loop import evaluate
from kdrun.errors import ConfigError
from kdrun.losses.recipe import recipe_from
from kdrun.models.ensemble import Ensemble
from kdrun.provision import provision
from kdrun.strategies.base import Strategy, StrategyResult, TrainedModel, model_list
from kdrun.strategies.common import distill
from kdrun.tasks import language

log = logging.getLogger(__name__)


def check_weights(weights, count: int) -> None:
    if weights is None:
        return
    if not OmegaConf.is_list(weights) or len(weights) != count or any(
            isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf") for w in weights) \
            or sum(weights) <= 0:
        raise ConfigError(f"strategy.weights={weights} must list {count} non-negative numbers, not all 0")


class TeacherEnsemble(Strategy):
    name = "ensemble"
    needs_distillation = True

    def check(self, cfg) -> None:
        language.refuse(cfg, self.name, "its ensemble averages classifier outputs over one class axis")
        model_list(cfg, "teachers", "[cnn,cnn]", at_least=2)
        check_weights(cfg.strategy.get("weights"), len(cfg.strategy.teachers))

    def run(self, ctx) -> StrategyResult:
        cfg, strategy = ctx.cfg, ctx.cfg.strategy
        members = [OmegaConf.create(c) if not OmegaConf.is_config(c) else c for c in strategy.teachers]
        weights = list(strategy.weights) if strategy.get("weights") is not None else None
        recipe = recipe_from(cfg)
        student = ctx.build_model(cfg.student)
        # Member i is seeded with seed + i - 1: copies of one arch differ, and member 1 is the
        # teacher that offline KD with the same seed uses (the cache serves both).
        seeds = [int(cfg.seed) + i for i in range(len(members))]
        built = [ctx.build_model(member, seed) for member, seed in zip(members, seeds)]
        check_recipe(recipe, student, Ensemble(built))
        teachers = [provision(ctx, f"teacher{i}", member, cfg.teacher_training, "teacher", seed=seed, model=model)
                    for i, (member, seed, model) in enumerate(zip(members, seeds, built), start=1)]
        ensemble = Ensemble([t.model for t in teachers], weights).to(ctx.device)
        arch = "ensemble(" + ",".join(t.arch for t in teachers) + ")"
        test = evaluate(ensemble, ctx.data.test, ctx.task, ctx.device)  # at T = 1: the ensemble's own predictions
        ctx.metrics.write(epoch=0, model="teacher_ensemble", split="test", **test)
        log.info("Teacher ensemble %s: %s (members %s)", arch, ctx.task.brief(test),
                 ", ".join(ctx.task.selected.show(t.test[ctx.task.select]) for t in teachers))
        ensemble.T = float(cfg.T)  # as a teacher it softens at the recipe's T (and follows its schedule)
        teacher = TrainedModel("teacher_ensemble", "teacher", arch, ensemble, test, source="ensemble",
                               info={"members": [t.name for t in teachers], "weights": ensemble.weights.tolist()})
        trained = distill(ctx, "student", Distiller(student, recipe, ctx.task, ensemble), role="student",
                          arch=str(cfg.student.arch), ckpt_dir=ctx.run_dir / "checkpoints")
        models = {**{t.name: t for t in teachers}, "teacher_ensemble": teacher, "student": trained}
        return StrategyResult(student=trained, models=models, teacher=teacher, recipe=recipe)
