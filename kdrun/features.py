"""Forward-hook taps: read intermediate outputs of unmodified models by module path."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch
import torch.nn as nn

from kdrun.errors import ConfigError


LAST_STAGE = "last_stage"


# Where models keep their stages, deepest last: kdrun's and CIFAR families' ``stageN`` children,
# torchvision's and timm's ResNets' ``layerN``, timm's ``stages.N`` (ConvNeXt, RegNet, ...) and
# ``blocks.N`` (EfficientNet, MobileNet, ViT).
_STAGE_CHILDREN = ("stage", "layer")
_STAGE_CONTAINERS = ("stages", "blocks")


def resolve_path(model: nn.Module, path: str) -> str:
    """A module path; ``last_stage`` (or ``last_stage.<sub.path>``) stands for the model's deepest
    stage: its highest ``stageN`` child, else its highest ``layerN`` child, else the last child of
    its ``stages`` or ``blocks`` container."""
    head, dot, rest = path.partition(".")
    if head != LAST_STAGE:
        return path
    stage = last_stage(model)
    return f"{stage}{dot}{rest}" if stage else path


def last_stage(model: nn.Module) -> str | None:
    children = dict(model.named_children())
    for prefix in _STAGE_CHILDREN:
        numbers = [int(name[len(prefix):]) for name in children if name.startswith(prefix) and name[len(prefix):].isdigit()]
        if numbers:
            return f"{prefix}{max(numbers)}"
    for container in _STAGE_CONTAINERS:
        inner = [name for name, _ in children[container].named_children()] if container in children else []
        if inner:
            return f"{container}.{inner[-1]}"
    return None


def check_paths(model: nn.Module, paths: Iterable[str], owner: str) -> None:
    """Raise a ConfigError listing the available paths when one does not exist."""
    available = dict(model.named_modules())
    for path in map(lambda p: resolve_path(model, p), paths):
        if path not in available:
            close = difflib.get_close_matches(path, available, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            top_level = ", ".join(name for name in available if name and "." not in name)
            raise ConfigError(
                f"{owner} has no module '{path}'; {hint}available top-level modules: {top_level} "
                "(nested paths use dots, e.g. stage1.0)"
            )


class FeatureTaps:
    """Register forward hooks on ``paths`` of ``model``; ``taps[path]`` is the last output.

    Outputs are keyed by the path as given (an alias such as ``last_stage`` stays
    the key), so loss terms need not know which model they read. Used as a context
    manager, so hooks are removed when the work is done.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], owner: str = "model"):
        self.paths = list(dict.fromkeys(paths))
        check_paths(model, self.paths, owner)
        self.model = model
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> FeatureTaps:
        modules = dict(self.model.named_modules())
        for path in self.paths:
            module = modules[resolve_path(self.model, path)]
            self._handles.append(module.register_forward_hook(self._store(path)))
        return self

    def _store(self, path: str):
        def hook(_module, _inputs, output):
            self.outputs[path] = output

        return hook

    def clear(self) -> None:
        self.outputs.clear()

    def __getitem__(self, path: str) -> torch.Tensor:
        return self.outputs[path]

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs.clear()
