"""Online distillation, deep mutual learning (Zhang et al., CVPR 2018): peers learn together
from scratch, each on the recipe (CE + KD) towards every other peer; no pretrained teacher."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
from omegaconf import OmegaConf

from kdrun.distill import DistillTask
from kdrun.errors import ConfigError
from kdrun.losses import StepOutputs, WeightedSum, build_recipe
from kdrun.models.ensemble import Ensemble, average_probs_logits
from kdrun.strategies.common import (
    best_val_accs,
    export_student,
    finish_model,
    knob_schedule,
    prepare,
    require_logit_recipe,
    scratch_baseline,
    scratch_section,
    student_section,
    student_training,
)
from kdrun.teachers import fit_spec

log = logging.getLogger(__name__)


class MutualTask(DistillTask):
    """All peers in one step: peer i's loss is the recipe averaged over teachers j != i
    (their logits detached), and the peers' losses are summed. The "student" the loop
    evaluates (and keeps in best.pt) is the peers' ensemble; each peer is logged too."""

    def __init__(self, peers: dict[str, nn.Module], recipe: WeightedSum, knobs=None):
        # The teachers are the peers themselves, so there is no teacher to check taps against.
        super().__init__(Ensemble(list(peers.values())), recipe, None, knobs, check=False)
        self.labels = list(peers)

    def peers(self) -> dict[str, nn.Module]:
        return dict(zip(self.labels, self.student.members))

    def extra_evaluations(self) -> dict[str, nn.Module]:
        return self.peers()

    def loss(self, inputs, labels, index=None, progress=None):
        logits = [peer(inputs) for peer in self.student.members]
        total, part_sums = 0.0, {}
        for i, own in enumerate(logits):
            for j, other in enumerate(logits):
                if i == j:
                    continue
                outputs = StepOutputs(student_logits=own, labels=labels, teacher_logits=other.detach(), progress=progress)
                loss, parts = self.recipe(outputs)
                share = 1.0 / (len(logits) - 1)
                total = total + share * loss
                for name, value in parts.items():
                    part_sums[name] = part_sums.get(name, 0.0) + share * value / len(logits)
        return total, part_sums, average_probs_logits([z.detach() for z in logits], self.student.weights)

    def setup(self, inputs, labels) -> None:
        with torch.no_grad():
            logits = self.student.members[0](inputs)
            self.recipe.setup(StepOutputs(student_logits=logits, labels=labels, teacher_logits=logits))


class Online:
    name = "online"

    def run(self, ctx) -> dict[str, Any]:
        cfg = ctx.cfg
        peer_cfgs = peer_configs(cfg)
        recipe = build_recipe(cfg.loss)
        require_logit_recipe(recipe, "online")
        if not recipe.needs_teacher:
            raise ConfigError(f"strategy=online needs a recipe with a distillation term (e.g. loss=kd); got {recipe}")
        log.info("Deep mutual learning: %d peers (%s); each learns with %s towards the others",
                 len(peer_cfgs), ", ".join(str(c.arch) for c in peer_cfgs.values()), recipe)
        seed = int(cfg.seed)
        peers = {label: ctx.build_model(peer_cfg, seed + i) for i, (label, peer_cfg) in enumerate(peer_cfgs.items())}
        task = prepare(ctx, MutualTask(peers, recipe, knobs=knob_schedule(ctx, recipe)))
        ckpt_dir = ctx.run_dir / "checkpoints" / "peers"
        meta = {"arch": "ensemble(" + ",".join(str(c.arch) for c in peer_cfgs.values()) + ")",
                "config": OmegaConf.to_container(cfg, resolve=True)}
        result = ctx.fit(task, fit_spec(student_training(cfg)), "peers", ckpt_dir, meta, title=f"{len(peers)} peers")

        best_val = best_val_accs(ctx, peers)
        trained = {
            label: finish_model(ctx, label, peer, "peer", str(peer_cfgs[label].arch), result.epochs, best_val[label],
                                ctx.run_dir / "checkpoints" / label)
            for label, peer in peers.items()
        }
        ensemble = finish_model(ctx, "ensemble", task.student, "ensemble", meta["arch"], result.epochs, result.best_val_acc, ckpt_dir)
        chosen = max(trained.values(), key=lambda t: t.best_val_acc or 0.0)
        export_student(ctx, chosen)
        scratch = scratch_baseline(ctx)
        models = {**{label: t.entry for label, t in trained.items()}, "ensemble": ensemble.entry}
        if scratch is not None:
            models["scratch"] = scratch.entry
        return {
            "recipe": str(recipe),
            "recipe_weights": dict(recipe.weights),
            "teacher": None,
            "student": student_section(chosen),
            "scratch": scratch_section(scratch),
            "ensemble": {"test_acc": ensemble.test_acc, "members": list(trained)},
            "models": models,
            "_models": {"student": chosen.model, "teacher": None},
        }


def peer_configs(cfg) -> dict[str, Any]:
    """``strategy.peers``: a count (copies of ``student``, each from its own seed) or a list
    of student options (``strategy.peers=[small,cnn]``)."""
    peers = cfg.strategy.peers
    if isinstance(peers, int):
        if peers < 2:
            raise ConfigError(f"strategy.peers={peers} must be >= 2 (mutual learning needs someone to learn from)")
        listed = [cfg.student] * peers
    else:
        listed = list(peers)
        if len(listed) < 2:
            raise ConfigError(f"strategy.peers lists {len(listed)} model(s); mutual learning needs at least 2")
    return {f"peer{i}": OmegaConf.create(peer) if not OmegaConf.is_config(peer) else peer for i, peer in enumerate(listed, 1)}

