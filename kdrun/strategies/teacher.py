"""Teacher only: provision the teacher with ``teacher_training`` (train and cache it), no student.

The summary reports the teacher as the trained model (``student``) as well as under ``teacher``,
so run summaries, sweeps and plots read it like any other run.
"""

from __future__ import annotations

from kdrun.provision import provision
from kdrun.strategies.base import Strategy, StrategyResult


class TeacherOnly(Strategy):
    name = "teacher"
    uses_recipe = False
    has_baseline = False

    def run(self, ctx) -> StrategyResult:
        # Seeded as the offline strategy builds it, so both train (and cache) the same teacher.
        teacher = provision(ctx, "teacher", ctx.cfg.teacher, ctx.cfg.teacher_training, "teacher")
        return StrategyResult(student=teacher, models={"teacher": teacher}, teacher=teacher)
