"""Distillation on unlabeled data: labels are hidden from a share of the training set; the
teacher, trained on the labelled share, gives soft targets for every sample, and the student
learns from both (CE on the labelled samples, the distillation terms on all of them)."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Subset

from kdrun.data import HiddenLabels
from kdrun.distiller import Distiller, check_recipe
from kdrun.losses.recipe import recipe_from
from kdrun.provision import provision
from kdrun.strategies.base import Baseline, Strategy, StrategyResult, number_in
from kdrun.strategies.common import distill
from kdrun.tasks import language

log = logging.getLogger(__name__)


def labeled_split(n: int, fraction: float, seed: int) -> tuple[list[int], set[int]]:
    """Seeded choice of which training samples keep their labels (at least one)."""
    keep = max(1, int(round(n * fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7)).tolist()
    return sorted(order[:keep]), set(order[keep:])


class Unlabeled(Strategy):
    name = "unlabeled"
    needs_distillation = True

    def check(self, cfg) -> None:
        language.refuse(cfg, self.name, "every token of a text is its own label")
        number_in(cfg, "labeled_fraction", 0, 1, open_low=True, open_high=True,
                  why=": the share of training samples that keep their labels")

    def run(self, ctx) -> StrategyResult:
        cfg = ctx.cfg
        fraction = float(cfg.strategy.labeled_fraction)
        recipe = recipe_from(cfg)
        student = ctx.build_model(cfg.student)
        teacher_model = ctx.build_model(cfg.teacher)
        check_recipe(recipe, student, teacher_model)

        full = ctx.data.train_set
        labeled, hidden = labeled_split(len(full), fraction, int(cfg.seed))
        log.info("Unlabeled data: %d of %d training samples keep their labels (%.0f%%); the rest get the teacher's soft targets",
                 len(labeled), len(full), 100 * fraction)
        variant = {"labeled_fraction": fraction, "labeled_samples": len(labeled)}
        labeled_data = ctx.data.with_train_set(Subset(full, labeled))
        teacher = provision(ctx, "teacher", cfg.teacher, cfg.teacher_training, "teacher", data=labeled_data, variant=variant,
                            model=teacher_model)
        distiller = Distiller(student, recipe, ctx.task, teacher.model, partial_labels=True)
        trained = distill(ctx, "student", distiller, role="student", arch=str(cfg.student.arch),
                          ckpt_dir=ctx.run_dir / "checkpoints", data=ctx.data.with_train_set(HiddenLabels(full, hidden)))
        # The baseline the gain is measured against: the student on the labelled share alone.
        baseline = Baseline(cfg.student, data=labeled_data, variant=variant, trained_on="labeled share")
        details = {"unlabeled": {"labeled_fraction": fraction, "labeled_samples": len(labeled), "unlabeled_samples": len(hidden)}}
        return StrategyResult(student=trained, models={"teacher": teacher, "student": trained}, teacher=teacher,
                              recipe=recipe, baseline=baseline, details=details)
