"""What strategies share: training a distiller as one model of the run, stages that resume
(a model's own, and the pre-stages its recipe trains first), the exported student."""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from kdrun import teacher_cache
from kdrun.distiller import Distiller
from kdrun.engine import distributed
from kdrun.data.views import with_views
from kdrun.engine.checkpoint import cpu_state, load, save_atomic
from kdrun.engine.loop import FitResult, FitSpec, Placement, epoch_seed, evaluate
from kdrun.engine.perf import free_bytes
from kdrun.errors import ConfigError
from kdrun.losses.stages import PreStage, epochs_text, prestages, recipe_views
from kdrun.models.weights import load_weights
from kdrun.strategies.base import TrainedModel

log = logging.getLogger(__name__)


def student_training(cfg: DictConfig) -> DictConfig:
    """How students are trained: the top-level epochs, optim, sched and grad_clip."""
    return OmegaConf.create({"epochs": cfg.epochs, "optim": cfg.optim, "sched": cfg.sched, "grad_clip": cfg.grad_clip})


def run_meta(ctx, arch: str) -> dict:
    return {"arch": arch, "config": OmegaConf.to_container(ctx.cfg, resolve=True)}


def distill(ctx, name: str, distiller: Distiller, *, role: str, arch: str, ckpt_dir: Path | None = None,
            title: str | None = None, data=None) -> TrainedModel:
    """Train ``distiller``'s student as model ``name`` of the run, with checkpoints in ``ckpt_dir``
    (default ``checkpoints/<name>/``), and test it.

    A model that finished earlier in this run (its ``final.pt`` exists) is loaded, not retrained,
    and one stopped half-way carries on from its ``last.pt``: a resumed run picks up in the stage
    where it stopped. The teacher-output cache is installed here, where the frozen teacher is known.
    """
    ckpt_dir = ckpt_dir or ctx.run_dir / "checkpoints" / name
    title = title or name
    final = ckpt_dir / "final.pt"
    if final.exists():
        state = load_weights(distiller.student, final, f"{name} final checkpoint", arch=arch)
        distiller.student.to(ctx.device)
        log.info("%s: finished earlier in this run (%s), loaded from %s", title, ctx.task.brief(state["test"]), final)
        return TrainedModel(name, role, arch, distiller.student, state["test"], state["best_val"], "trained", final)
    meta = run_meta(ctx, arch)
    result = train(ctx, name, distiller, arch=arch, ckpt_dir=ckpt_dir, title=title, data=data, meta=meta)
    return finish(ctx, name, distiller.student, role, arch, ckpt_dir, epochs=result.epochs, best_val=result.best_val, meta=meta)


def train(ctx, name: str, distiller: Distiller, *, arch: str, ckpt_dir: Path, title: str, data=None,
          meta: dict | None = None) -> FitResult:
    """Fit ``distiller`` with the students' training config, after the stages its recipe trains
    first (:func:`pretrain`), on the data as the recipe reads it (:func:`prepare`)."""
    meta = meta or run_meta(ctx, arch)
    for stage in prestages(distiller.recipe):
        pretrain(ctx, name, stage, distiller, ckpt_dir / stage.name, title=f"{title} {stage.name}", data=data, meta=meta)
    data = prepare(ctx, distiller, data or ctx.data, title, stream=name)
    log.info("%s: training %s (%s)", title, arch, distiller.recipe)
    return ctx.fit(distiller, FitSpec.from_config(student_training(ctx.cfg)), name, ckpt_dir, meta, title=title, data=data)


def prepare(ctx, distiller: Distiller, data, title: str, stream: str):
    """``data`` as ``distiller``'s recipe reads it (teacher-output cache where it applies, sample
    indices, views of each sample), with the recipe's adapters sized from a probe batch. The
    adapters' initial weights come from (seed, ``stream``) alone, so they are the same whether the
    teacher was trained in this process or loaded from the cache."""
    views = recipe_views(distiller.recipe)
    cache = ctx.perf.teacher_cache_setting
    if views is not None and cache is True:
        raise ConfigError(f"perf.teacher_cache=true, but the recipe trains on {views.name} of each sample, which the "
                          "teacher sees anew every step; set perf.teacher_cache=auto or false")
    data = teacher_cache.install(distiller, data, False if views else cache, free_bytes(ctx.device), title)
    for warning in distiller.recipe.bind_data(len(data.train_set)):
        ctx.warn_once(warning)
    if distiller.recipe.needs_index:
        data = data.indexed()
    if views is not None:
        data = with_views(data, views)
    distiller.to(ctx.device)
    torch.manual_seed(epoch_seed(int(ctx.cfg.seed), stream, 0))
    distiller.setup(Placement(ctx.task, ctx.device)(next(iter(data.train))))
    return data


