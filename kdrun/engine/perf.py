"""Fast-path switches (``perf.*`` in train.yaml): what each ``auto`` means on this machine,
and applying them to data, models and optimizers.

Every switch is ``true``, ``false`` or ``auto``; :func:`resolve` turns the config into a
:class:`Perf` for one device, with a reason per switch for the log line at start.
``device_data`` also depends on the data, so it is settled when the data exists
(:func:`kdrun.data.device.place`); ``teacher_cache`` is settled by whoever owns a frozen teacher
(:mod:`kdrun.teacher_cache`).
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from kdrun.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "channels_last": "auto",
    "cudnn_benchmark": "auto",
    "fused_optimizer": "auto",
    "pin_memory": "auto",
    "persistent_workers": True,
    "compile": False,
    "device_data": "auto",
    "teacher_cache": "auto",
}
# torch.optim classes with fused kernels (CUDA; and CPU since torch 2.4).
FUSED = ("Adam", "AdamW", "SGD", "Adagrad")


def settings(cfg) -> dict[str, Any]:
    """The ``perf`` block over the defaults (configs saved before it existed still resume)."""
    given = cfg.get("perf") if cfg is not None else None
    return {**DEFAULTS, **(dict(given) if given else {})}


def validate(cfg) -> None:
    for key, value in (cfg.get("perf") or {}).items():
        if key not in DEFAULTS:
            raise ConfigError(f"perf.{key} is not a perf switch; the switches are {', '.join(DEFAULTS)}")
        if not (isinstance(value, bool) or value == "auto"):
            raise ConfigError(f"perf.{key}={value!r} must be true, false or auto")


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot work here (None when a tiny function compiles and runs)."""
    if device.type == "cpu":
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            return f"torch.compile on the CPU needs a C++ compiler and {compiler} is not on PATH"
    try:
        probe = torch.compile(lambda x: torch.relu(x) * 2 + 1)
        probe(torch.ones(8, device=device))
    except Exception as err:  # noqa: BLE001 - any failure means "does not work here"
        lines = str(err).strip().splitlines()
        return f"torch.compile fails here ({type(err).__name__}: {lines[0][:160] if lines else ''})"
    return None


@dataclass
class Perf:
    """The resolved switches; ``Perf()`` is the plain path (what ``fit`` does without one)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = False
    cudnn_benchmark: bool = False
    optimizer_impl: str | None = None  # "fused", "foreach" or None (torch's choice)
    pin_memory: bool = False
    persistent_workers: bool = True
    compile: bool = False
    device_data: bool | str = False
    teacher_cache_setting: bool | str = False
    notes: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return "perf: " + ", ".join(f"{name} {note}" for name, note in self.notes.items())

    # Optimizers -----------------------------------------------------------------------------

    def optimizer_kwargs(self, factory) -> dict[str, Any]:
        """``fused=True`` or ``foreach=True`` for optimizers that take it (else nothing)."""
        if self.optimizer_impl is None:
            return {}
        target = getattr(factory, "func", factory)
        if self.optimizer_impl == "fused" and getattr(target, "__name__", "") not in FUSED:
            return {}
        try:
            accepted = inspect.signature(target).parameters
        except (TypeError, ValueError):
            return {}
        return {self.optimizer_impl: True} if self.optimizer_impl in accepted else {}

    # Models ---------------------------------------------------------------------------------

    def memory_format(self, models, input_shape) -> torch.memory_format | None:
        """channels_last for conv nets on images (4-D batches); None leaves the layout alone."""
        if not self.channels_last or len(input_shape) != 3:
            return None
        if not any(isinstance(m, nn.Conv2d) for model in models if model is not None for m in model.modules()):
            return None
        return torch.channels_last

    def prepare_models(self, models, input_shape) -> torch.memory_format | None:
        """Apply channels_last and torch.compile in place; returns the input memory format.

        ``nn.Module.compile`` compiles the module's forward in place, so its state_dict keys
        stay as they were and checkpoints load into uncompiled models.
        """
        memory_format = self.memory_format(models, input_shape)
        for model in models:
            if model is None:
                continue
            if memory_format is not None:
                model.to(memory_format=memory_format)
            if self.compile and getattr(model, "_compiled_call_impl", None) is None:
                model.compile()
        return memory_format


def resolve(cfg, device: torch.device) -> Perf:
    """The switches of ``cfg.perf`` for ``device``: each ``auto`` decided, with the reason."""
    given = settings(cfg)
    cuda = device.type == "cuda"
    perf = Perf(device=device, device_data=given["device_data"], teacher_cache_setting=given["teacher_cache"])
    notes = perf.notes

    def switch(name: str, auto_on: bool, auto_why: str) -> bool:
        value = given[name]
        on = auto_on if value == "auto" else bool(value)
        notes[name] = ("on" if on else "off") + (f" ({auto_why})" if value == "auto" else "")
        return on

    where = "CUDA" if cuda else device.type.upper()
    perf.channels_last = switch("channels_last", cuda, f"{where}; conv nets on images only" if cuda else where)
    perf.cudnn_benchmark = switch("cudnn_benchmark", cuda, where)
    if cuda:  # process-wide; set either way, so an earlier run in this process does not leak into this one
        torch.backends.cudnn.benchmark = perf.cudnn_benchmark
    value = given["fused_optimizer"]
    if value is False:
        perf.optimizer_impl, notes["fused_optimizer"] = None, "off"
    else:
        perf.optimizer_impl = "fused" if (cuda or value is True) else "foreach"
        notes["fused_optimizer"] = perf.optimizer_impl + (f" ({where})" if value == "auto" else "")
    perf.pin_memory = switch("pin_memory", cuda, where) and cuda
    if given["pin_memory"] is True and not cuda:
        notes["pin_memory"] = "off (no CUDA to copy to)"
    perf.persistent_workers = bool(given["persistent_workers"])
    notes["persistent_workers"] = "on" if perf.persistent_workers else "off"
    value = given["compile"]
    if value is False:
        notes["compile"] = "off"
    else:
        problem = compile_problem(device) if (value is True or cuda) else "CPU: compile time outweighs the gain on short runs"
        if problem is not None and value is True:
            raise ConfigError(f"perf.compile=true but {problem}; set perf.compile=false")
        if problem is not None and cuda:
            log.warning("perf.compile=auto: %s; running uncompiled", problem)
        perf.compile = problem is None
        notes["compile"] = ("on" if perf.compile else "off") + (f" ({problem or where})" if value == "auto" else "")
    notes["device_data"] = str(given["device_data"])
    notes["teacher_cache"] = {True: "on", False: "off"}.get(given["teacher_cache"], "auto (on where training inputs never change)")
    return perf
