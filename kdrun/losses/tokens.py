"""Token-level divergences between a teacher's and a student's next-token distributions.

Items are the task's scored tokens (real, predicted positions only; see
:mod:`kdrun.tasks.language`), so padding never counts; every loss is a mean over them. With
``p`` the teacher's and ``q`` the student's distribution at temperature ``T``:

- forward KL ``KL(p || q)`` (Hinton et al. 2015, per token),
- reverse KL ``KL(q || p)`` (the token-level form of MiniLLM's objective, Gu et al. 2024),
- generalised JSD ``beta KL(p || m) + (1-beta) KL(q || m)``, ``m = beta p + (1-beta) q`` (GKD,
  Agarwal et al. 2024),
- skew KL ``KL(p || lam p + (1-lam) q)`` and skew reverse KL ``KL(q || (1-lam) p + lam q)``
  (DistiLLM, Ko et al. 2024; ``lam`` is the paper's alpha and its code's ``lam``).

Each is multiplied by ``T^2`` (Hinton's gradient-scale correction; at ``T=1``, the papers'
losses). ``top_k`` / ``top_p`` truncate the teacher's distribution to its k most likely tokens /
the smallest set holding ``top_p`` of its mass (chosen at T=1); both distributions are then renormalised over
that set, so every divergence stays finite (what sparse-logit KD does for large vocabularies).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.losses.base import StepOutputs, Term


def support(teacher_logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor | None:
    """Tokens kept per item (bool ``(items, vocab)``): the teacher's ``top_k`` most likely and/or
    the smallest most-likely set with probability at least ``top_p``; None keeps every token."""
    if not top_k and top_p >= 1.0:
        return None
    keep = torch.ones_like(teacher_logits, dtype=torch.bool)
    order = teacher_logits.argsort(dim=-1, descending=True)
    ranked = torch.zeros_like(keep)
    if top_k:
        ranked[:, : min(top_k, teacher_logits.shape[-1])] = True
        keep &= torch.zeros_like(keep).scatter(1, order, ranked)
    if top_p < 1.0:
        sorted_probs = teacher_logits.softmax(dim=-1).gather(1, order)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
        keep &= torch.zeros_like(keep).scatter(1, order, before < top_p)
    return keep


# Logit of a token outside the kept set: its probability is exactly 0, yet every log stays finite,
# so no 0 * inf (and no NaN gradient) arises where both distributions are 0.
DROPPED = -1e30


def log_distributions(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float,
                      keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log q, log p)`` at temperature ``T``, renormalised over ``keep``."""
    student, teacher = student_logits.float() / T, teacher_logits.float() / T
    if keep is not None:
        student, teacher = student.masked_fill(~keep, DROPPED), teacher.masked_fill(~keep, DROPPED)
    return F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a || b)`` per item."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(weight_a * a + (1 - weight_a) * b)``, computed in log space."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return kl(log_p, log_q)


def reverse_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return kl(log_q, log_p)


def generalized_jsd(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    log_m = mixture(log_p, log_q, beta)
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def skew_kl(log_q: torch.Tensor, log_p: torch.Tensor, lam: float) -> torch.Tensor:
    return kl(log_p, mixture(log_p, log_q, lam))


def skew_reverse_kl(log_q: torch.Tensor, log_p: torch.Tensor, lam: float) -> torch.Tensor:
    return kl(log_q, mixture(log_p, log_q, 1 - lam))


def _open_unit(name: str, value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"{what}: {name}={value!r} must be in (0, 1)")
    return float(value)


class TokenDivergence(Term):
    """A divergence of the student's from the teacher's token distribution, times ``T^2``,
    averaged over the scored tokens; optionally on the teacher's ``top_k``/``top_p`` set."""

    knobs = ("T",)

    def __init__(self, T: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        super().__init__()
        self.T = float(T)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ConfigError(f"{self.symbol}: top_k={top_k!r} must be an integer >= 0 (0: every token)")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ConfigError(f"{self.symbol}: top_p={top_p!r} must be in (0, 1] (1: every token)")
        self.top_k, self.top_p = top_k, float(top_p)

    def settings(self) -> list[str]:
        shown = [self.show("T")]
        if self.top_k:
            shown.append(f"top_k={self.top_k}")
        if self.top_p < 1:
            shown.append(f"top_p={self.top_p:g}")
        return shown

    def describe(self) -> str:
        return f"{self.symbol}({','.join(self.settings())})"

    def divergence(self, log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        """Per item."""
        raise NotImplementedError

    def forward(self, outputs: StepOutputs) -> torch.Tensor:
        teacher = outputs.teacher_logits
        if teacher.shape[-1] != outputs.student_logits.shape[-1]:
            raise ConfigError(f"{self.symbol}: teacher and student vocabularies differ ({teacher.shape[-1]} and "
                              f"{outputs.student_logits.shape[-1]} tokens)")
        keep = support(teacher.float(), self.top_k, self.top_p)
        log_q, log_p = log_distributions(outputs.student_logits, teacher, self.T, keep)
        return self.divergence(log_q, log_p).mean() * self.T * self.T


class ForwardKL(TokenDivergence):
    """Hinton's KD per token: ``T^2 KL(p || q)``."""

    symbol = "KL"

    def divergence(self, log_q, log_p):
        return forward_kl(log_q, log_p)


class ReverseKL(TokenDivergence):
    """``T^2 KL(q || p)``: mode-seeking, the student need not cover every teacher mode (MiniLLM)."""

    symbol = "RKL"

    def divergence(self, log_q, log_p):
        return reverse_kl(log_q, log_p)


class GeneralizedJSD(TokenDivergence):
    """GKD's generalised Jensen-Shannon divergence with ``beta`` in (0, 1): near 0 it behaves
    as forward KL, near 1 as reverse KL (use those terms for the end points)."""

    symbol = "JSD"

    def __init__(self, beta: float = 0.5, T: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        super().__init__(T, top_k, top_p)
        self.beta = _open_unit("beta", beta, self.symbol)

    def settings(self) -> list[str]:
        return [f"beta={self.beta:g}", *super().settings()]

    def divergence(self, log_q, log_p):
        return generalized_jsd(log_q, log_p, self.beta)


class SkewKL(TokenDivergence):
    """DistiLLM's skew KL ``KL(p || lam p + (1-lam) q)``, or with ``reverse`` the skew reverse
    KL ``KL(q || (1-lam) p + lam q)``. DistiLLM's code drops the teacher's entropy from the
    forward one (a constant for the student); here it is the divergence itself, zero at q = p."""

    symbol = "SKL"

    def __init__(self, lam: float = 0.1, reverse: bool = False, T: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        self.symbol = "SRKL" if reverse else "SKL"
        super().__init__(T, top_k, top_p)
        self.lam, self.reverse = _open_unit("lam", lam, self.symbol), bool(reverse)

    def settings(self) -> list[str]:
        return [f"lam={self.lam:g}", *super().settings()]

    def divergence(self, log_q, log_p):
        return (skew_reverse_kl if self.reverse else skew_kl)(log_q, log_p, self.lam)
