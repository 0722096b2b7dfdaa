"""Tasks: what a batch is, how a model's outputs are scored, and which metrics a run reports.

The training loop, evaluation, best-checkpoint selection, the summary, the headline, sweep
reports and Optuna read metric names and directions from the task; nothing else assumes
accuracy. See :class:`kdrun.tasks.base.Task`.
"""

from kdrun.tasks.base import IGNORE, Batch, Metric, Task
from kdrun.tasks.classification import Classification

__all__ = ["IGNORE", "Batch", "Classification", "Metric", "Task"]
