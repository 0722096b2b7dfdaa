"""Distillation on unlabeled data: labels are hidden from a share of the training set; the
teacher, trained on the labelled share, gives soft targets for every sample, and the student
learns from both (CE on the labelled samples, the distillation terms on all of them)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.data import Subset

from kdrun.data import HiddenLabels
from kdrun.distill import DistillTask, check_recipe
from kdrun.errors import ConfigError
from kdrun.losses import build_recipe
from kdrun.strategies.common import (
    finish_model,
    knob_schedule,
    prepare,
    provide,
    student_section,
    student_training,
    teacher_section,
)
from kdrun.teachers import fit_spec

log = logging.getLogger(__name__)


class PseudoLabelTask(DistillTask):
    """Hidden labels (-1) become the teacher's predictions for terms that need a class
    (e.g. DKD's target class); ``outputs.labeled`` keeps CE on the real labels only."""

    def outputs(self, inputs, labels, index=None, progress=None):
        outputs = super().outputs(inputs, labels, index, progress)
        labeled = labels >= 0
        if outputs.teacher_logits is not None:
            outputs.labels = torch.where(labeled, labels, outputs.teacher_logits.argmax(1))
        outputs.labeled = labeled.float()
        return outputs


def labeled_split(n: int, fraction: float, seed: int) -> tuple[list[int], set[int]]:
    """Seeded choice of which training samples keep their labels (at least one)."""
    keep = max(1, int(round(n * fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7)).tolist()
    return sorted(order[:keep]), set(order[keep:])


class Unlabeled:
    name = "unlabeled"

    def run(self, ctx) -> dict[str, Any]:
        cfg = ctx.cfg
        fraction = float(cfg.strategy.labeled_fraction)
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"strategy.labeled_fraction={fraction} must be in (0, 1): the share of training samples that keep labels")
        recipe = build_recipe(cfg.loss)
        if not recipe.needs_teacher:
            raise ConfigError(f"strategy=unlabeled needs a recipe with a distillation term (e.g. loss=kd); got {recipe}")
        student = ctx.build_model(cfg.student)
        teacher_model = ctx.build_model(cfg.teacher)
        check_recipe(recipe, student, teacher_model)

        full = ctx.data.train_set
        labeled, hidden = labeled_split(len(full), fraction, int(cfg.seed))
        log.info("Unlabeled data: %d of %d training samples keep their labels (%.0f%%); the rest get the teacher's soft targets",
                 len(labeled), len(full), 100 * fraction)
        variant = {"labeled_fraction": fraction, "labeled_samples": len(labeled)}
        labeled_ctx = replace(ctx, data=ctx.data.with_train_set(Subset(full, labeled)))
        teacher = provide(labeled_ctx, "teacher", cfg.teacher, cfg.teacher_training, "teacher", data_variant=variant,
                          model=teacher_model)
        # The baseline the gain is measured against: the student on the labelled share alone.
        scratch = provide(labeled_ctx, "scratch", cfg.student, student_training(cfg), "scratch", data_variant=variant)

        ctx.data = ctx.data.with_train_set(HiddenLabels(full, hidden))
        if recipe.needs_index:
            ctx.data = ctx.data.indexed()
        task = prepare(ctx, PseudoLabelTask(student, recipe, teacher.model, knobs=knob_schedule(ctx, recipe)))
        ckpt_dir = ctx.run_dir / "checkpoints"
        meta = {"arch": str(cfg.student.arch), "config": OmegaConf.to_container(cfg, resolve=True)}
        result = ctx.fit(task, fit_spec(student_training(cfg)), "student", ckpt_dir, meta)
        trained = finish_model(ctx, "student", student, "student", str(cfg.student.arch), result.epochs,
                               result.best_val_acc, ckpt_dir, meta)
        log.info("student on labelled + unlabeled data: %.2f%%; on the labelled share alone: %.2f%% (%+.2f)",
                 trained.test_acc, scratch.test_acc, trained.test_acc - scratch.test_acc)
        return {
            "recipe": str(recipe),
            "recipe_weights": dict(recipe.weights),
            "teacher": teacher_section(teacher),
            "student": student_section(trained),
            "scratch": {"test_acc": scratch.test_acc, "best_val_acc": scratch.best_val_acc, "source": scratch.entry["source"],
                        "trained_on": "labeled share"},
            "unlabeled": {"labeled_fraction": fraction, "labeled_samples": len(labeled), "unlabeled_samples": len(hidden)},
            "models": {"teacher": teacher.entry, "student": trained.entry, "scratch": scratch.entry},
            "_models": {"student": student, "teacher": teacher.model},
        }
