"""``run(cfg)``: one kdrun job from a composed config to a summary dict (no shell needed).

The data flow of a run: validate the config; build the data, the task and the device's fast
paths; the strategy trains and returns a result; the scratch baseline is trained once;
:mod:`kdrun.reporting.summary` turns result and baseline into ``summary.json`` and the headline.
"""

from __future__ import annotations

import logging
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kdrun import data as datasets
from kdrun import teacher_cache
from kdrun.config import expand_model_lists, instantiate_user, register_resolvers, resolve_device, validate
from kdrun.context import RunContext
from kdrun.data import device as device_data
from kdrun.engine import distributed
from kdrun.engine import perf as fast_paths
from kdrun.engine.loop import Placement
from kdrun.engine.stats import STOP
from kdrun.errors import ConfigError, Interrupted, KdrunError
from kdrun.losses.recipe import KNOBS, recipe_from
from kdrun.provision import provision
from kdrun.reporting import summary as reporting
from kdrun.reporting import trackers
from kdrun.reporting.metrics import MetricsLog
from kdrun.strategies.base import Baseline, Strategy, StrategyResult, TrainedModel, check_recipe_fits
from kdrun.strategies.common import student_training

log = logging.getLogger(__name__)

SPEED_BATCH = 128  # inputs per forward when timing student against teacher


def hydra_run_dir() -> Path | None:
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def has_checkpoints(run_dir: Path) -> bool:
    """Whether a run left checkpoints: ``checkpoints/last.pt``, or a stage's of a multi-stage strategy."""
    return any((run_dir / "checkpoints").glob("**/last.pt"))


