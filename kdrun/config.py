"""Config resolvers and validation of user-facing values (one clear error, before any work)."""

from __future__ import annotations

import difflib
import importlib.resources
import math
import os
import re
from pathlib import Path

import torch
import yaml
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kdrun.engine import checkpoint, perf as fast_paths
from kdrun.engine.schedule import RAMPS
from kdrun.errors import ConfigError, KdrunError
from kdrun.tasks import language


def job_dir(number, overrides: str = "") -> str:
    """A sweep job's directory name: the zero-padded job number (so they sort in order) and its
    overrides, with ``=`` and ``,`` (and anything else a command line would need quoted) replaced,
    so ``kdrun resume=<sweep>/003_T-4_alpha-0.9`` works as printed."""
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(overrides).replace(",", "_").replace("=", "-")).strip("-")
    return f"{int(number):03d}" + (f"_{safe}" if safe else "")


def register_resolvers() -> None:
    """Resolvers used in conf/: ``${one_minus:${alpha}}``, ``${if_set:${resume},a,b}`` and
    ``${job_dir:${hydra.job.num},${hydra.job.override_dirname}}``."""
    if not OmegaConf.has_resolver("one_minus"):
        OmegaConf.register_new_resolver("one_minus", lambda x: round(1.0 - float(x), 12))
    if not OmegaConf.has_resolver("job_dir"):
        OmegaConf.register_new_resolver("job_dir", job_dir)
    if not OmegaConf.has_resolver("optimize_direction"):
        OmegaConf.register_new_resolver("optimize_direction", optimize_direction)
        OmegaConf.register_new_resolver("task_select", lambda task_target: get_class(str(task_target)).select)
    if not OmegaConf.has_resolver("if_set"):
        OmegaConf.register_new_resolver("if_set", lambda value, when_set, otherwise: otherwise if value in (None, "") else when_set)


def optimize_direction(metric: str, task_target: str) -> str:
    """``maximize`` or ``minimize``: how a sweeper treats ``optimize_metric`` under the task whose
    class is ``task_target`` (perplexity and loss go down; figures are signed so that up is better)."""
    section, _, key = str(metric).rpartition(".")
    name = key.removeprefix("best_val_").removeprefix("test_")
    if section != "figures":
        for task_metric in get_class(str(task_target)).metrics:
            if task_metric.name == name:
                return "maximize" if task_metric.higher_is_better else "minimize"
    return "maximize"


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
    """The number at ``key``; a ConfigError naming the field for anything else (a string, a bool,
    nan or inf)."""
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as err:  # an interpolation that does not resolve
        raise ConfigError(f"{key} cannot be read ({str(err).splitlines()[0]})") from err
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"{key}={value!r} must be {what}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value} must be a finite number")
    return value


def _at_least(cfg: DictConfig, key: str, low: float, kind=float, strict: bool = False, why: str = "") -> None:
    value = _number(cfg, key, kind)
    if value < low or (strict and value == low):
        raise ConfigError(f"{key}={value} must be {'>' if strict else '>='} {low:g}{why}")


