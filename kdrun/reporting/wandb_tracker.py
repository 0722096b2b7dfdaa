"""``logger=wandb``: the run in Weights & Biases, offline by default (``wandb/`` under the run
directory; ``wandb sync <run dir>/wandb/offline-run-*`` uploads it later). A sweep's jobs share
one group, named after the sweep directory, and the sweep report is a run of its own in the group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kdrun.errors import ConfigError
from kdrun.reporting.trackers import Tracker, params, scalars, summary_figures, sweep_dir, tags

MODES = ("offline", "online", "disabled")
TAG_CHARS = 64  # W&B's limit on one tag


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, mode: str = "offline", project: str = "kdrun", entity: str | None = None):
        try:
            import wandb  # noqa: F401 - only when logger=wandb is chosen
        except ImportError:
            raise ConfigError("logger=wandb needs Weights & Biases: pip install 'kdrun[track]'") from None
        if mode not in MODES:
            raise ConfigError(f"logger.mode={mode} must be one of {', '.join(MODES)} (offline needs no network)")
        if not str(project or "").strip():
            raise ConfigError("logger.project must be a non-empty W&B project name")
        self.mode, self.project, self.entity = mode, str(project), entity
        self.run, self.steps = None, set()

    def open(self, where: Path, name: str, **options):
        """A W&B run writing under ``where``; its own runs in one process stay apart (a sweep's jobs
        run one after another in the launcher's process)."""
        import wandb

        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True, save_code=False)
        try:
            return wandb.init(mode=self.mode, dir=str(where), project=self.project, entity=self.entity, name=name,
                              reinit="create_new", settings=settings, **options)
        except Exception as err:  # noqa: BLE001 - login, network and service errors come in many kinds
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            raise ConfigError(f"logger=wandb (mode {self.mode}) cannot start a run ({reason}); "
                              "logger.mode=offline needs no network or account") from None

    def start(self, cfg: DictConfig, run_dir: Path) -> None:
        sweep = sweep_dir()
        run_tags = tags(cfg, run_dir)
        self.run = self.open(Path(run_dir), Path(run_dir).name, config=params(cfg),
                             group=sweep.name if sweep else None, job_type="job" if sweep else "run",
                             tags=[f"{key}={run_tags[key]}"[:TAG_CHARS] for key in ("strategy", "dataset")])

    def write(self, row: dict[str, Any]) -> None:
        found = scalars(row)
        if found is None or not found[2]:
            return
        epoch, model, values = found
        step = f"{model}/epoch"
        if step not in self.steps:  # each model's curves run against its own epochs
            self.run.define_metric(step)
            self.run.define_metric(f"{model}/*", step_metric=step)
            self.steps.add(step)
        self.run.log({**values, step: epoch})

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        import wandb

        self.run.summary.update(summary_figures(summary))
        if summary.get("recipe"):
            self.run.summary["recipe"] = summary["recipe"]
            self.run.tags = (*self.run.tags, summary["recipe"][:TAG_CHARS])
        best = Path(run_dir) / "checkpoints" / "best.pt"
        if best.is_file():
            artifact = wandb.Artifact(f"student-{self.run.id}", type="model", metadata=summary.get("student") or {})
            artifact.add_file(str(best), name="best.pt", policy="immutable")  # best.pt stays as it is: no copy
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if summary.get("status") == "completed" else 1)
        flush()

    def finish_sweep(self, sweep_dir: Path, files: list[Path], status: str) -> None:
        import wandb

        run = self.open(Path(sweep_dir), f"{Path(sweep_dir).name}-report", group=Path(sweep_dir).name,
                        job_type="sweep-report", tags=[f"status={status}"])
        artifact = wandb.Artifact(f"sweep-report-{run.id}", type="sweep-report")
        for path in files:
            artifact.add_file(str(path), name=Path(path).name, policy="immutable")
        run.log_artifact(artifact)
        run.finish(exit_code=0 if status == "completed" else 1)
        flush()


def flush() -> None:
    """Stop W&B's service process: an offline run's file is complete only once it has written it out
    (finish() alone may return earlier), and a sweep's next job starts a service of its own."""
    import wandb

    wandb.teardown()
