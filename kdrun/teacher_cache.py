"""The teacher-output cache (``perf.teacher_cache``): a frozen teacher's outputs computed once per
training sample, when its inputs never change, and read back instead of running it again.

Installed by whoever owns the teacher (:func:`install`); the loop knows nothing of it.
"""

from __future__ import annotations

import logging

import torch

from kdrun.data import DataBundle
from kdrun.distiller import Distiller, TeacherOutputs
from kdrun.errors import ConfigError
from kdrun.tasks import Batch

log = logging.getLogger(__name__)

# Share of free memory (device memory on CUDA, RAM on the CPU) that the cache may take.
MEMORY_SHARE = 0.25


def augmented_refusal(dataset: str) -> str:
    return (
        f"perf.teacher_cache=true but dataset {dataset} augments its training inputs, so the teacher sees new "
        "inputs every epoch; set perf.teacher_cache=auto (or false) or turn the augmentation off"
    )


class TeacherCache:
    """Per training sample: the teacher's raw output and tapped features.

    Batches fill it by their sample index; once every sample has been seen (checked at epoch
    starts, one sync per epoch) reads replace the forward. ``limit_bytes`` caps its size:
    above it the cache turns itself off, or, when ``strict`` (``perf.teacher_cache=true``),
    refuses with a ConfigError.
    """

    def __init__(self, size: int, limit_bytes: int, strict: bool = False):
        self.size, self.limit_bytes, self.strict = size, limit_bytes, strict
        self.stored: dict[str, torch.Tensor] = {}
        self.filled: torch.Tensor | None = None
        self.complete = self.disabled = False

    def read(self, index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        if not self.complete:
            return None
        return self.stored["output"][index], {path: stored[index] for path, stored in self.stored.items() if path != "output"}

    def write(self, index: torch.Tensor, output: torch.Tensor, features: dict[str, torch.Tensor]) -> None:
        if self.disabled:
            return
        values = {"output": output, **features}
        if self.filled is None and not self._allocate(values):
            return
        for path, value in values.items():
            self.stored[path].index_copy_(0, index, value)
        self.filled[index] = True

    def _allocate(self, values: dict[str, torch.Tensor]) -> bool:
        if not all(isinstance(value, torch.Tensor) for value in values.values()):
            return self._refuse("a teacher tap returns something other than a tensor")
        need = sum(value[0].numel() * value.element_size() for value in values.values()) * self.size
        if need > self.limit_bytes:
            return self._refuse(
                f"the teacher's outputs for {self.size} samples take {need / 2**20:.0f} MiB, "
                f"more than the {self.limit_bytes / 2**20:.0f} MiB allowed (a quarter of free memory)"
            )
        self.stored = {path: value.new_empty((self.size, *value.shape[1:])) for path, value in values.items()}
        device = values["output"].device
        self.filled = torch.zeros(self.size, dtype=torch.bool, device=device)
        names = ["logits" if path == "output" else path for path in values]
        log.info("Teacher cache: %.1f MiB for %d samples (%s)", need / 2**20, self.size, ", ".join(names))
        return True

    def _refuse(self, reason: str) -> bool:
        if self.strict:
            raise ConfigError(f"perf.teacher_cache=true: {reason}; set perf.teacher_cache=auto or false")
        log.warning("Teacher cache off: %s", reason)
        self.disabled = True
        return False

    def start_epoch(self) -> None:
        if not self.complete and self.filled is not None and not self.disabled:
            self.complete = bool(self.filled.all())


class CachedTeacher(TeacherOutputs):
    """:class:`TeacherOutputs` that reads from and fills a :class:`TeacherCache` by sample index."""

    def __init__(self, outputs: TeacherOutputs, cache: TeacherCache):
        self.model, self.task, self.taps, self.cache = outputs.model, outputs.task, outputs.taps, cache

    def start_epoch(self) -> None:
        self.cache.start_epoch()

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.index is None:  # a probe batch
            return super().__call__(batch)
        cached = self.cache.read(batch.index)
        if cached is not None:
            return cached
        output, features = super().__call__(batch)
        self.cache.write(batch.index, output, features)
        return output, features


def refuse_early(setting, data: DataBundle) -> None:
    """``perf.teacher_cache=true`` on augmented data is refused as soon as the data is known."""
    if setting is True and data.augmentation is not None:
        raise ConfigError(augmented_refusal(data.name))


def decide(setting, distiller: Distiller, data: DataBundle) -> tuple[bool, str]:
    """Whether this distiller's teacher outputs can be cached for ``data``, and why (for the
    log; empty when there is no frozen teacher)."""
    if setting is False:
        return False, "off"
    teacher = distiller.teacher
    if teacher is None:
        return False, ""
    if data.augmentation is not None:
        if setting is True:
            raise ConfigError(augmented_refusal(data.name))
        return False, "off (training inputs are augmented)"
    if not distiller.fixed_inputs:
        if setting is True:
            raise ConfigError("perf.teacher_cache=true but the models see new inputs every epoch (masked LM's masks, "
                              "on-policy samples); set perf.teacher_cache=auto or false")
        return False, "off (the models see new inputs every epoch: masks or samples)"
    if getattr(teacher, "knobs", ()):
        return False, "off (the teacher's outputs follow the T schedule)"
    return True, "on (training inputs never change: teacher outputs computed once per sample)"


def install(distiller: Distiller, data: DataBundle, setting, free_bytes: int, title: str) -> DataBundle:
    """Give ``distiller`` a cached teacher when ``setting`` (true/false/auto) and the data allow
    it; returns the data to train on (with sample indices when the cache is on)."""
    use, note = decide(setting, distiller, data)
    if note and setting is not False:
        log.info("%s: teacher_cache %s", title, note)
    if not use:
        return data
    cache = TeacherCache(len(data.train_set), int(MEMORY_SHARE * free_bytes), strict=setting is True)
    distiller.teacher_outputs = CachedTeacher(distiller.teacher_outputs, cache)
    return data.indexed()

