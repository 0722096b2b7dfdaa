"""Forward-hook taps: read intermediate outputs of unmodified models by module path."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from kdrun.errors import ConfigError


LAST_STAGE = "last_stage"
# Every stageN of a model, in order: the intermediate features that the reference codes' feature
# terms sum over (RepDistiller's ``feat[1:-1]``, mdistiller's ``feats[1:]``).
STAGES = "stages"
# Taps that name several modules; their outputs are kept under group_key(alias, i).
GROUP_ALIASES = (STAGES,)


# Where models keep their stages, deepest last: kdrun's and CIFAR families' ``stageN`` children,
# torchvision's and timm's ResNets' ``layerN``, timm's ``stages.N`` (ConvNeXt, RegNet, ...) and
# ``blocks.N`` (EfficientNet, MobileNet, ViT).
_STAGE_CHILDREN = ("stage", "layer")
_STAGE_CONTAINERS = ("stages", "blocks")


def stages(model: nn.Module) -> list[str]:
    """The model's stages, shallowest first: its ``stageN`` children, else its ``layerN`` children,
    else the children of its ``stages`` or ``blocks`` container."""
    children = dict(model.named_children())
    for prefix in _STAGE_CHILDREN:
        numbered = sorted((int(m.group(1)), name) for name in children if (m := re.fullmatch(rf"{prefix}(\d+)", name)))
        if numbered:
            return [name for _, name in numbered]
    for container in _STAGE_CONTAINERS:
        if container in children:
            inner = [f"{container}.{name}" for name, _ in children[container].named_children()]
            if inner:
                return inner
    return []


def resolve_paths(model: nn.Module, path: str) -> list[str]:
    """The module paths ``path`` names on ``model``: ``last_stage`` (or ``last_stage.<sub.path>``)
    the deepest stage, ``stages`` every stage in order, any other path itself."""
    named = stages(model)
    head, dot, rest = path.partition(".")
    if head == LAST_STAGE and named:
        return [f"{named[-1]}{dot}{rest}"]
    if path == STAGES and named:
        return named
    return [path]


def resolve_path(model: nn.Module, path: str) -> str:
    """The one module path ``path`` names (``last_stage`` resolved); a group alias is refused."""
    paths = resolve_paths(model, path)
    if len(paths) != 1:
        raise ConfigError(f"'{path}' names {len(paths)} modules ({', '.join(paths)}) where one is expected")
    return paths[0]


def group_key(path: str, index: int) -> str:
    """Where the ``index``-th output of a tap that names several modules (``stages``) is kept."""
    return f"{path}[{index}]"


def tapped(features: Mapping[str, torch.Tensor], path: str) -> list[torch.Tensor]:
    """The outputs of tap ``path`` in ``features``: one module's, or each of a group's in order."""
    if path in features:
        return [features[path]]
    outputs = []
    while group_key(path, len(outputs)) in features:
        outputs.append(features[group_key(path, len(outputs))])
    if not outputs:
        raise KeyError(path)
    return outputs


def check_paths(model: nn.Module, paths: Iterable[str], owner: str) -> None:
    """Raise a ConfigError listing the available paths when one does not exist."""
    available = dict(model.named_modules())
    for path in (resolved for given in paths for resolved in resolve_paths(model, given)):
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

    Outputs are keyed by the path as given (an alias such as ``last_stage`` stays the key), so
    loss terms need not know which model they read; a group alias (``stages``) keeps its
    modules' outputs under ``group_key(alias, i)`` (read them with :func:`tapped`). Used as a
    context manager, so hooks are removed when the work is done.
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
            resolved = resolve_paths(self.model, path)
            keys = [path] if path not in GROUP_ALIASES else [group_key(path, i) for i in range(len(resolved))]
            for key, module_path in zip(keys, resolved):
                self._handles.append(modules[module_path].register_forward_hook(self._store(key)))
        return self

    def _store(self, key: str):
        def hook(_module, _inputs, output):
            self.outputs[key] = output

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
