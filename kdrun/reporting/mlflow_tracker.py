"""``logger=mlflow``: the run in MLflow, by default in a local store ``mlruns/`` under the run
directory (under the sweep directory for a sweep, where the jobs are children of one parent run).

The local store is MLflow's SQLite backend (``mlruns/mlflow.db``, artifacts in ``mlruns/artifacts``):
MLflow 3 refuses its older plain-file store unless told otherwise, and points new users to SQLite.
``logger.tracking_uri`` names any other store or server instead.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kdrun.errors import ConfigError
from kdrun.reporting.trackers import Tracker, params, scalars, summary_figures, sweep_dir, tags

# MLflow's limits on one log_batch call and on a parameter's value.
BATCH_PARAMS, BATCH_METRICS, PARAM_CHARS = 100, 1000, 6000
STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}  # anything else: FAILED
_SCHEMES = ("sqlite", "file", "http", "https", "databricks", "postgresql", "mysql", "mssql")


def local_store(base: Path) -> tuple[str, str]:
    """The tracking URI and artifact location of the store ``mlruns/`` under ``base``."""
    store = Path(base).resolve() / "mlruns"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()



def mlflow_name(key: str) -> str:
    """``key`` with every character MLflow refuses in a parameter or metric name replaced by ``_``."""
    return re.sub(r"[^\w\-. :/]", "_", key)

class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str = "kdrun"):
        try:
            import mlflow  # noqa: F401 - only when logger=mlflow is chosen
        except ImportError:
            raise ConfigError("logger=mlflow needs MLflow: pip install 'kdrun[track]'") from None
        if tracking_uri and str(tracking_uri).split(":", 1)[0].split("+", 1)[0] not in _SCHEMES:
            raise ConfigError(f"logger.tracking_uri={tracking_uri} is not an MLflow tracking URI; use e.g. "
                              "http://host:5000, sqlite:///path/mlflow.db, or null for mlruns/ under the run directory")
        if not str(experiment or "").strip():
            raise ConfigError("logger.experiment must be a non-empty MLflow experiment name")
        self.tracking_uri, self.experiment = tracking_uri, str(experiment)
        self.client, self.run_id = None, None
        # MLflow and Alembic announce every store they create at INFO, and urllib3 every retry of an
        # unanswered request at WARNING; kdrun's log says where the store is, and its error why it failed.
        for noisy, level in (("mlflow", logging.WARNING), ("alembic", logging.WARNING), ("urllib3", logging.ERROR)):
            logging.getLogger(noisy).setLevel(level)

    def connect(self, base: Path) -> str:
        """The client for the configured store (or the local one under ``base``) and the experiment's
        id, created on first use; ConfigError when the store cannot be reached."""
        from mlflow.tracking import MlflowClient

        uri, artifacts = (self.tracking_uri, None) if self.tracking_uri else local_store(base)
        # A server that does not answer fails in seconds, not after MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(self.experiment)
            return found.experiment_id if found else self.client.create_experiment(self.experiment, artifacts)
        except Exception as err:  # noqa: BLE001 - stores fail with many kinds (HTTP, SQL, file system)
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise ConfigError(f"logger=mlflow: cannot reach the tracking store {uri} ({reason}); start the server, "
                              "fix logger.tracking_uri, or leave it null for mlruns/ under the run directory") from None

    def find(self, experiment_id: str, key: str, value: str) -> str | None:
        """The id of the newest run tagged ``key=value``, if any."""
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{value}'",
                                        order_by=["attributes.start_time DESC"], max_results=1)
        return found[0].info.run_id if found else None

    def start(self, cfg: DictConfig, run_dir: Path) -> None:
        sweep = sweep_dir()
        experiment_id = self.connect(sweep or run_dir)
        run_tags = tags(cfg, run_dir)
        if sweep is not None:
            parent = self.find(experiment_id, "kdrun.sweep_dir", str(sweep))
            if parent:
                run_tags["mlflow.parentRunId"] = parent
        resumed = self.find(experiment_id, "kdrun.run_dir", run_tags["kdrun.run_dir"]) if cfg.get("resume") else None
        if resumed:  # a resumed run carries on in the MLflow run it began
            self.run_id = resumed
            self.client.update_run(resumed, status="RUNNING")
            return
        self.run_id = self.client.create_run(experiment_id, tags=run_tags, run_name=Path(run_dir).name).info.run_id
        self.log_params(params(cfg))

    def log_params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # A parameter holds at most PARAM_CHARS characters; a long list (published numbers) is cut there.
        # MLflow names allow few characters: a Hydra choice such as ``paper_loss/fitnet@_global_`` keeps
        # its name with the others (here ``@``) replaced by ``_``.
        entries = [Param(mlflow_name(key), str(value)[:PARAM_CHARS]) for key, value in values.items()]
        for i in range(0, len(entries), BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=entries[i:i + BATCH_PARAMS])

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(mlflow_name(key), value, now, step) for key, value in values.items()]
        for i in range(0, len(entries), BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=entries[i:i + BATCH_METRICS])

    def write(self, row: dict[str, Any]) -> None:
        found = scalars(row)
        if found is not None and found[2]:
            self.log_metrics(found[2], step=found[0])

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        self.log_metrics(summary_figures(summary), step=0)
        if summary.get("recipe"):
            self.client.set_tag(self.run_id, "recipe", summary["recipe"])
        for name in ("checkpoints/best.pt", "summary.json"):
            path = Path(run_dir) / name
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), str(Path(name).parent) if "/" in name else None)
        self.client.set_terminated(self.run_id, STATUS.get(summary.get("status"), "FAILED"))

    def start_sweep(self, cfg: DictConfig, sweep_dir: Path) -> None:
        experiment_id = self.connect(sweep_dir)
        sweep_tags = {"kdrun.sweep_dir": str(Path(sweep_dir).resolve()), "kdrun.role": "sweep"}
        self.run_id = self.client.create_run(experiment_id, tags=sweep_tags, run_name=Path(sweep_dir).name).info.run_id

    def finish_sweep(self, sweep_dir: Path, files: list[Path], status: str) -> None:
        experiment_id = self.connect(sweep_dir)
        self.run_id = self.find(experiment_id, "kdrun.sweep_dir", str(Path(sweep_dir).resolve()))
        if self.run_id is None:
            return
        for path in files:
            self.client.log_artifact(self.run_id, str(path), "report")
        self.client.set_terminated(self.run_id, "FINISHED" if status == "completed" else "FAILED")
