"""An ensemble of classifiers that acts as one: its logits average the members' softened outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def average_probs_logits(logits: Sequence[torch.Tensor], weights: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Logits ``z`` with ``softmax(z / T) = sum_i w_i softmax(logits_i / T)``.

    So any term that softens its teacher's logits at ``T`` (KD, DKD) sees the
    weighted mean of the members' soft targets, and argmax(z) is the ensemble's vote.
    """
    log_probs = torch.stack([torch.log_softmax(z.float() / T, dim=1) for z in logits])
    weighted = log_probs + torch.log(weights.to(log_probs)).view(-1, 1, 1)
    return T * torch.logsumexp(weighted, dim=0)


class Ensemble(nn.Module):
    """Members' outputs averaged as probabilities (optionally weighted) at temperature ``T``.

    As a teacher its outputs follow the ``T`` knob (its schedule included), so the soft targets
    are the mean of the members' softened outputs at the recipe's temperature."""

    knobs = ("T",)

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float] | None = None, T: float = 1.0):
        super().__init__()
        self.members = nn.ModuleList(members)
        weights = torch.ones(len(members)) if weights is None else torch.tensor([float(w) for w in weights])
        self.register_buffer("weights", weights / weights.sum(), persistent=False)
        self.T = float(T)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return average_probs_logits([member(inputs) for member in self.members], self.weights, self.T)

    def apply_knobs(self, values: dict[str, float]) -> None:
        if "T" in values:
            self.T = float(values["T"])