class StageDistiller(Distiller):
    """The distiller of a pre-stage of ``distiller``: same student, teacher and task, the stage's
    recipe. A stage that does not train the student keeps it in eval mode (its batch-norm
    statistics untouched); :func:`held_still` keeps it out of the optimizer."""

    def __init__(self, distiller: Distiller, stage: PreStage):
        super().__init__(distiller.student, stage.recipe, distiller.task, distiller.teacher,
                         partial_labels=distiller.partial_labels)
        self.holds_student = not stage.trains_student

    def train(self, mode: bool = True) -> StageDistiller:
        super().train(mode)
        if self.holds_student:
            self.student.eval()
        return self


@contextmanager
def held_still(model: nn.Module, hold: bool):
    """While ``hold``, ``model``'s parameters need no gradient (so no optimizer takes them)."""
    flags = [param.requires_grad for param in model.parameters()]
    if hold:
        model.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(model.parameters(), flags):
            param.requires_grad_(flag)


def pretrain(ctx, name: str, stage: PreStage, distiller: Distiller, ckpt_dir: Path, *, title: str, data, meta: dict) -> None:
    """Train ``stage`` of ``distiller``'s recipe in ``ckpt_dir``: a stage that finished earlier in
    this run is loaded from its ``final.pt``; one stopped half-way carries on from its ``last.pt``."""
    stage_distiller = StageDistiller(distiller, stage)
    final = ckpt_dir / "final.pt"
    with held_still(distiller.student, stage_distiller.holds_student):
        stage_data = prepare(ctx, stage_distiller, data or ctx.data, title, stream=f"{name}.{stage.name}")
        if final.exists():
            stage_distiller.load_state_dict(load(final, f"{title} final checkpoint")["distiller"])
            log.info("%s: finished earlier in this run, loaded from %s", title, final)
            return
        held = "; the student is held still" if stage_distiller.holds_student else ""
        log.info("%s: training for %s before %s's own training (%s%s)", title, epochs_text(stage.epochs), name, stage.recipe,
                 held)
        spec = replace(FitSpec.from_config(student_training(ctx.cfg)), epochs=stage.epochs)
        ctx.fit(stage_distiller, spec, f"{name}.{stage.name}", ckpt_dir, meta, title=title, data=stage_data)
    if distributed.is_main():
        save_atomic({"distiller": cpu_state(stage_distiller), "stage": stage.name, "epochs": stage.epochs}, final)


def finish(ctx, name: str, model: nn.Module, role: str, arch: str, ckpt_dir: Path, *, epochs: int,
           best_val: float | None, meta: dict | None = None) -> TrainedModel:
    """Test a trained model, log it, and keep its final weights in ``ckpt_dir/final.pt``."""
    test = evaluate(model, ctx.data.test, ctx.task, ctx.device)
    ctx.metrics.write(epoch=epochs, model=name, split="test", **test)
    final = ckpt_dir / "final.pt"
    if distributed.is_main():
        save_atomic({"model": cpu_state(model), **(meta or {"arch": arch}), "test": test, "best_val": best_val,
                     "epochs": epochs}, final)
    log.info("%s (%s): %s (best val %s)", name, arch, ctx.task.brief(test), ctx.task.selected.show(best_val))
    return TrainedModel(name, role, arch, model, test, best_val, "trained", final)


def best_vals(ctx, names) -> dict[str, float | None]:
    """Each model's best validation value (of the task's selection metric) in this run's
    ``metrics.jsonl``: for models the loop evaluated beside the student (peers, heads)."""
    metric = ctx.task.selected
    rows = ctx.metrics.rows()
    pick = max if metric.higher_is_better else min
    return {name: pick((r[metric.name] for r in rows if r["model"] == name and r["split"] == "val"), default=None)
            for name in names}


def best_of(models: list[TrainedModel], ctx) -> TrainedModel:
    """The model with the best validation value."""
    metric = ctx.task.selected
    sign = 1 if metric.higher_is_better else -1
    return max(models, key=lambda m: sign * m.best_val if m.best_val is not None else float("-inf"))


def export_student(ctx, chosen: TrainedModel) -> None:
    """``checkpoints/best.pt`` is the run's student whatever the strategy (DESIGN.md contract)."""
    if not distributed.is_main():
        return
    source = Path(chosen.checkpoint)
    best = source.with_name("best.pt") if source.with_name("best.pt").exists() else source
    target = ctx.run_dir / "checkpoints" / "best.pt"
    if best.resolve() != target.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(".best.pt.tmp")
        shutil.copyfile(best, tmp)
        tmp.replace(target)



def start_from_teacher(student: nn.Module, teacher: TrainedModel | None) -> None:
    """``student.init=teacher``: the student starts from the teacher's layers (DistilBERT)."""
    from kdrun.models.language import init_from_teacher

    if teacher is None:
        raise ConfigError("student.init=teacher needs a teacher, but the loss recipe uses none")
    taken = init_from_teacher(student, teacher.model)
    log.info("student: initialised from the teacher's embeddings, head and blocks %s (1-based)",
             ", ".join(str(i + 1) for i in taken))
