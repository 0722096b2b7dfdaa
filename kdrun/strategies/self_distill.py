"""Self-distillation with deep supervision (Zhang et al., "Be Your Own Teacher", ICCV 2019):
auxiliary classifiers on the student's intermediate stages learn from its deepest classifier
(the recipe's soft targets plus feature matching); the deepest one learns from labels.
The auxiliary heads live beside the student, so the exported model is the plain student."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdrun.distill import DistillTask
from kdrun.errors import ConfigError
from kdrun.features import FeatureTaps, check_paths, resolve_path
from kdrun.losses import StepOutputs, WeightedSum, build_recipe
from kdrun.strategies.common import (
    best_val_accs,
    entry,
    finish_model,
    knob_schedule,
    prepare,
    require_logit_recipe,
    scratch_baseline,
    scratch_section,
    student_section,
    student_training,
)
from kdrun.engine.loop import evaluate
from kdrun.models import count_params
from kdrun.teachers import fit_spec

log = logging.getLogger(__name__)

EMBEDDING = "embedding"


def stage_paths(model: nn.Module) -> list[str]:
    """``stage1..stageN-1``: every stage but the deepest (whose classifier is the model's own)."""
    stages = sorted((int(m.group(1)), name) for name, _ in model.named_children() if (m := re.fullmatch(r"stage(\d+)", name)))
    return [name for _, name in stages[:-1]]


class AuxiliaryHead(nn.Module):
    """Pool a stage's output to a vector, project it to the embedding's width (the feature
    that is matched to the deepest embedding), and classify it."""

    def __init__(self, feature_shape: torch.Size, embedding_dim: int, num_classes: int):
        super().__init__()
        channels = feature_shape[1]
        self.pool = nn.Flatten() if len(feature_shape) == 2 else nn.Sequential(nn.AdaptiveAvgPool1d(1) if len(feature_shape) == 3 else nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project = nn.Sequential(nn.Linear(channels, embedding_dim), nn.BatchNorm1d(embedding_dim), nn.ReLU(inplace=True))
        self.fc = nn.Linear(embedding_dim, num_classes)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.project(self.pool(feature))
        return self.fc(hidden), hidden


class HeadModel(nn.Module):
    """One auxiliary classifier as a model of its own (for evaluation): the student's
    forward up to the tap, then the head. Needs the task's taps to be active."""

    def __init__(self, student: nn.Module, taps: FeatureTaps, path: str, head: AuxiliaryHead):
        super().__init__()
        self.head = head
        self._student, self._taps, self.path = [student], taps, path  # not submodules: the head is what this adds

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self._taps.clear()
        self._student[0](inputs)
        return self.head(self._taps.outputs[self.path])[0]


class SelfDistillTask(DistillTask):
    def __init__(self, student: nn.Module, recipe: WeightedSum, paths: list[str], feature_weight: float, knobs=None):
        # The recipe is the shallow heads' (their teacher is the deepest classifier, not a model).
        super().__init__(student, recipe, None, knobs, check=False)
        self.paths, self.feature_weight = paths, feature_weight
        self.student_taps = FeatureTaps(student, [*paths, EMBEDDING], owner="student")
        self.heads = nn.ModuleDict()

    def labels_of_heads(self) -> dict[str, str]:
        return {f"head{i}": path for i, path in enumerate(self.paths, start=1)}

    def setup(self, inputs, labels) -> None:
        with torch.no_grad():
            self.student_taps.clear()
            logits = self.student(inputs)
            features = dict(self.student_taps.outputs)
        embedding_dim = features[EMBEDDING].flatten(1).shape[1]
        for label, path in self.labels_of_heads().items():
            self.heads[label] = AuxiliaryHead(features[path].shape, embedding_dim, logits.shape[1]).to(inputs.device)
        self.recipe.setup(StepOutputs(student_logits=logits, labels=labels, teacher_logits=logits))

    def parameters(self) -> list[nn.Parameter]:
        return super().parameters() + list(self.heads.parameters())

    def train(self, mode: bool = True) -> None:
        super().train(mode)
        self.heads.train(mode)

    def to(self, device):
        super().to(device)
        self.heads.to(device)
        return self

    def head_models(self) -> dict[str, HeadModel]:
        return {label: HeadModel(self.student, self.student_taps, path, self.heads[label])
                for label, path in self.labels_of_heads().items()}

    def extra_evaluations(self) -> dict[str, nn.Module]:
        return self.head_models()

    def loss(self, inputs, labels, index=None, progress=None):
        self.student_taps.clear()
        deepest = self.student(inputs)
        features = self.student_taps.outputs
        target_feature = features[EMBEDDING].flatten(1).detach()
        total = F.cross_entropy(deepest, labels)
        parts: dict[str, torch.Tensor] = {"loss/deepest_ce": total.detach()}
        for label, path in self.labels_of_heads().items():
            logits, hidden = self.heads[label](features[path])
            head_loss, head_parts = self.recipe(StepOutputs(
                student_logits=logits, labels=labels, teacher_logits=deepest.detach(), progress=progress))
            feature_loss = F.mse_loss(hidden, target_feature)
            total = total + head_loss + self.feature_weight * feature_loss
            for name, value in {**head_parts, "loss/feature": feature_loss}.items():
                parts[name] = parts.get(name, 0.0) + value.detach() / len(self.paths)
        return total, parts, deepest

    def state_dict(self) -> dict:
        return {**super().state_dict(), "heads": self.heads.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.heads.load_state_dict(state["heads"])


class SelfDistill:
    name = "self"

    def run(self, ctx) -> dict[str, Any]:
        cfg, strategy = ctx.cfg, ctx.cfg.strategy
        recipe = build_recipe(cfg.loss)
        require_logit_recipe(recipe, "self")
        student = ctx.build_model(cfg.student)
        paths = [resolve_path(student, p) for p in strategy.taps] if strategy.get("taps") else stage_paths(student)
        if not paths:
            raise ConfigError(
                f"strategy=self needs intermediate stages on the student ({cfg.student.arch} has none named stageN "
                "besides its deepest); list them with strategy.taps=[...]"
            )
        check_paths(student, [*paths, EMBEDDING], "student")
        feature_weight = float(strategy.feature_weight)
        if feature_weight < 0:
            raise ConfigError(f"strategy.feature_weight={feature_weight} must be >= 0")
        task = prepare(ctx, SelfDistillTask(student, recipe, paths, feature_weight, knobs=knob_schedule(ctx, recipe)))
        log.info("Self-distillation: auxiliary heads on %s learn from the deepest classifier with %s + %g*feature L2",
                 ", ".join(paths), recipe, feature_weight)
        ckpt_dir = ctx.run_dir / "checkpoints"
        meta = {"arch": str(cfg.student.arch), "config": OmegaConf.to_container(cfg, resolve=True)}
        result = ctx.fit(task, fit_spec(student_training(cfg)), "student", ckpt_dir, meta)
        trained = finish_model(ctx, "student", student, "deepest", str(cfg.student.arch), result.epochs,
                               result.best_val_acc, ckpt_dir, meta)
        models = {}
        head_models = task.head_models()
        best_val = best_val_accs(ctx, head_models)
        with task:  # the heads read the student's taps
            for label, head_model in head_models.items():
                test_acc, test_loss = evaluate(head_model, ctx.data.test, ctx.device)
                ctx.metrics.write(epoch=result.epochs, model=label, split="test", acc=test_acc, loss=test_loss)
                models[label] = {**entry("auxiliary", f"{cfg.student.arch}[:{head_model.path}]+head", head_model, test_acc,
                                         best_val[label], ckpt_dir / "last.pt"),
                                 "params": count_params(head_model.head) + count_params_upto(student, head_model.path),
                                 "tap": head_model.path}
        models["student"] = trained.entry
        scratch = scratch_baseline(ctx)
        if scratch is not None:
            models["scratch"] = scratch.entry
        return {
            "recipe": str(recipe),
            "recipe_weights": dict(recipe.weights),
            "teacher": None,
            "student": student_section(trained),
            "scratch": scratch_section(scratch),
            "heads": {label: {"tap": m["tap"], "test_acc": m["test_acc"]} for label, m in models.items() if m.get("tap")},
            "models": models,
            "_models": {"student": student, "teacher": None},
        }


def count_params_upto(model: nn.Module, path: str) -> int:
    """Parameters of the top-level children of ``model`` up to and including the one holding ``path``."""
    top = path.split(".")[0]
    total = 0
    for name, child in model.named_children():
        total += sum(p.numel() for p in child.parameters())
        if name == top:
            break
    return total
