"""Experiment trackers: where a run's figures go besides ``metrics.jsonl`` (the ``logger`` group).

A tracker hears a run's start (its resolved config, flattened, as parameters; strategy and dataset as
tags), every row written to ``metrics.jsonl``, and its end (the summary's figures, the recipe, the
student checkpoint). In a sweep it also hears the sweep's start and end (from the Hydra callback
:class:`kdrun.reporting.report_cli.SweepReport`), where it keeps one parent run or group and the
sweep report. Only rank 0 of a data-parallel run has a tracker.

``metrics.jsonl`` and ``summary.json`` stay the record: a tracker that fails during a run is
switched off with one warning, and the run goes on; one that cannot start refuses the run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# summary.json sections whose numbers a tracker records at the end of a run, as "<section>.<key>".
SUMMARY_SECTIONS = ("student", "teacher", "scratch", "figures")


class Tracker:
    """The interface; every hook does nothing unless a tracker needs it."""

    name = "tracker"

    def start(self, cfg: DictConfig, run_dir: Path) -> None:
        """Before training: the run's parameters and tags."""

    def write(self, row: dict[str, Any]) -> None:
        """One row of ``metrics.jsonl`` (already cleaned of tensors and non-finite floats)."""

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        """After ``summary.json`` is written, whatever the run's status."""

    def start_sweep(self, cfg: DictConfig, sweep_dir: Path) -> None:
        """Before the first job of a multirun."""

    def finish_sweep(self, sweep_dir: Path, files: list[Path], status: str) -> None:
        """After the sweep report is written: its ``files``; ``status`` completed or failed."""


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"dataset.batch_size": 128, ...}``; lists stay one value (as JSON)."""
    if not isinstance(node, dict):
        return {prefix: json.dumps(node) if isinstance(node, (list, tuple)) else node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def params(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config, flattened: what a tracker records as the run's parameters."""
    return flatten(OmegaConf.to_container(cfg, resolve=True))


def tags(cfg: DictConfig, run_dir: Path) -> dict[str, str]:
    return {"kdrun.run_dir": str(Path(run_dir).resolve()), "strategy": str(cfg.strategy.name),
            "dataset": str(cfg.dataset.name), "teacher": str(cfg.teacher.get("arch")), "student": str(cfg.student.get("arch"))}


def scalars(row: dict[str, Any]) -> tuple[int, str, dict[str, float]] | None:
    """A metrics row as (epoch, model, ``{"<model>/<split>/<key>": value}``); None for a row without
    an epoch. Every tracker names values as TensorBoard does, so the same curve has one name."""
    if not isinstance(row.get("epoch"), int):
        return None
    model = row.get("model", "run")
    prefix = f"{model}/{row.get('split', 'all')}"
    values = {f"{prefix}/{key}": float(value) for key, value in row.items()
              if key not in ("epoch", "model", "split") and isinstance(value, (int, float)) and not isinstance(value, bool)}
    return row["epoch"], model, values


def summary_figures(summary: dict[str, Any]) -> dict[str, float]:
    """The numbers of the summary's student, teacher, scratch and figures sections, and the wall time,
    keyed as ``optimize_metric`` names them (``student.test_acc``, ``figures.gain``)."""
    found = {"wall_time_s": summary.get("wall_time_s")}
    for section in SUMMARY_SECTIONS:
        for key, value in (summary.get(section) or {}).items():
            found[f"{section}.{key}"] = value
    return {key: float(value) for key, value in found.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def sweep_dir() -> Path | None:
    """The sweep directory when this process runs a job of a Hydra multirun; None otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(str(HydraConfig.get().sweep.dir)).resolve()


def build(logger: DictConfig | None) -> Tracker | None:
    """The tracker the ``logger`` config group picks (None for ``logger=none``)."""
    from kdrun.config import instantiate_user

    if not logger or not logger.get("sink"):
        return None
    return instantiate_user(logger.sink, f"logger {logger.get('name')}")


class Guarded(Tracker):
    """A tracker whose failures during a run become one warning, after which it is switched off
    (the run's own files have every row). Starting is not guarded: a tracker that cannot start
    refuses the run before any work, with one line."""

    def __init__(self, inner: Tracker):
        self.inner, self.name = inner, inner.name
        self.broken: str | None = None

    def start(self, cfg: DictConfig, run_dir: Path) -> None:
        self.inner.start(cfg, run_dir)

    def write(self, row: dict[str, Any]) -> None:
        self._call("write", row)

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        self._call("finish", summary, run_dir)

    def _call(self, hook: str, *args) -> None:
        if self.broken:
            return
        try:
            getattr(self.inner, hook)(*args)
        except Exception as err:  # noqa: BLE001 - a tracker's hiccup must not cost the training
            self.broken = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            log.warning("logger=%s failed (%s); it records nothing more for this run (metrics.jsonl and "
                        "summary.json have everything)", self.name, self.broken, exc_info=log.isEnabledFor(logging.DEBUG))


def start(logger: DictConfig | None, cfg: DictConfig, run_dir: Path) -> Guarded | None:
    """The run's tracker, started; None without one."""
    tracker = build(logger)
    if tracker is None:
        return None
    guarded = Guarded(tracker)
    guarded.start(cfg, Path(run_dir))
    return guarded
