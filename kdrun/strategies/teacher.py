"""Teacher only: provision the teacher with ``teacher_training`` (train and cache it), no student.

The summary reports the teacher as the trained model (``student``) as well as under ``teacher``,
so run summaries, sweeps and plots read it like any other run.
"""

from __future__ import annotations

import logging
from typing import Any

from kdrun.models import count_params
from kdrun.teachers import provision

log = logging.getLogger(__name__)


class TeacherOnly:
    name = "teacher"

    def run(self, ctx) -> dict[str, Any]:
        cfg = ctx.cfg
        # Seeded as the offline strategy builds it, so both train (and cache) the same teacher.
        teacher = ctx.build_model(cfg.teacher)
        given = provision("teacher", teacher, cfg.teacher, cfg.teacher_training, ctx)
        entry = {
            "arch": str(cfg.teacher.arch), "params": count_params(teacher), "test_acc": given.test_acc,
            "best_val_acc": given.best_val_acc, "source": given.source, "path": str(given.path),
        }
        ctx.metrics.write(epoch=0, model="teacher", split="test", acc=given.test_acc, source=given.source)
        log.info("teacher %s (%s): test acc %.2f%%, at %s", entry["arch"], given.source, given.test_acc, given.path)
        return {
            "teacher": entry,
            "student": dict(entry),
            "scratch": None,
            "_models": {"student": teacher, "teacher": None},
        }
