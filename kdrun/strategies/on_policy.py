"""On-policy distillation (GKD, Agarwal et al., ICLR 2024): the student learns on its own samples.

At each training step, with probability ``lmbda`` (TRL's name for GKD's lambda), the batch's
blocks keep their first ``prompt_tokens`` tokens and the student samples the rest (at
``temperature``, no gradient); the teacher then scores every sampled token and the recipe's
divergence (``loss=jsd``: GKD's generalised JSD) pulls the student's distribution there towards
the teacher's. Otherwise the step uses the fixed data (supervised KD). Sampled tokens carry no
label, so a CE term learns from the prompt tokens only. ``lmbda=0`` is supervised KD, ``1`` fully
on-policy. The draws come from the global RNG, which the loop reseeds per epoch: a resumed run
samples alike. The teacher sees new inputs, so its output cache stays off.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kdrun.distiller import Distiller, check_recipe
from kdrun.losses.base import StepOutputs
from kdrun.losses.recipe import recipe_from
from kdrun.models.language import generate
from kdrun.provision import provision
from kdrun.strategies.base import Strategy, StrategyResult, number_in
from kdrun.strategies.common import distill
from kdrun.strategies.sequence import check_causal
from kdrun.tasks import IGNORE, Batch


class OnPolicyDistiller(Distiller):
    """A :class:`Distiller` whose training batches are, with probability ``lmbda``, continued by
    the student's own samples."""

    def __init__(self, *args, lmbda: float, prompt_tokens: int, temperature: float, **kwargs):
        super().__init__(*args, partial_labels=True, **kwargs)
        self.lmbda, self.prompt_tokens, self.temperature = lmbda, prompt_tokens, temperature

    @property
    def fixed_inputs(self) -> bool:
        return self.lmbda == 0

    def sampled(self, batch: Batch) -> Batch:
        ids = batch.inputs["input_ids"]
        prompts = ids[:, : self.prompt_tokens]
        continued = generate(self.student, prompts, ids.shape[1] - self.prompt_tokens, temperature=self.temperature)
        # Sampled tokens are no labels; the prompt keeps its own (IGNORE at padding).
        labels = torch.full_like(continued, IGNORE)
        labels[:, : self.prompt_tokens] = batch.labels[:, : self.prompt_tokens]
        return replace(batch, inputs={"input_ids": continued}, labels=labels, index=None, mask=None)

    def step_outputs(self, batch: Batch, progress: float | None = None) -> StepOutputs:
        if progress is not None and self.lmbda and float(torch.rand(())) < self.lmbda:
            batch = self.sampled(batch)
        return super().step_outputs(batch, progress)


class OnPolicy(Strategy):
    name = "on_policy"
    needs_distillation = True

    def check(self, cfg) -> None:
        check_causal(cfg, self.name)
        block = int(cfg.dataset.source.block_size)
        number_in(cfg, "lmbda", 0, 1)
        number_in(cfg, "prompt_tokens", 1, block - 1, kind=int, why=f" (it must leave room in a block of {block})")
        number_in(cfg, "temperature", 0, open_low=True)

    def run(self, ctx) -> StrategyResult:
        cfg = ctx.cfg
        recipe = recipe_from(cfg)
        student = ctx.build_model(cfg.student)
        teacher_model = ctx.build_model(cfg.teacher)
        check_recipe(recipe, student, teacher_model)
        teacher = provision(ctx, "teacher", cfg.teacher, cfg.teacher_training, "teacher", model=teacher_model)
        settings = {key: cfg.strategy[key] for key in ("lmbda", "prompt_tokens", "temperature")}
        distiller = OnPolicyDistiller(student, recipe, ctx.task, teacher.model, lmbda=float(settings["lmbda"]),
                                      prompt_tokens=int(settings["prompt_tokens"]),
                                      temperature=float(settings["temperature"]))
        trained = distill(ctx, "student", distiller, role="student", arch=str(cfg.student.arch),
                          ckpt_dir=ctx.run_dir / "checkpoints")
        return StrategyResult(student=trained, models={"teacher": teacher, "student": trained}, teacher=teacher,
                              recipe=recipe, details={"on_policy": settings})
