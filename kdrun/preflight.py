"""Checks before Hydra writes anything: a refused run or sweep changes nothing on disk.

Registered as a Hydra callback (``conf/hydra/default.yaml``). Before a single run Hydra
creates the run directory and writes ``.hydra/``; before a multirun the launcher makes the
sweep directory. So the config is validated here first, where a failure still leaves the disk
as it was: values and keys (:func:`kdrun.config.validate`), the run directory (not a finished
run's, writable), a resume (the directory exists and its config is safe to rebuild), and in
a multirun every job's config, each distinct error printed once.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from kdrun.config import validate, validate_optimize_metric
from kdrun.errors import ConfigError


def job_config(config: DictConfig) -> DictConfig:
    """The job's part of Hydra's config (without ``hydra``), as the app receives it."""
    cfg = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def holds_run(path: Path) -> bool:
    return (path / "summary.json").is_file() or any((path / "checkpoints").glob("**/*.pt"))


def check_writable(path: Path, key: str) -> None:
    """``path`` can be created (or written): its first existing ancestor is a writable directory."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={path}: {probe} is a file, not a directory; choose another {key}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: {probe} is not writable; choose a writable {key} (e.g. under your home)")


# The run directory this command is about to create (None when it existed already, or for a resume).
NEW_RUN_DIR: Path | None = None


def forget_new_run_dir() -> None:
    """A run refused after Hydra made its directory (bad input found only once the data or the
    models were built) leaves nothing behind: the directory this command created goes, unless it
    already holds checkpoints."""
    global NEW_RUN_DIR
    if NEW_RUN_DIR is not None and NEW_RUN_DIR.is_dir() and not any((NEW_RUN_DIR / "checkpoints").glob("**/*.pt")):
        logging.shutdown()  # the log file handler holds kdrun.log open
        shutil.rmtree(NEW_RUN_DIR, ignore_errors=True)
    NEW_RUN_DIR = None


def check_run(config: DictConfig) -> None:
    """A single run: its config, its directory, or the run it resumes."""
    global NEW_RUN_DIR
    cfg = job_config(config)
    if cfg.get("resume"):
        from kdrun.resume import saved_config

        others = [o for o in config.hydra.overrides.task if not o.startswith(("resume=", "hydra."))]
        if others:
            raise ConfigError(f"resume uses the saved config of the run; drop the other overrides ({' '.join(others)})")
        saved, _ = saved_config(str(cfg.resume))
        validate(saved)
        return
    validate(cfg)
    run_dir = Path(str(config.hydra.run.dir))
    if holds_run(run_dir):
        raise ConfigError(
            f"{run_dir} already holds a run; carry it on with resume={run_dir} or choose another hydra.run.dir"
        )
    check_writable(run_dir, "hydra.run.dir")
    NEW_RUN_DIR = None if run_dir.exists() else run_dir


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides as the basic sweeper will make them; None for other sweepers
    (an Optuna search draws its values as it goes)."""
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create()
    overrides = parser.parse_overrides([*params, *config.hydra.overrides.task])
    batches = BasicSweeper.split_arguments(overrides, None)
    return [list(job) for batch in batches for job in batch]


def compose_job(config: DictConfig, overrides: list[str]) -> DictConfig:
    loader = GlobalHydra.instance().config_loader()
    return loader.load_configuration(str(config.hydra.job.config_name), overrides, RunMode.MULTIRUN)


def check_sweep(config: DictConfig) -> None:
    validate_optimize_metric(config)
    jobs = sweep_jobs(config)
    if jobs is None:  # validate what every trial shares
        fixed = [o for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)) if not o.is_sweep_override()]
        validate(job_config(compose_job(config, [o.input_line for o in fixed])))
    else:
        failures: dict[str, list[int]] = {}
        for number, overrides in enumerate(jobs):
            try:
                validate(job_config(compose_job(config, overrides)))
            except ConfigError as err:
                failures.setdefault(str(err), []).append(number)
        if failures:
            lines = [message if len(numbers) == len(jobs) else f"{message} (job{'s' if len(numbers) > 1 else ''} "
                     f"{', '.join(map(str, numbers))} of {len(jobs)})" for message, numbers in failures.items()]
            raise ConfigError("; ".join(lines))
    check_writable(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir")


def refuse(err: ConfigError) -> None:
    # Hydra turns a callback's exception into a warning; bad input ends the command instead.
    # (kdrun.cli.main puts "kdrun: error:" in front of what was written before the job began.)
    sys.stderr.write(f"{err}\n")
    sys.exit(err.exit_code)


class Preflight(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            check_run(config)
        except ConfigError as err:
            refuse(err)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            check_sweep(config)
        except ConfigError as err:
            refuse(err)
