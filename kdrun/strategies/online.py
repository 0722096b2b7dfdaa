"""Online distillation, deep mutual learning (Zhang et al., CVPR 2018): peers learn together
from scratch, each on the recipe (CE + KD) towards every other peer; no pretrained teacher."""

from __future__ import annotations

import logging

import torch.nn as nn
from omegaconf import OmegaConf

from kdrun.distiller import Distiller
from kdrun.losses import StepOutputs, WeightedSum
from kdrun.losses.recipe import recipe_from
from kdrun.models.ensemble import Ensemble, average_probs_logits
from kdrun.strategies.base import Strategy, StrategyResult, model_list, number_in
from kdrun.strategies.common import best_of, best_vals, export_student, finish, run_meta, train
from kdrun.tasks import Task
from kdrun.tasks import language

log = logging.getLogger(__name__)


class MutualDistiller(Distiller):
    """All peers in one step: peer i's loss is the recipe averaged over teachers j != i (their
    logits detached), and the peers' losses are summed. The "student" the loop evaluates (and
    keeps in best.pt) is the peers' ensemble; each peer is validated too."""

    def __init__(self, peers: dict[str, nn.Module], recipe: WeightedSum, task: Task):
        # The teachers are the peers themselves, so there is no teacher to check taps against.
        super().__init__(Ensemble(list(peers.values())), recipe, task, None, check=False)
        self.names = list(peers)

    def evaluated(self) -> dict[str, nn.Module]:
        return dict(zip(self.names, self.student.members))

    def forward(self, batch, progress=None):
        scored = [self.task.scored(self.task.forward(peer, batch), batch) for peer in self.student.members]
        logits, labels = [z for z, _ in scored], scored[0][1]
        share = 1.0 / (len(logits) - 1)
        total, part_sums = 0.0, {}
        for i, own in enumerate(logits):
            for j, other in enumerate(logits):
                if i == j:
                    continue
                outputs = StepOutputs(student_logits=own, labels=labels, teacher_logits=other.detach(), progress=progress)
                loss, parts = self.recipe(outputs)
                total = total + share * loss
                for name, value in parts.items():
                    part_sums[name] = part_sums.get(name, 0.0) + share * value / len(logits)
        return total, part_sums, average_probs_logits([z.detach() for z in logits], self.student.weights), labels


class Online(Strategy):
    name = "online"
    needs_distillation = True
    logit_terms_only = True

    def check(self, cfg) -> None:
        language.refuse(cfg, self.name, "its peers are held and tested as a classifier ensemble")
        peers = cfg.strategy.get("peers")
        if isinstance(peers, int) and not isinstance(peers, bool):
            number_in(cfg, "peers", 2, kind=int, why=": mutual learning needs someone to learn from")
        else:
            model_list(cfg, "peers", "[mlp_small,cnn_small]", at_least=2)

    def run(self, ctx) -> StrategyResult:
        cfg = ctx.cfg
        peer_cfgs = peer_configs(cfg)
        recipe = recipe_from(cfg)
        log.info("Deep mutual learning: %d peers (%s); each learns with %s towards the others",
                 len(peer_cfgs), ", ".join(str(c.arch) for c in peer_cfgs.values()), recipe)
        peers = {name: ctx.build_model(peer_cfg, int(cfg.seed) + i) for i, (name, peer_cfg) in enumerate(peer_cfgs.items())}
        distiller = MutualDistiller(peers, recipe, ctx.task)
        arch = "ensemble(" + ",".join(str(c.arch) for c in peer_cfgs.values()) + ")"
        ckpt_dir = ctx.run_dir / "checkpoints" / "peers"
        meta = run_meta(ctx, arch)
        result = train(ctx, "peers", distiller, arch=arch, ckpt_dir=ckpt_dir, title=f"{len(peers)} peers", meta=meta)
        best = best_vals(ctx, peers)
        trained = {name: finish(ctx, name, peer, "peer", str(peer_cfgs[name].arch), ctx.run_dir / "checkpoints" / name,
                                epochs=result.epochs, best_val=best[name])
                   for name, peer in peers.items()}
        ensemble = finish(ctx, "ensemble", distiller.student, "ensemble", arch, ckpt_dir, epochs=result.epochs,
                          best_val=result.best_val, meta=meta)
        ensemble.info["members"] = list(trained)
        chosen = best_of(list(trained.values()), ctx)
        export_student(ctx, chosen)
        return StrategyResult(student=chosen, models={**trained, "ensemble": ensemble}, recipe=recipe)


def peer_configs(cfg) -> dict:
    """``strategy.peers``: a count (copies of ``student``, each from its own seed) or a list
    of model options (``strategy.peers=[mlp_small,cnn_small]``)."""
    peers = cfg.strategy.peers
    listed = [cfg.student] * peers if isinstance(peers, int) else list(peers)
    return {f"peer{i}": OmegaConf.create(peer) if not OmegaConf.is_config(peer) else peer for i, peer in enumerate(listed, 1)}
