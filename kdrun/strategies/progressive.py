"""Progressive distillation: a teacher-assistant chain (Mirzadeh et al., AAAI 2020) for a large
capacity gap, teacher -> TA_1 -> ... -> student, each stage distilled from the one before.
``T``/``alpha`` schedules (``schedule.*.per=stage``) can change the knobs from stage to stage."""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from kdrun.distiller import Distiller, check_recipe
from kdrun.losses.recipe import recipe_from
from kdrun.provision import provision
from kdrun.strategies.base import Strategy, StrategyResult, model_list
from kdrun.strategies.common import distill, export_student

log = logging.getLogger(__name__)


class Progressive(Strategy):
    name = "progressive"
    needs_distillation = True

    def check(self, cfg) -> None:
        if cfg.strategy.get("chain") is not None:
            model_list(cfg, "chain", "[cnn_small]")

    def run(self, ctx) -> StrategyResult:
        cfg = ctx.cfg
        chain = [*(OmegaConf.create(c) if not OmegaConf.is_config(c) else c for c in (cfg.strategy.chain or [])), cfg.student]
        names = [f"ta{i}" for i in range(1, len(chain))] + ["student"]
        # Every pair of neighbours must fit the recipe's taps before anything trains.
        built = [ctx.build_model(cfg.teacher)] + [ctx.build_model(c) for c in chain]
        for upper, lower in zip(built, built[1:]):
            check_recipe(recipe_from(cfg), lower, upper)
        log.info("Progressive chain: %s", " -> ".join([str(cfg.teacher.arch)] + [str(c.arch) for c in chain]))

        teacher = provision(ctx, "teacher", cfg.teacher, cfg.teacher_training, "teacher")
        previous, trained = teacher, []
        for stage, (name, model_cfg) in enumerate(zip(names, chain)):
            title = f"stage {stage + 1}/{len(chain)} ({name}: {model_cfg.arch} <- {previous.arch})"
            recipe = recipe_from(cfg, stage=stage, stages=len(chain))
            distiller = Distiller(ctx.build_model(model_cfg), recipe, ctx.task, previous.model)
            previous = distill(ctx, name, distiller, role="assistant" if name != "student" else "student",
                               arch=str(model_cfg.arch), title=title)
            trained.append(previous)
        export_student(ctx, trained[-1])
        return StrategyResult(student=trained[-1], models={m.name: m for m in (teacher, *trained)}, teacher=teacher, recipe=recipe)
