"""Config resolvers and validation of user-facing values (one clear error, before any work)."""

from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kdrun.engine import checkpoint, perf as fast_paths
from kdrun.errors import ConfigError, KdrunError


def register_resolvers() -> None:
    """Resolvers used in conf/: ``${one_minus:${alpha}}`` and ``${if_set:${resume},a,b}``."""
    if not OmegaConf.has_resolver("one_minus"):
        OmegaConf.register_new_resolver("one_minus", lambda x: round(1.0 - float(x), 12))
    if not OmegaConf.has_resolver("if_set"):
        OmegaConf.register_new_resolver("if_set", lambda value, when_set, otherwise: otherwise if value in (None, "") else when_set)


def instantiate_user(cfg, what: str, **kwargs):
    """``hydra.utils.instantiate`` for user-chosen parts: kdrun's own errors come out
    unwrapped, anything else the target raised becomes a ConfigError naming ``what``."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, KdrunError):
            raise cause from None
        raise ConfigError(f"cannot build {what}: {cause or err}") from err


def auto_device(cuda_count: int, job_num: int | None) -> str:
    """What ``device=auto`` means: the CPU without CUDA; ``cuda`` for a single run; in a multirun
    with several visible GPUs, job n on ``cuda:{n % count}``, so parallel jobs (the joblib
    launcher) spread over the GPUs."""
    if cuda_count < 1:
        return "cpu"
    if job_num is None or cuda_count == 1:
        return "cuda"
    return f"cuda:{job_num % cuda_count}"


def _multirun_job_num() -> int | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return int(hydra_cfg.job.num) if hydra_cfg.mode == RunMode.MULTIRUN else None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return torch.device(auto_device(count, _multirun_job_num() if count > 1 else None))
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was asked for but CUDA is not available here; use device=auto or device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def _number(cfg: DictConfig, key: str, kind=float):
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"{key}={value!r} must be {'an integer' if kind is int else 'a number'}")
    return value


# summary.json values a job can hand to a sweeper (``optimize_metric``; the Optuna sweeper maximises it).
OPTIMIZE_METRICS = (
    "student.test_acc", "student.best_val_acc", "figures.gain", "figures.retention", "figures.compression",
    "figures.speedup", "teacher.test_acc", "scratch.test_acc",
)


def validate_optimize_metric(cfg: DictConfig) -> str:
    metric = cfg.get("optimize_metric", OPTIMIZE_METRICS[0])
    if metric not in OPTIMIZE_METRICS:
        raise ConfigError(f"optimize_metric={metric} is not a known metric; use one of {', '.join(OPTIMIZE_METRICS)}")
    return metric


class SweepCheck(Callback):
    """Checks optimize_metric once before a multirun's first job: a bad name would otherwise
    fail every trial of an Optuna search in turn. (Registered in conf/hydra/default.yaml.)"""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            validate_optimize_metric(config)
        except ConfigError as err:
            # Hydra turns a callback's exception into a warning; bad input ends the command instead.
            sys.stderr.write(f"{err}\n")
            sys.exit(err.exit_code)


def metric_value(summary: dict, metric: str) -> float | None:
    """The value at a dotted path of summary.json (None where the run did not produce it)."""
    value = summary
    for part in metric.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def validate(cfg: DictConfig) -> None:
    """Check every value a user is likely to get wrong; raise ConfigError naming field, value and what is allowed."""
    validate_optimize_metric(cfg)
    alpha = _number(cfg, "alpha")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha} is outside [0, 1] (the weight of the distillation term)")
    T = _number(cfg, "T")
    if T <= 0:
        raise ConfigError(f"T={T} must be > 0 (the softmax temperature)")
    for key in ("epochs", "teacher_training.epochs"):
        if _number(cfg, key, int) < 1:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)} must be >= 1")
    _number(cfg, "seed", int)
    if _number(cfg, "dataset.batch_size", int) < 1:
        raise ConfigError(f"dataset.batch_size={cfg.dataset.batch_size} must be >= 1")
    val_fraction = _number(cfg, "dataset.val_fraction")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"dataset.val_fraction={val_fraction} must be in [0, 1)")
    if cfg.grad_clip is not None and _number(cfg, "grad_clip") <= 0:
        raise ConfigError(f"grad_clip={cfg.grad_clip} must be > 0, or null for no clipping")
    if cfg.scratch not in (True, False, "auto"):
        raise ConfigError(f"scratch={cfg.scratch!r} must be true, false or auto")
    fast_paths.validate(cfg)
    validate_schedule(cfg)
    resolve_device(str(cfg.device))
    given = cfg.teacher.get("checkpoint")
    if given:
        if not Path(os.path.expanduser(str(given))).is_file():
            raise ConfigError(f"teacher.checkpoint={given} does not exist")
        checkpoint.load(given, "teacher.checkpoint")  # corrupt files fail here, before any work


def validate_schedule(cfg: DictConfig) -> None:
    from kdrun.engine.schedule import RAMPS

    for knob, spec in (cfg.get("schedule") or {}).items():
        where = f"schedule.{knob}"
        if spec.get("kind") not in RAMPS:
            raise ConfigError(f"{where}.kind={spec.get('kind')!r} must be one of {', '.join(RAMPS)}")
        if spec.get("per", "epoch") not in ("epoch", "stage"):
            raise ConfigError(f"{where}.per={spec.get('per')!r} must be epoch or stage")
        if _number(cfg, f"{where}.steps", int) < 1:
            raise ConfigError(f"{where}.steps={spec.steps} must be >= 1")
        for end in ("start", "end"):
            value = _number(cfg, f"{where}.{end}")
            if knob == "alpha" and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{where}.{end}={value} is outside [0, 1]")
            if knob == "T" and value <= 0:
                raise ConfigError(f"{where}.{end}={value} must be > 0")
            if spec.kind == "exp" and value <= 0:
                raise ConfigError(f"{where}.{end}={value} must be > 0 for an exp ramp")


# Strategy keys that list models by their option name in a config group.
MODEL_LISTS = {"peers": "student", "chain": "student", "teachers": "teacher"}


def group_option(group: str, option: str) -> dict:
    """The config of ``option`` in ``group`` (e.g. student ``cnn``), from the same search
    path as the running app (so ``--config-dir`` options work too)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    def pick() -> dict:
        composed = compose(config_name="train", overrides=[f"{group}={option}"])
        return OmegaConf.to_container(composed[group], resolve=True)

    try:
        if GlobalHydra.instance().is_initialized():
            return pick()
        with initialize_config_dir(config_dir=str(importlib.resources.files("kdrun.conf")), version_base="1.3"):
            return pick()
    except (HydraException, OmegaConfBaseException) as err:
        options = sorted(p.stem for p in (importlib.resources.files("kdrun.conf") / group).iterdir() if p.name.endswith(".yaml"))
        raise ConfigError(f"no {group} option {option!r}; available: {', '.join(options)}") from err


def expand_model_lists(cfg: DictConfig) -> None:
    """Replace option names in ``strategy.peers/chain/teachers`` by their configs, in place,
    so the saved config holds the models themselves (and a resumed run rebuilds the same)."""
    for key, group in MODEL_LISTS.items():
        listed = cfg.strategy.get(key)
        if not OmegaConf.is_list(listed):
            continue
        expanded = []
        for i, item in enumerate(listed):
            if isinstance(item, str):
                try:
                    expanded.append(group_option(group, item))
                except ConfigError as err:
                    raise ConfigError(f"strategy.{key}[{i}]={item}: {err}") from None
            elif OmegaConf.is_dict(item) and "_target_" in item and "arch" in item:
                expanded.append(item)
            else:
                raise ConfigError(f"strategy.{key}[{i}]={item!r} must be a {group} option name (or a model config with arch and _target_)")
        with open_dict(cfg):
            cfg.strategy[key] = expanded
