"""Born-again networks (Furlanello et al., ICML 2018): generation k, a fresh model of the
student's architecture, learns from generation k-1; generation 0 is the student trained on
labels (or the configured teacher). Reports every generation and their ensemble."""

from __future__ import annotations

import logging
from typing import Any

from kdrun.distill import check_recipe
from kdrun.errors import ConfigError
from kdrun.losses import build_recipe
from kdrun.models.ensemble import Ensemble
from kdrun.strategies.common import (
    distill_stage,
    export_student,
    finish_model,
    provide,
    scratch_baseline,
    scratch_section,
    student_section,
    student_training,
    teacher_section,
)

log = logging.getLogger(__name__)


class BornAgain:
    name = "born_again"

    def run(self, ctx) -> dict[str, Any]:
        cfg, strategy = ctx.cfg, ctx.cfg.strategy
        generations = int(strategy.generations)
        if generations < 1:
            raise ConfigError(f"strategy.generations={generations} must be >= 1")
        if strategy.gen0 not in ("student", "teacher"):
            raise ConfigError(f"strategy.gen0={strategy.gen0!r} must be student (the student trained on labels) or teacher")
        recipe = build_recipe(cfg.loss)
        if not recipe.needs_teacher:
            raise ConfigError(f"strategy=born_again needs a recipe with a distillation term (e.g. loss=kd); got {recipe}")
        gen0_cfg = cfg.student if strategy.gen0 == "student" else cfg.teacher
        gen0_model = ctx.build_model(gen0_cfg)
        check_recipe(recipe, ctx.build_model(cfg.student), gen0_model)
        training = student_training(cfg) if strategy.gen0 == "student" else cfg.teacher_training
        previous = provide(ctx, "gen0", gen0_cfg, training, "generation", model=gen0_model)
        log.info("Born-again: generation 0 is %s (%s), test acc %.2f%%; %d generation(s) follow",
                 gen0_cfg.arch, previous.entry["source"], previous.test_acc, generations)

        trained = [previous]
        for k in range(1, generations + 1):
            current = distill_stage(
                ctx, f"gen{k}", f"generation {k}/{generations}", cfg.student, previous.model, "generation",
                stage=k - 1, stages=generations, seed=int(cfg.seed) + k,
            )
            trained.append(current)
            if strategy.stop_when_no_gain and previous.best_val_acc is not None and k < generations \
                    and (current.best_val_acc or 0.0) <= previous.best_val_acc:
                log.info("generation %d did not improve validation accuracy (%.2f%% after %.2f%%); stopping here "
                         "(strategy.stop_when_no_gain)", k, current.best_val_acc or 0.0, previous.best_val_acc)
                break
            previous = current

        students = trained[1:]
        models = {t.label: t.entry for t in trained}
        if len(students) > 1:
            ensemble_model = Ensemble([t.model for t in students]).to(ctx.device)
            ensemble = finish_model(ctx, "ensemble", ensemble_model, "ensemble", f"ensemble(gen1-gen{len(students)})",
                                    int(cfg.epochs), None, ctx.run_dir / "checkpoints" / "ensemble")
            models["ensemble"] = ensemble.entry
        chosen = max(students, key=lambda t: t.best_val_acc or 0.0)
        export_student(ctx, chosen)
        scratch = scratch_baseline(ctx)
        if scratch is not None:
            models["scratch"] = scratch.entry
        return {
            "recipe": str(recipe),
            "recipe_weights": dict(recipe.weights),
            "teacher": teacher_section(trained[0]),
            "student": student_section(chosen),
            "scratch": scratch_section(scratch),
            "generations": [{"generation": i, "test_acc": t.test_acc, "best_val_acc": t.best_val_acc} for i, t in enumerate(trained)],
            "ensemble": {"test_acc": models["ensemble"]["test_acc"], "members": [t.label for t in students]} if "ensemble" in models else None,
            "models": models,
            "_models": {"student": chosen.model, "teacher": trained[0].model},
        }
