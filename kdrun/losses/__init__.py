"""Loss terms and the weighted-sum recipe.

A term is a small ``nn.Module`` (see :class:`kdrun.losses.base.Term`); a loss
config maps part names to ``{weight, _target_, ...}`` so that configs compose
by merging (``loss=[kd,fitnet]``) and weights are set as ``loss.kd.weight=...``.
"""

from kdrun.losses.base import StepOutputs, Term
from kdrun.losses.recipe import WeightedSum, build_recipe

__all__ = ["StepOutputs", "Term", "WeightedSum", "build_recipe"]
