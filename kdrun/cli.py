"""The ``kdrun`` command: a Hydra app around :func:`kdrun.run.run`."""

from __future__ import annotations

import io
import logging
import os
import re
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write

from kdrun import console, preflight
from kdrun.config import metric_value, register_resolvers, suggest_key
from kdrun.errors import ConfigError, Interrupted, KdrunError

log = logging.getLogger("kdrun")
register_resolvers()  # before Hydra composes: conf/ uses them


class _StderrGate(io.TextIOBase):
    """Holds stderr until the job starts, so Hydra's multi-line config errors can be
    condensed to one line; from :meth:`release` on it passes everything through."""

    def __init__(self, stream):
        self.stream, self.buffer_text, self.released = stream, [], False

    def write(self, text: str) -> int:
        if self.released:
            return self.stream.write(text)
        self.buffer_text.append(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.stream.write("".join(self.buffer_text))
            self.buffer_text.clear()

    def held(self) -> str:
        return "".join(self.buffer_text)


_failures: list[int] = []
# Errors of bad input met by jobs of this multirun so far.
_refusals: set[str] = set()


def _launch_env():
    """The multi-process launch this process is part of (torchrun, SLURM tasks), or None."""
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        return None  # spares the torch import
    from kdrun.engine.distributed import launch_env

    return launch_env()


class DistributedRun(Callback):
    """Under torchrun or SLURM tasks (registered in conf/train.yaml), before Hydra makes the
    run directory: joins the process group, gives every rank rank 0's run directory (a
    ``${now:...}`` in it may differ by a second between ranks) and keeps the other ranks
    from writing ``.hydra/`` and ``kdrun.log``."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if _launch_env() is None:
            return
        from kdrun.engine import distributed

        distributed.init_from_env(str(config.get("device", "auto")))
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = distributed.broadcast_object(str(config.hydra.run.dir))
            if not distributed.is_main():
                config.hydra.output_subdir = None
                logging_cfg = config.hydra.job_logging
                files = [name for name, handler in (logging_cfg.get("handlers") or {}).items()
                         if str(handler.get("class", "")).endswith("FileHandler")]
                for name in files:
                    del logging_cfg.handlers[name]
                if logging_cfg.get("root") and logging_cfg.root.get("handlers"):
                    logging_cfg.root.handlers = [name for name in logging_cfg.root.handlers if name not in files]

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if _launch_env() is not None:
            sys.stderr.write(
                "a multirun (-m) cannot itself run under torchrun or srun; start one data-parallel "
                "run per torchrun, or sweep with hydra/launcher=slurm and hydra.launcher.gpus_per_node=N\n"
            )
            sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def _app(cfg: DictConfig) -> float | None:
    if isinstance(sys.stderr, _StderrGate):
        sys.stderr.release()
    from kdrun.engine import distributed
    from kdrun.run import run  # the heavy imports wait until the config is known to be good

    console.VERBOSE = bool(cfg.get("verbose", False))
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    # The group options (loss=crd, ...) are known only to Hydra; kept in the config, they are saved
    # with the run (and survive resume), and experiments pick their published number by them.
    with open_dict(cfg):
        cfg.choices = {
            group: str(option) for group, option in HydraConfig.get().runtime.choices.items()
            if option is not None and not group.startswith("hydra")
        }
    try:
        summary = run(cfg)
    except KdrunError as err:
        log.debug("kdrun error", exc_info=True)
        refused = isinstance(err, ConfigError)
        if multirun and refused and str(err) in _refusals:
            # Every job so far met the same bad input: the others would too.
            sys.stderr.write("kdrun: error: the next job failed with the same error; stopping the sweep\n")
            sys.exit(err.exit_code)
        log.error("kdrun: error: %s", err)
        if refused:
            _refusals.add(str(err))
        # A stop request (Ctrl-C, a scheduler's SIGTERM) ends the whole sweep, not just this job.
        if not multirun or isinstance(err, Interrupted):
            if refused and not multirun:
                preflight.forget_new_run_dir()
            sys.exit(err.exit_code)
        _failures.append(err.exit_code)
        return None
    except Exception:
        # A bug, not bad input: keep the traceback in kdrun.log and the run's summary.
        log.exception("kdrun: unexpected error (see the traceback above; summary.json has status failed)")
        if not multirun:
            sys.exit(1)
        _failures.append(1)
        return None
    finally:
        distributed.cleanup()
    # What a sweeper optimises (hparams_search=optuna): the summary.json value named by optimize_metric.
    value = metric_value(summary, str(cfg.get("optimize_metric", "student.test_acc")))
    if value is None:
        log.warning("optimize_metric=%s: this run has no such value (e.g. figures.gain needs scratch)", cfg.get("optimize_metric"))
    return value


def _condense(text: str) -> str:
    """One line from Hydra's multi-line error text (drops the search path and hints). An unknown
    key gets the nearest known one, not Hydra's advice to add it with ``+``."""
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown and "is not in struct" in text:
        return suggest_key(unknown.group(1), sys.argv[1:])
    message, options = [], []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Config search path"):
            break
        if not line or line.startswith(("Set the environment variable", "Traceback", "full_key:", "object_type=")):
            continue
        if line.startswith("Available options in"):
            message.append(line.replace("Available options in", "available options for").rstrip(":") + ":")
            options = message
            continue
        if options is message and not line.endswith(":") and " " not in line:
            options.append(line + ",")
            continue
        message.append(line)
    return " ".join(message).rstrip(",") or "invalid command line"


def main() -> None:
    gate = _StderrGate(sys.stderr)
    sys.stderr = gate
    try:
        _app()
    except SystemExit as exit_:
        if not gate.released and exit_.code not in (0, None):
            # Hydra rejected the command line or the config before the job began.
            gate.stream.write(f"kdrun: error: {_condense(gate.held())}\n")
            gate.buffer_text.clear()
            sys.stderr = gate.stream
            sys.exit(2)
        raise
    finally:
        gate.release()
        sys.stderr = gate.stream
    if _failures:
        sys.exit(max(_failures))


if __name__ == "__main__":
    main()