def check_finite_tree(node, where: str) -> None:
    """No nan or inf anywhere under ``where`` (loss settings, optimizer, schedules)."""
    if isinstance(node, dict):
        for key, value in node.items():
            check_finite_tree(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_finite_tree(value, f"{where}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{where}={node} must be a finite number")


# summary.json figures a job can hand to a sweeper beside the task's metrics (``optimize_metric``).
FIGURES = ("figures.gain", "figures.retention", "figures.compression", "figures.speedup")


def optimize_metrics(task_target: str) -> tuple[str, ...]:
    """The summary.json values a sweeper may optimise under a task: each model's test metrics, the
    student's best validation value of the selection metric, and the figures."""
    task = get_class(str(task_target))
    def tests(section: str) -> tuple[str, ...]:
        return tuple(f"{section}.test_{metric.name}" for metric in task.metrics)

    return (*tests("student"), f"student.best_val_{task.select}", *FIGURES, *tests("teacher"), *tests("scratch"))


def validate_optimize_metric(cfg: DictConfig) -> str:
    allowed = optimize_metrics(cfg.task._target_)
    metric = cfg.get("optimize_metric", allowed[0])
    if metric not in allowed:
        raise ConfigError(f"optimize_metric={metric} is not a known metric of this task; use one of "
                          f"{', '.join(allowed)}")
    return metric


def metric_value(summary: dict, metric: str) -> float | None:
    """The value at a dotted path of summary.json (None where the run did not produce it)."""
    value = summary
    for part in metric.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def top_level_keys() -> set[str]:
    """The keys a composed kdrun config may have at its top: train.yaml's, its groups', and what the
    command line adds (``choices``)."""
    text = (importlib.resources.files("kdrun.conf") / "train.yaml").read_text()
    train = yaml.safe_load(text)
    defaults = train.pop("defaults", [])
    groups = {next(iter(item)) if isinstance(item, dict) else str(item) for item in defaults}
    groups = {group.split("@")[-1].split("/")[-1].removeprefix("override ").strip() for group in groups}
    return (set(train) | groups | {"choices", "hydra"}) - {"_self_"}


def check_keys(cfg: DictConfig) -> None:
    """An unknown top-level key (a typo added with ``+``) is refused with the nearest known one."""
    known = top_level_keys()
    for key in cfg.keys():
        if key not in known:
            raise ConfigError(suggest_key(str(key), []))


def suggest_key(key: str, argv: list[str]) -> str:
    """The error for an unknown ``key`` on the command line, with the nearest known key: among
    the top-level keys, or the keys beside it in the config composed with the command's group
    choices (``loss=dkd loss.dkd.Tt=3`` -> ``T``)."""
    parent, _, leaf = key.rpartition(".")
    if not parent:
        known = sorted(top_level_keys() - {"hydra", "choices"})
    else:
        from hydra import compose, initialize_config_dir

        choices = [a for a in argv if "=" in a and "." not in a.split("=", 1)[0] and not a.startswith(("+", "~", "-"))]
        try:
            with initialize_config_dir(config_dir=str(importlib.resources.files("kdrun.conf")), version_base="1.3"):
                node = OmegaConf.select(compose(config_name="train", overrides=choices), parent)
            known = sorted(node.keys()) if OmegaConf.is_dict(node) else []
        except Exception:  # noqa: BLE001 - a suggestion is a courtesy; the error stands without it
            known = []
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else (
        f"; the keys there are {', '.join(known)}" if known and len(known) <= 30 else "")
    return f"{key} is not a kdrun setting{hint} (kdrun --cfg job shows the whole config)"


def check_name(cfg: DictConfig) -> None:
    """``name`` becomes one directory name under outputs/runs/: one path component."""
    name = str(cfg.get("name"))
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise ConfigError(f"name={name!r} must be a single directory name (no '/', not '.' or '..')")


def validate(cfg: DictConfig) -> None:
    """Check every value a user is likely to get wrong; raise ConfigError naming field, value and what is allowed."""
    check_keys(cfg)
    validate_optimize_metric(cfg)
    check_name(cfg)
    alpha = _number(cfg, "alpha")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha} is outside [0, 1] (the weight of the distillation term)")
    _at_least(cfg, "T", 0, strict=True, why=" (the softmax temperature)")
    for key in ("epochs", "teacher_training.epochs"):
        _at_least(cfg, key, 1, int)
    _number(cfg, "seed", int)
    if cfg.get("speed") is not None:
        _at_least(cfg, "speed.budget_s", 0, why=" (seconds of timing for the inference speed-up)")
        _at_least(cfg, "speed.min_rounds", 1, int)
    _at_least(cfg, "dataset.batch_size", 1, int)
    _at_least(cfg, "dataset.num_workers", 0, int)
    val_fraction = _number(cfg, "dataset.val_fraction")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"dataset.val_fraction={val_fraction} must be in [0, 1)")
    for prefix in ("optim", "teacher_training.optim"):
        _at_least(cfg, f"{prefix}.lr", 0, why=" (the learning rate)")
        if OmegaConf.select(cfg, f"{prefix}.weight_decay") is not None:
            _at_least(cfg, f"{prefix}.weight_decay", 0)
    for key in ("grad_clip", "teacher_training.grad_clip"):
        if OmegaConf.select(cfg, key) is not None:
            _at_least(cfg, key, 0, strict=True, why=", or null for no clipping")
    if cfg.scratch not in (True, False, "auto"):
        raise ConfigError(f"scratch={cfg.scratch!r} must be true, false or auto")
    for section in ("loss", "optim", "sched", "dataset", "strategy", "teacher", "student"):
        if cfg.get(section) is not None:
            check_finite_tree(OmegaConf.to_container(cfg[section], resolve=True), section)
    for name in cfg.get("loss") or {}:
        weight = OmegaConf.select(cfg, f"loss.{name}.weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"loss.{name}.weight={weight!r} must be a number >= 0")
    fast_paths.validate(cfg)
    language.check_config(cfg)
    validate_schedule(cfg)
    from kdrun.reporting import trackers

    trackers.build(cfg.get("logger"))  # its package is installed and its settings are allowed
    resolve_device(str(cfg.device))
    for role in ("teacher", "student"):
        given = cfg[role].get("checkpoint")
        if given:  # missing, directory or corrupt files fail here, before any work
            path = Path(os.path.expanduser(str(given)))
            if path.is_dir():
                raise ConfigError(f"{role}.checkpoint={given} is a directory; give the checkpoint file in it, e.g. {given}/best.pt")
            if not path.is_file():
                raise ConfigError(f"{role}.checkpoint={given} does not exist")
            checkpoint.load(path, f"{role}.checkpoint")
    validate_strategy(cfg)
    validate_recipe(cfg)


def validate_strategy(cfg: DictConfig) -> None:
    """The strategy's own settings (its ``check``), before anything is written."""
    runner = instantiate_user(cfg.strategy.runner, f"strategy {cfg.strategy.get('name')}")
    check = getattr(runner, "check", None)
    if check is not None:
        check(cfg)
    expand_model_lists(cfg)


def validate_recipe(cfg: DictConfig) -> None:
    """The loss terms' own settings (their constructors check them), the schedules they must
    follow, their pre-stages and views, before anything is written."""
    if not cfg.get("loss"):
        return
    from kdrun.losses.recipe import recipe_from  # kdrun.losses imports this module
    from kdrun.losses.stages import prestages, recipe_views

    recipe = recipe_from(cfg)
    prestages(recipe)
    recipe_views(recipe)


def validate_schedule(cfg: DictConfig) -> None:
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
        if spec.kind == "constant" and knob in cfg and (spec.start != cfg[knob] or spec.end != cfg[knob]):
            # A constant schedule holds the knob at start: the top-level value would be logged but not used.
            raise ConfigError(
                f"{where}.start={spec.start} conflicts with {knob}={cfg[knob]} ({where}.kind is constant, so the knob "
                f"would train at {spec.start}); set {knob}={spec.start} instead, or give {where} a kind that moves it"
            )


# Strategy keys that list models by their option name in the model group.
MODEL_LISTS = ("peers", "chain", "teachers")


def group_option(option: str) -> dict:
    """The config of model ``option`` (e.g. ``cnn_small``), from the same search path as the
    running app (so ``--config-dir`` options work too)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    def pick() -> dict:
        composed = compose(config_name="train", overrides=[f"student={option}"])
        return OmegaConf.to_container(composed.student, resolve=True)

    try:
        if GlobalHydra.instance().is_initialized():
            return pick()
        with initialize_config_dir(config_dir=str(importlib.resources.files("kdrun.conf")), version_base="1.3"):
            return pick()
    except (HydraException, OmegaConfBaseException) as err:
        options = sorted(p.stem for p in (importlib.resources.files("kdrun.conf") / "model").iterdir() if p.name.endswith(".yaml"))
        raise ConfigError(f"no model option {option!r}; available: {', '.join(options)}") from err


def expand_model_lists(cfg: DictConfig) -> None:
    """Replace option names in ``strategy.peers/chain/teachers`` by their configs, in place,
    so the saved config holds the models themselves (and a resumed run rebuilds the same)."""
    for key in MODEL_LISTS:
        listed = cfg.strategy.get(key)
        if not OmegaConf.is_list(listed):
            continue
        expanded = []
        for i, item in enumerate(listed):
            if isinstance(item, str):
                try:
                    expanded.append(group_option(item))
                except ConfigError as err:
                    raise ConfigError(f"strategy.{key}[{i}]={item}: {err}") from None
            elif OmegaConf.is_dict(item) and "_target_" in item and "arch" in item:
                expanded.append(item)
            else:
                raise ConfigError(f"strategy.{key}[{i}]={item!r} must be a model option name (or a model config with arch and _target_)")
        with open_dict(cfg):
            cfg.strategy[key] = expanded
