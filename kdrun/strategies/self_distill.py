"""Self-distillation with deep supervision (Zhang et al., "Be Your Own Teacher", ICCV 2019):
auxiliary classifiers on the student's intermediate stages learn from its deepest classifier
(the recipe's soft targets plus feature matching); the deepest one learns from labels.
The auxiliary heads live beside the student, so the exported model is the plain student."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdrun.distiller import Distiller
from kdrun.engine.loop import evaluate
from kdrun.errors import ConfigError
from kdrun.features import FeatureTaps, check_paths, resolve_path, stages
from kdrun.losses import StepOutputs, WeightedSum
from kdrun.losses.recipe import recipe_from
from kdrun.models import count_params
from kdrun.strategies.base import Strategy, StrategyResult, TrainedModel, number_in
from kdrun.strategies.common import best_vals, distill
from kdrun.tasks import Batch, Task
from kdrun.tasks import language

log = logging.getLogger(__name__)

EMBEDDING = "embedding"


class AuxiliaryHead(nn.Module):
    """Pool a stage's output to a vector, project it to the embedding's width (the feature
    that is matched to the deepest embedding), and classify it."""

    def __init__(self, feature_shape: torch.Size, embedding_dim: int, num_classes: int):
        super().__init__()
        channels = feature_shape[1]
        if len(feature_shape) == 2:
            self.pool = nn.Flatten()
        else:
            self.pool = nn.Sequential(nn.AdaptiveAvgPool1d(1) if len(feature_shape) == 3 else nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project = nn.Sequential(nn.Linear(channels, embedding_dim), nn.BatchNorm1d(embedding_dim), nn.ReLU(inplace=True))
        self.fc = nn.Linear(embedding_dim, num_classes)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.project(self.pool(feature))
        return self.fc(hidden), hidden


class HeadModel(nn.Module):
    """One auxiliary classifier as a model of its own (for evaluation): the student's
    forward up to the tap, then the head. Needs the distiller's taps to be active."""

    def __init__(self, student: nn.Module, taps: FeatureTaps, path: str, head: AuxiliaryHead):
        super().__init__()
        self.head = head
        self._student, self._taps, self.path = [student], taps, path  # not submodules: the head is what this adds

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self._taps.clear()
        self._student[0](inputs)
        return self.head(self._taps.outputs[self.path])[0]


class SelfDistiller(Distiller):
    """The student, its auxiliary heads (submodules, so they train, checkpoint and join DDP with
    it) and the heads' recipe, whose teacher is the deepest classifier rather than a model."""

    def __init__(self, student: nn.Module, recipe: WeightedSum, task: Task, paths: list[str], feature_weight: float):
        super().__init__(student, recipe, task, None, check=False)
        self.paths, self.feature_weight = paths, feature_weight
        self.student_taps = FeatureTaps(student, [*paths, EMBEDDING], owner="student")
        self.heads = nn.ModuleDict()

    def head_paths(self) -> dict[str, str]:
        return {f"head{i}": path for i, path in enumerate(self.paths, start=1)}

    def setup(self, batch: Batch) -> None:
        was_training = self.student.training
        self.student.eval()
        with self, torch.no_grad():
            self.student_taps.clear()
            logits = self.task.forward(self.student, batch)
            features = dict(self.student_taps.outputs)
        self.student.train(was_training)
        embedding_dim = features[EMBEDDING].flatten(1).shape[1]
        for name, path in self.head_paths().items():
            self.heads[name] = AuxiliaryHead(features[path].shape, embedding_dim, logits.shape[1]).to(logits.device)

    def evaluated(self) -> dict[str, nn.Module]:
        return {name: HeadModel(self.student, self.student_taps, path, self.heads[name]) for name, path in self.head_paths().items()}

    def forward(self, batch: Batch, progress=None):
        self.student_taps.clear()
        deepest, labels = self.task.scored(self.task.forward(self.student, batch), batch)
        features = self.student_taps.outputs
        target_feature = features[EMBEDDING].flatten(1).detach()
        total = F.cross_entropy(deepest, labels)
        parts: dict[str, torch.Tensor] = {"loss/deepest_ce": total.detach()}
        for name, path in self.head_paths().items():
            logits, hidden = self.heads[name](features[path])
            head_loss, head_parts = self.recipe(StepOutputs(
                student_logits=logits, labels=labels, teacher_logits=deepest.detach(), progress=progress))
            feature_loss = F.mse_loss(hidden, target_feature)
            total = total + head_loss + self.feature_weight * feature_loss
            for part, value in {**head_parts, "loss/feature": feature_loss}.items():
                parts[part] = parts.get(part, 0.0) + value.detach() / len(self.paths)
        return total, parts, deepest, labels


class SelfDistill(Strategy):
    name = "self"
    logit_terms_only = True

    def check(self, cfg) -> None:
        language.refuse(cfg, self.name, "its heads classify pooled stage features")
        number_in(cfg, "feature_weight", 0)
        taps = cfg.strategy.get("taps")
        if taps is not None and not OmegaConf.is_list(taps):
            raise ConfigError(f"strategy.taps={taps!r} must be a list of module paths, e.g. strategy.taps=[stage1,stage2]")

    def run(self, ctx) -> StrategyResult:
        cfg, strategy = ctx.cfg, ctx.cfg.strategy
        recipe = recipe_from(cfg)
        student = ctx.build_model(cfg.student)
        # By default every stage but the deepest, whose classifier is the model's own.
        paths = [resolve_path(student, p) for p in strategy.taps] if strategy.get("taps") else stages(student)[:-1]
        if not paths:
            raise ConfigError(
                f"strategy=self needs intermediate stages on the student ({cfg.student.arch} has none named stageN "
                "besides its deepest); list them with strategy.taps=[...]"
            )
        check_paths(student, [*paths, EMBEDDING], "student")
        feature_weight = float(strategy.feature_weight)
        distiller = SelfDistiller(student, recipe, ctx.task, paths, feature_weight)
        log.info("Self-distillation: auxiliary heads on %s learn from the deepest classifier with %s + %g*feature L2",
                 ", ".join(paths), recipe, feature_weight)
        arch = str(cfg.student.arch)
        trained = distill(ctx, "student", distiller, role="student", arch=arch, ckpt_dir=ctx.run_dir / "checkpoints")
        heads = self.test_heads(ctx, distiller, arch, trained)
        return StrategyResult(student=trained, models={**heads, "student": trained}, recipe=recipe)

    @staticmethod
    def test_heads(ctx, distiller: SelfDistiller, arch: str, trained: TrainedModel) -> dict[str, TrainedModel]:
        head_models = distiller.evaluated()
        best = best_vals(ctx, head_models)
        heads = {}
        with distiller:  # the heads read the student's taps
            for name, head in head_models.items():
                test = evaluate(head, ctx.data.test, ctx.task, ctx.device)
                ctx.metrics.write(epoch=int(ctx.cfg.epochs), model=name, split="test", **test)
                params = count_params(head.head) + count_params_upto(distiller.student, head.path)
                heads[name] = TrainedModel(name, "auxiliary", f"{arch}[:{head.path}]+head", head, test, best[name],
                                           checkpoint=trained.checkpoint.with_name("last.pt"),
                                           info={"tap": head.path, "params": params})
        return heads


def count_params_upto(model: nn.Module, path: str) -> int:
    """Parameters of the top-level children of ``model`` up to and including the one holding ``path``."""
    top = path.split(".")[0]
    total = 0
    for name, child in model.named_children():
        total += sum(p.numel() for p in child.parameters())
        if name == top:
            break
    return total
