"""``run(cfg)``: one kdrun job from a composed config to a metrics dict (no shell needed)."""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kdrun import data as datasets
from kdrun.config import expand_model_lists, instantiate_user, register_resolvers, resolve_device, validate
from kdrun.context import RunContext
from kdrun.engine import distributed
from kdrun.engine import perf as fast_paths
from kdrun.engine.loop import STOP
from kdrun.errors import ConfigError, Interrupted, KdrunError
from kdrun.reporting.metrics import MetricsLog
from kdrun.reporting.summary import distillation_figures, headline, versions, write_summary

log = logging.getLogger(__name__)

SPEED_BATCH = 128  # inputs per forward when timing student against teacher


def hydra_run_dir() -> Path | None:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def has_checkpoints(run_dir: Path) -> bool:
    """Whether a run left checkpoints: ``checkpoints/last.pt``, or a stage's of a multi-stage strategy."""
    return any((run_dir / "checkpoints").glob("**/last.pt"))


def resumed_config(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """The saved config of the run to resume, and its directory.

    ``config.yaml`` keeps the interpolations (schedules re-resolve ``${T}`` and
    ``${alpha}`` per epoch); runs from before it existed resume from ``config_resolved.yaml``.
    """
    run_dir = Path(os.path.expanduser(str(cfg.resume))).resolve()
    saved = next((path for path in (run_dir / "config.yaml", run_dir / "config_resolved.yaml") if path.is_file()), None)
    if not has_checkpoints(run_dir) or saved is None:
        raise ConfigError(f"resume={cfg.resume}: no kdrun run there (config_resolved.yaml or checkpoints/last.pt is missing)")
    resumed = OmegaConf.load(saved)
    resumed.resume = str(run_dir)
    return resumed, run_dir


@contextmanager
def stop_on_signals():
    """Ctrl-C and SIGTERM (a scheduler's stop) ask the loop to stop at the next step;
    a second Ctrl-C stops at once."""

    def request_stop(signum, frame):
        if signum == signal.SIGINT and STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()

    STOP.clear()
    try:
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        STOP.clear()


@contextmanager
def run_log(run_dir: Path):
    """Outside Hydra (tests, notebooks) still write kdrun.log; under Hydra its handler does."""
    if HydraConfig.initialized():
        yield
        return
    handler = logging.FileHandler(run_dir / "kdrun.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    package_log = logging.getLogger("kdrun")
    package_log.addHandler(handler)
    level = package_log.level
    package_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        package_log.removeHandler(handler)
        package_log.setLevel(level)
        handler.close()


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one job and return its summary; raises KdrunError subclasses on failure.

    ``summary.json`` is written whatever happens: ``completed``, ``failed`` (with
    the error) or ``interrupted``. Started by torchrun or as SLURM tasks, the job runs
    data-parallel (:mod:`kdrun.engine.distributed`) and rank 0 alone writes files.
    """
    register_resolvers()
    if cfg.get("resume"):
        cfg, run_dir = resumed_config(cfg)
    with distributed.process_group(str(cfg.device)):
        return _run(cfg, run_dir)


def _run(cfg: DictConfig, run_dir: str | Path | None) -> dict[str, Any]:
    distributed.quiet_other_ranks()
    main = distributed.is_main()
    # Every rank works in rank 0's directory (a ${now:...} in its name may differ between ranks).
    run_dir = Path(distributed.broadcast_object(
        str(run_dir or hydra_run_dir() or Path("outputs/runs") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    ))
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    summary: dict[str, Any] = {
        "status": "running", "error": None, "name": cfg.get("name"), "strategy": None, "dataset": None,
        "student": None, "teacher": None, "scratch": None, "models": {}, "wall_time_s": None, "run_dir": str(run_dir),
        "seed": cfg.get("seed"), "versions": versions(),
    }
    if not cfg.get("resume") and distributed.broadcast_object(has_checkpoints(run_dir)):
        # Raised before summary.json is touched: the earlier run's files stay as they are.
        raise ConfigError(
            f"{run_dir} already holds a run's checkpoints; carry it on with resume={run_dir} "
            "or choose another hydra.run.dir"
        )
    with run_log(run_dir) if main else nullcontext(), stop_on_signals():
        try:
            validate(cfg)
            if int(cfg.dataset.batch_size) % distributed.world_size():
                raise ConfigError(
                    f"dataset.batch_size={cfg.dataset.batch_size} must be divisible by the {distributed.world_size()} "
                    f"processes (it is the global batch; each process takes 1/{distributed.world_size()} of it)"
                )
            expand_model_lists(cfg)
            resolved = OmegaConf.to_container(cfg, resolve=True)
            if main:
                (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(resolved))
                (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=False))
            device = distributed.local_device(str(cfg.device)) or resolve_device(str(cfg.device))
            perf = fast_paths.resolve(cfg, device)
            torch.manual_seed(int(cfg.seed))
            with distributed.main_first():  # rank 0 downloads or generates the data, the others then read it
                data = datasets.build(cfg.dataset, seed=int(cfg.seed), pin_memory=perf.pin_memory,
                                      persistent_workers=perf.persistent_workers)
            data = perf.place_data(data)
            summary["dataset"] = {"name": data.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape)}
            log.info(
                "kdrun %s: %s on %s (%s), run dir %s", summary["versions"]["kdrun"], cfg.strategy.name,
                data.name, device, run_dir,
            )
            log.info("%s", perf.describe())
            if distributed.active():
                log.info(
                    "Data parallel: %d processes, %d samples per process and step (dataset.batch_size=%d is the "
                    "global batch); rank 0 writes the files", distributed.world_size(),
                    int(cfg.dataset.batch_size) // distributed.world_size(), int(cfg.dataset.batch_size),
                )
            if data.val_is_test:
                log.warning("dataset.val_fraction=0: validation uses the test set, so best.pt is selected on test")
            strategy = instantiate_user(cfg.strategy.runner, f"strategy {cfg.strategy.name}")
            summary["strategy"] = str(cfg.strategy.name)
            ctx = RunContext(cfg=cfg, run_dir=run_dir, data=data, device=device, metrics=MetricsLog.for_run(run_dir, cfg.get("logger")),
                             perf=perf)
            distributed.barrier()  # the other ranks have read metrics.jsonl (resume) before rank 0 appends
            sections = strategy.run(ctx)
            trained = sections.pop("_models")
            summary.update(sections)
            probe = next(iter(data.test))[0][:SPEED_BATCH].to(device)
            if cfg.get("published"):
                summary["published"] = OmegaConf.to_container(cfg.published, resolve=True)
            summary["figures"] = distillation_figures(summary, trained["student"], trained.get("teacher"), probe)
            summary["status"] = "completed"
            log.info("Result:\n%s", headline(summary))
        except (KeyboardInterrupt, Interrupted) as err:
            summary.update(status="interrupted", error=str(err) or "interrupted by Ctrl-C")
            log.warning("%s", summary["error"])
            raise Interrupted(
                f"interrupted; checkpoints/last.pt holds the last completed epoch; carry on with: kdrun resume={run_dir}"
            ) from err
        except KdrunError as err:
            summary.update(status="failed", error=str(err))
            raise
        except Exception as err:
            summary.update(status="failed", error=f"{type(err).__name__}: {err}")
            raise
        finally:
            summary["wall_time_s"] = round(time.time() - started, 3)
            if main:
                write_summary(run_dir, summary)
    return summary
