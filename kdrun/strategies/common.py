"""What strategies share: provisioned models, stages that resume, knob schedules, summary entries."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from kdrun.distill import DistillTask
from kdrun.engine import checkpoint, distributed
from kdrun.engine.loop import evaluate
from kdrun.engine.schedule import knob_values
from kdrun.errors import ConfigError
from kdrun.losses import WeightedSum
from kdrun.losses.recipe import recipe_at
from kdrun.models import count_params
from kdrun.teachers import fit_spec, provision

log = logging.getLogger(__name__)


@dataclass
class Trained:
    """A model a strategy trained or was given, with what ``summary.json`` says of it."""

    label: str
    model: nn.Module
    entry: dict[str, Any]

    @property
    def test_acc(self) -> float:
        return self.entry["test_acc"]

    @property
    def best_val_acc(self) -> float | None:
        return self.entry.get("best_val_acc")


def entry(role: str, arch: str, model: nn.Module, test_acc: float, best_val_acc: float | None = None,
          checkpoint_path: Path | None = None, source: str = "trained") -> dict[str, Any]:
    return {
        "role": role, "arch": arch, "params": count_params(model), "test_acc": test_acc,
        "best_val_acc": best_val_acc, "source": source, "checkpoint": None if checkpoint_path is None else str(checkpoint_path),
    }


def student_training(cfg: DictConfig) -> DictConfig:
    return OmegaConf.create({"epochs": cfg.epochs, "optim": cfg.optim, "sched": cfg.sched, "grad_clip": cfg.grad_clip})


def provide(ctx, label: str, model_cfg: DictConfig, training: DictConfig, role: str, seed: int | None = None,
            data_variant: dict | None = None, model: nn.Module | None = None) -> Trained:
    """A model trained on labels alone: from a checkpoint, the cache, or trained now and cached.

    ``model`` is the freshly built model when the caller already built it (with the same
    ``seed``) to check the recipe's taps; otherwise it is built here.
    """
    model = ctx.build_model(model_cfg, seed) if model is None else model
    given = provision(label, model, model_cfg, training, ctx, seed=seed, data_variant=data_variant)
    # A resumed run provides its models again; their row is already there.
    if not any(r.get("model") == label and r.get("epoch") == 0 and r.get("split") == "test" for r in ctx.metrics.rows()):
        ctx.metrics.write(epoch=0, model=label, split="test", acc=given.test_acc, source=given.source)
    return Trained(label, model, entry(role, str(model_cfg.arch), model, given.test_acc, given.best_val_acc, given.path, given.source))


def knob_schedule(ctx, recipe: WeightedSum, stage: int = 0, stages: int = 1, also=()):
    """A ``before_epoch`` hook: sets this epoch's scheduled ``T``/``alpha`` in the recipe
    (and calls each of ``also`` with them, e.g. an ensemble's temperature)."""
    schedule = OmegaConf.to_container(ctx.cfg.schedule, resolve=True) if ctx.cfg.get("schedule") else {}

    def before_epoch(epoch: int, epochs: int) -> dict[str, float]:
        values = knob_values(schedule, epoch, epochs, stage, stages)
        if values:
            recipe.retune(recipe_at(ctx.cfg, **values))
        for hook in also:
            hook(values)
        return values

    return before_epoch


def prepare(ctx, task: DistillTask, data=None) -> DistillTask:
    """Move the task to the device and size the recipe's adapters from one probe batch."""
    data = data or ctx.data
    task.to(ctx.device)
    probe_inputs, probe_labels = next(iter(data.train))[:2]
    with task:
        task.setup(probe_inputs.to(ctx.device), probe_labels.to(ctx.device))
    return task


def require_logit_recipe(recipe: WeightedSum, strategy: str) -> None:
    """Strategies whose teachers change during training (peers, heads) use logit terms only."""
    if recipe.taps("student") or recipe.taps("teacher") or recipe.needs_index:
        raise ConfigError(
            f"strategy={strategy} works with logit-based recipes (ce, kd, kd_ls, dkd, dist); "
            f"this recipe reads features or sample indices: {recipe}"
        )


def train_stage(ctx, label: str, title: str, task: DistillTask, training: DictConfig, role: str, arch: str) -> Trained:
    """Train ``task.student`` as one stage of a multi-stage strategy, in ``checkpoints/<label>/``.

    A stage that finished earlier in this run (its ``final.pt`` exists) is loaded, not
    retrained, and one stopped half-way carries on from its ``last.pt``: a resumed run
    picks up in the stage where it stopped.
    """
    ckpt_dir = ctx.run_dir / "checkpoints" / label
    final = ckpt_dir / "final.pt"
    if final.exists():
        state = checkpoint.load_weights(task.student, final, f"{label} final checkpoint")
        task.student.to(ctx.device)
        log.info("%s: finished earlier in this run (test acc %.2f%%), loaded from %s", title, state["test_acc"], final)
        return Trained(label, task.student, entry(role, arch, task.student, state["test_acc"], state["best_val_acc"], final))
    log.info("%s: training %s (%s)", title, arch, task.recipe)
    meta = {"arch": arch, "config": OmegaConf.to_container(ctx.cfg, resolve=True)}
    result = ctx.fit(task, fit_spec(training), label, ckpt_dir, meta, title=title)
    return finish_model(ctx, label, task.student, role, arch, result.epochs, result.best_val_acc, ckpt_dir, meta)


def finish_model(ctx, label: str, model: nn.Module, role: str, arch: str, epochs: int, best_val_acc: float | None,
                 ckpt_dir: Path, meta: dict | None = None) -> Trained:
    """Test a trained model, log it, and keep its final weights in ``ckpt_dir/final.pt``."""
    test_acc, test_loss = evaluate(model, ctx.data.test, ctx.device)
    ctx.metrics.write(epoch=epochs, model=label, split="test", acc=test_acc, loss=test_loss)
    final = ckpt_dir / "final.pt"
    if distributed.is_main():
        checkpoint.save_atomic(
            {"model": {k: v.cpu() for k, v in model.state_dict().items()}, **(meta or {"arch": arch}),
             "test_acc": test_acc, "best_val_acc": best_val_acc, "epochs": epochs},
            final,
        )
    log.info("%s (%s): test acc %.2f%% (best val %s)", label, arch, test_acc,
             "-" if best_val_acc is None else f"{best_val_acc:.2f}%")
    return Trained(label, model, entry(role, arch, model, test_acc, best_val_acc, final))


def best_val_accs(ctx, labels) -> dict[str, float | None]:
    """Each model's best validation accuracy in this run's ``metrics.jsonl`` (models the loop
    evaluated beside the student: peers, auxiliary heads)."""
    rows = ctx.metrics.rows()
    return {label: max((r["acc"] for r in rows if r["model"] == label and r["split"] == "val"), default=None)
            for label in labels}


def export_student(ctx, chosen: Trained) -> None:
    """``checkpoints/best.pt`` is the run's student whatever the strategy (DESIGN.md contract)."""
    if not distributed.is_main():
        return
    source = Path(chosen.entry["checkpoint"])
    best = source.with_name("best.pt") if source.with_name("best.pt").exists() else source
    target = ctx.run_dir / "checkpoints" / "best.pt"
    if best.resolve() != target.resolve():
        tmp = target.with_name(".best.pt.tmp")
        shutil.copyfile(best, tmp)
        tmp.replace(target)


def student_section(chosen: Trained) -> dict[str, Any]:
    """The DESIGN.md ``student`` keys (plus which model of ``models`` it is)."""
    return {
        "arch": chosen.entry["arch"], "params": chosen.entry["params"], "test_acc": chosen.test_acc,
        "best_val_acc": chosen.best_val_acc, "model": chosen.label,
    }


def scratch_section(scratch: Trained | None) -> dict[str, Any] | None:
    """The DESIGN.md ``scratch`` keys, or None when the baseline was not run."""
    if scratch is None:
        return None
    return {"test_acc": scratch.test_acc, "best_val_acc": scratch.best_val_acc, "source": scratch.entry["source"]}


def teacher_section(trained: Trained | None) -> dict[str, Any] | None:
    if trained is None:
        return None
    return {"arch": trained.entry["arch"], "params": trained.entry["params"], "test_acc": trained.test_acc,
            "source": trained.entry["source"], "path": trained.entry["checkpoint"]}


def scratch_enabled(setting, embedded: bool) -> bool:
    """``scratch=auto`` trains the label-only baseline on the small embedded datasets only."""
    return embedded if setting == "auto" else bool(setting)


def scratch_baseline(ctx, model_cfg: DictConfig | None = None, data_variant: dict | None = None) -> Trained | None:
    """The student trained on labels alone, when ``scratch`` asks for it (cached like a teacher)."""
    if not scratch_enabled(ctx.cfg.scratch, ctx.data.embedded):
        return None
    return provide(ctx, "scratch", model_cfg or ctx.cfg.student, student_training(ctx.cfg), "scratch", data_variant=data_variant)


def distill_stage(ctx, label: str, title: str, student_cfg: DictConfig, teacher: nn.Module, role: str,
                  stage: int = 0, stages: int = 1, seed: int | None = None) -> Trained:
    """One stage of a chain: a fresh ``student_cfg`` model learns from the frozen ``teacher``
    with the configured recipe (its own adapters), ``T``/``alpha`` scheduled per stage or epoch."""
    from kdrun.losses import build_recipe

    recipe = build_recipe(ctx.cfg.loss)
    student = ctx.build_model(student_cfg, seed)
    data = ctx.data.indexed() if recipe.needs_index else ctx.data
    task = DistillTask(student, recipe, teacher, knobs=knob_schedule(ctx, recipe, stage, stages))
    stage_ctx = replace(ctx, data=data)
    prepare(stage_ctx, task)
    return train_stage(stage_ctx, label, title, task, student_training(ctx.cfg), role, str(student_cfg.arch))