def resumed_config(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """The saved config of the run to resume, and its directory (see :mod:`kdrun.resume`)."""
    from kdrun.resume import saved_config

    return saved_config(str(cfg.resume))


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
    given = run_dir or hydra_run_dir()
    # Under Hydra the CLI gave every rank rank 0's directory; otherwise a ${now}-style default may
    # differ between ranks, so rank 0's is taken.
    run_dir = Path(given) if given else Path(distributed.broadcast_object(str(Path("outputs/runs") / time.strftime("%Y-%m-%d_%H-%M-%S"))))
    validate(cfg)  # before anything is written: a refused run changes nothing on disk
    if not cfg.get("resume") and distributed.broadcast_object(has_checkpoints(run_dir)):
        raise ConfigError(
            f"{run_dir} already holds a run's checkpoints; carry it on with resume={run_dir} or choose another hydra.run.dir"
        )
    tracker = trackers.start(cfg.get("logger"), cfg, run_dir) if main else None  # one that cannot start refuses the run
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    summary: dict[str, Any] = {
        "status": "running", "error": None, "name": cfg.get("name"), "strategy": None, "dataset": None, "task": None,
        "student": None, "teacher": None, "scratch": None, "models": {}, "wall_time_s": None, "run_dir": str(run_dir),
        "seed": cfg.get("seed"), "versions": reporting.versions(),
    }
    with run_log(run_dir) if main else nullcontext(), stop_on_signals():
        try:
            summary.update(_train_and_report(cfg, run_dir, summary, tracker))
            summary["status"] = "completed"
            log.info("Result:\n%s", reporting.headline(summary))
        except (KeyboardInterrupt, Interrupted) as err:
            summary.update(status="interrupted", error=str(err) or "interrupted by Ctrl-C")
            log.warning("%s", summary["error"])
            raise Interrupted(f"{summary['error']}; carry on with: kdrun resume={run_dir}") from err
        except KdrunError as err:
            summary.update(status="failed", error=str(err))
            raise
        except Exception as err:
            summary.update(status="failed", error=f"{type(err).__name__}: {err}")
            raise
        finally:
            summary["wall_time_s"] = round(time.time() - started, 3)
            if main:
                reporting.write_summary(run_dir, summary)
            if tracker is not None:
                tracker.finish(summary, run_dir)
    return summary


def _train_and_report(cfg: DictConfig, run_dir: Path, summary: dict[str, Any], tracker) -> dict[str, Any]:
    """The run itself: set-up, the strategy, the baseline; returns the summary's sections."""
    ctx, strategy = _set_up(cfg, run_dir, summary, tracker)
    result = strategy.run(ctx)
    scratch = scratch_baseline(ctx, strategy, result)
    sections = {
        **reporting.model_sections(result, scratch, ctx.task),
        **reporting.strategy_sections(result, ctx.task),
        **reporting.recipe_sections(result.recipe, ctx.metrics.rows(), result.student.name),
    }
    if ctx.data.val_is_test:
        reporting.name_test_selection(sections, ctx.task)
    if cfg.get("published"):
        sections["published"] = OmegaConf.to_container(cfg.published, resolve=True)
    teacher = result.teacher if result.teacher is not result.student else None
    trained = {"teacher": teacher, "student": result.student, "scratch": scratch}
    sections.update(ctx.task.after_run(ctx, {role: m.model for role, m in trained.items() if m is not None}))
    probe = Placement(ctx.task, ctx.device)(next(iter(ctx.data.test))).head(SPEED_BATCH)
    teacher = teacher.model if teacher is not None else None
    timing = OmegaConf.to_container(cfg.speed) if cfg.get("speed") is not None else None
    sections["figures"] = reporting.distillation_figures({**summary, **sections}, ctx.task, result.student.model,
                                                         teacher, probe, timing)
    if scratch is not None:  # both models scored on the same test items
        sections["figures"]["gain_test"] = reporting.paired_test(ctx.task, result.student.model, scratch.model,
                                                                 ctx.data.test, ctx.device)
    return sections


def _set_up(cfg: DictConfig, run_dir: Path, summary: dict[str, Any], tracker) -> tuple[RunContext, Strategy]:
    main = distributed.is_main()
    if int(cfg.dataset.batch_size) % distributed.world_size():
        raise ConfigError(
            f"dataset.batch_size={cfg.dataset.batch_size} must be divisible by the {distributed.world_size()} "
            f"processes (it is the global batch; each process takes 1/{distributed.world_size()} of it)"
        )
    expand_model_lists(cfg)
    if main:
        (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=False))
    device = distributed.local_device(str(cfg.device)) or resolve_device(str(cfg.device))
    perf = fast_paths.resolve(cfg, device)
    torch.manual_seed(int(cfg.seed))
    with distributed.main_first():  # rank 0 downloads or generates the data, the others then read it
        data = datasets.build(cfg.dataset, seed=int(cfg.seed), pin_memory=perf.pin_memory,
                              persistent_workers=perf.persistent_workers)
    teacher_cache.refuse_early(perf.teacher_cache_setting, data)
    data = device_data.place(data, perf)
    task = instantiate_user(cfg.task, f"task {cfg.task.get('name')}")
    task.prepare(data)
    summary["dataset"] = {"name": data.name, "num_classes": data.num_classes, "input_shape": list(data.input_shape)}
    summary["task"] = task.describe()
    strategy: Strategy = instantiate_user(cfg.strategy.runner, f"strategy {cfg.strategy.name}")
    summary["strategy"] = str(cfg.strategy.name)
    log.info("kdrun %s: %s on %s (%s), run dir %s", summary["versions"]["kdrun"], cfg.strategy.name, data.name, device, run_dir)
    log.info("%s", perf.describe())
    if distributed.active():
        log.info("Data parallel: %d processes, %d samples per process and step (dataset.batch_size=%d is the "
                 "global batch); rank 0 writes the files", distributed.world_size(),
                 int(cfg.dataset.batch_size) // distributed.world_size(), int(cfg.dataset.batch_size))
    if data.val_is_test:
        log.warning("dataset.val_fraction=0: validation uses the test set, so best.pt is selected on test")
    if strategy.uses_recipe:
        recipe = recipe_from(cfg)
        check_recipe_fits(strategy, recipe)
        log.info("Recipe: %s", recipe)
        for knob in unused_knobs(cfg, recipe):
            log.warning("%s=%s has no effect: the recipe (%s) does not use it", knob, cfg[knob], recipe)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, data=data, task=task, device=device,
                     metrics=MetricsLog(run_dir / "metrics.jsonl", tracker), perf=perf)
    distributed.barrier()  # the other ranks have read metrics.jsonl (resume) before rank 0 appends
    return ctx, strategy


def unused_knobs(cfg: DictConfig, recipe) -> list[str]:
    """The knobs (T, alpha) the user set, on the command line or with a schedule, that no weight or
    setting of the recipe follows."""
    given = set()
    if HydraConfig.initialized():
        given = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    unused = []
    for knob in KNOBS:
        set_by_user = knob in given or any(key.startswith(f"schedule.{knob}.") for key in given)
        if set_by_user and knob not in recipe.knobs.used:
            unused.append(knob)
    return unused


def scratch_enabled(setting, embedded: bool) -> bool:
    """``scratch=auto`` trains the label-only baseline on the small embedded datasets only."""
    return embedded if setting == "auto" else bool(setting)


def scratch_baseline(ctx: RunContext, strategy: Strategy, result: StrategyResult) -> TrainedModel | None:
    """The student trained on labels alone (cached like a teacher), paired with the distilled one:
    same initial weights, data order and augmentation draws."""
    if not strategy.has_baseline or not scratch_enabled(ctx.cfg.scratch, ctx.data.embedded):
        return None
    baseline = result.baseline or Baseline(ctx.cfg.student)
    scratch = provision(ctx, "scratch", baseline.model_cfg, student_training(ctx.cfg), "scratch",
                        data=baseline.data, variant=baseline.variant)
    if baseline.trained_on:
        scratch.info["trained_on"] = baseline.trained_on
    return scratch
