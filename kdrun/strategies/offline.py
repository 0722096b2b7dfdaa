"""Offline KD: a frozen, provisioned teacher distilled into a student."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import OmegaConf

from kdrun.distill import DistillTask, check_recipe
from kdrun.engine.loop import evaluate
from kdrun.losses import build_recipe
from kdrun.models import count_params
from kdrun.teachers import fit_spec, provision

log = logging.getLogger(__name__)


class Offline:
    name = "offline"

    def run(self, ctx) -> dict[str, Any]:
        cfg = ctx.cfg
        recipe = build_recipe(cfg.loss)
        log.info("Recipe: %s", recipe)
        teacher = ctx.build_model(cfg.teacher) if recipe.needs_teacher else None
        student = ctx.build_model(cfg.student)
        check_recipe(recipe, student, teacher)  # before any teacher training, so bad input fails fast

        teacher_summary = None
        if teacher is not None:
            given = provision("teacher", teacher, cfg.teacher, cfg.teacher_training, ctx)
            teacher_summary = {
                "arch": str(cfg.teacher.arch), "params": count_params(teacher), "test_acc": given.test_acc,
                "source": given.source, "path": str(given.path),
            }
            ctx.metrics.write(epoch=0, model="teacher", split="test", acc=given.test_acc, source=given.source)

        if recipe.needs_index:
            ctx.data = ctx.data.indexed()
        task = DistillTask(student, recipe, teacher).to(ctx.device)
        probe_inputs, probe_labels = next(iter(ctx.data.train))[:2]
        with task:
            task.setup(probe_inputs.to(ctx.device), probe_labels.to(ctx.device))
        student_training = OmegaConf.create({"epochs": cfg.epochs, "optim": cfg.optim, "sched": cfg.sched, "grad_clip": cfg.grad_clip})
        meta = {"arch": str(cfg.student.arch), "config": OmegaConf.to_container(cfg, resolve=True)}
        result = ctx.fit(task, fit_spec(student_training), "student", ctx.run_dir / "checkpoints", meta)
        test_acc, test_loss = evaluate(student, ctx.data.test, ctx.device)
        ctx.metrics.write(epoch=result.epochs, model="student", split="test", acc=test_acc, loss=test_loss)
        log.info("student %s: test acc %.2f%% (best val %.2f%%)", cfg.student.arch, test_acc, result.best_val_acc)

        last_train = [r for r in ctx.metrics.rows() if r["model"] == "student" and r["split"] == "train"][-1:]
        sections: dict[str, Any] = {
            "recipe": str(recipe),
            "recipe_weights": dict(recipe.weights),
            "loss_parts": {k: v for row in last_train for k, v in row.items() if k.startswith("loss/")},
            "teacher": teacher_summary,
            "student": {"arch": str(cfg.student.arch), "params": count_params(student), "test_acc": test_acc, "best_val_acc": result.best_val_acc},
            "scratch": None,
        }
        if scratch_enabled(cfg.scratch, ctx.data.embedded):
            scratch = provision("scratch", ctx.build_model(cfg.student), cfg.student, student_training, ctx)
            sections["scratch"] = {"test_acc": scratch.test_acc, "best_val_acc": scratch.best_val_acc, "source": scratch.source}
            ctx.metrics.write(epoch=result.epochs, model="scratch", split="test", acc=scratch.test_acc, source=scratch.source)
        sections["_models"] = {"student": student, "teacher": teacher}
        return sections


def scratch_enabled(setting, embedded: bool) -> bool:
    """``scratch=auto`` trains the label-only baseline on the small embedded datasets only."""
    return embedded if setting == "auto" else bool(setting)
