"""Forward-hook taps: read intermediate outputs of unmodified models by module path.

A tap is a module path (``stage2``, ``layer3``, ``transformer.h.1``) with two aliases and an
optional selector:

- ``last_stage`` is the model's deepest stage and ``stages`` every stage, shallowest first (a tap
  group, whose outputs are kept under ``stages[i]``; read them with :func:`tapped`). A stage is a
  ``stageN`` child (kdrun's and the CIFAR families' models), else a ``layerN`` child (torchvision's
  and timm's ResNets), else a child of a ``stages`` or ``blocks`` container (timm), else a block of
  a transformer's stack (``transformers`` models, where ``stageK`` names block K and ``stage0`` the
  embeddings, i.e. the first block's input).
- ``path:N`` taps element N of a module's tuple output, ``path:in`` its input, and
  ``block:attention`` a transformer block's attention probabilities.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from kdrun.errors import ConfigError

LAST_STAGE = "last_stage"
# Every stage of a model, in order: the intermediate features that the reference codes' feature
# terms sum over (RepDistiller's ``feat[1:-1]``, mdistiller's ``feats[1:]``).
STAGES = "stages"
# Taps that name several modules; their outputs are kept under group_key(alias, i).
GROUP_ALIASES = (STAGES,)
INPUT, ATTENTION = "in", "attention"
_STAGE_CHILDREN = ("stage", "layer")
_STAGE_CONTAINERS = ("stages", "blocks")


def transformer_blocks(model: nn.Module) -> list[str]:
    """The block paths of a ``transformers`` model's stack (empty for other models)."""
    from kdrun.models.language import block_stack

    stack = block_stack(model)
    return [f"{stack[0]}.{i}" for i in range(len(stack[1]))] if stack is not None else []


def stages(model: nn.Module) -> list[str]:
    """The model's stages, shallowest first (see the module's docstring)."""
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
    return transformer_blocks(model)


def split_selector(path: str) -> tuple[str, str | None]:
    """``"a.b:1"`` -> ``("a.b", "1")``; a path without a selector has None."""
    module, colon, selector = path.partition(":")
    return module, selector if colon else None


def _block_alias(model: nn.Module, head: str) -> tuple[str, str | None] | None:
    """``stageK`` on a transformer without ``stageN`` children: block K (1-based); ``stage0`` is the
    first block's input (the embeddings)."""
    match = re.fullmatch(r"stage(\d+)", head)
    if match is None or any(name == head for name, _ in model.named_children()):
        return None
    blocks = transformer_blocks(model)
    if not blocks:
        return None
    index = int(match.group(1))
    if index > len(blocks):
        raise ConfigError(f"{head}: the model has {len(blocks)} blocks (stage1..stage{len(blocks)}, stage0 = embeddings)")
    return (blocks[0], INPUT) if index == 0 else (blocks[index - 1], None)


def resolve_taps(model: nn.Module, path: str) -> list[tuple[str, str | None]]:
    """The (module path, selector) pairs a tap names: one, or a group's in order."""
    module_path, selector = split_selector(path)
    head, dot, rest = module_path.partition(".")
    named = stages(model)
    if module_path == STAGES and named:
        return [(stage, selector) for stage in named]
    if head == LAST_STAGE and named:
        module_path = f"{named[-1]}{dot}{rest}"
    else:
        alias = _block_alias(model, head)
        if alias is not None:
            module_path, selector = (alias[0] + dot + rest, selector) if dot else (alias[0], selector or alias[1])
    if selector == ATTENTION:
        from kdrun.models.language import attention_module

        inner = attention_module(dict(model.named_modules()).get(module_path, nn.Module()))
        if inner is None:
            raise ConfigError(f"{path}: {module_path} has no self-attention module to read probabilities from")
        module_path, selector = f"{module_path}.{inner}", "1"
    return [(module_path, selector)]


def resolve_paths(model: nn.Module, path: str) -> list[str]:
    """The module paths a tap names (see :func:`resolve_taps`)."""
    return [module_path for module_path, _ in resolve_taps(model, path)]


def resolve_tap(model: nn.Module, path: str) -> tuple[str, str | None]:
    """The one (module path, selector) a tap names; a group alias is refused."""
    taps = resolve_taps(model, path)
    if len(taps) != 1:
        raise ConfigError(f"'{path}' names {len(taps)} modules ({', '.join(p for p, _ in taps)}) where one is expected")
    return taps[0]


def resolve_path(model: nn.Module, path: str) -> str:
    """The one module path a tap hooks."""
    return resolve_tap(model, path)[0]


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
    for given in paths:
        for path, selector in resolve_taps(model, given):
            if selector is not None and selector != INPUT and not selector.isdigit():
                raise ConfigError(f"{owner} tap {given}: after ':' comes an output index, 'in' or 'attention'")
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
        self.model, self.owner = model, owner
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> FeatureTaps:
        modules = dict(self.model.named_modules())
        for path in self.paths:
            taps = resolve_taps(self.model, path)
            keys = [path] if path not in GROUP_ALIASES else [group_key(path, i) for i in range(len(taps))]
            for key, (module_path, selector) in zip(keys, taps):
                self._handles.append(modules[module_path].register_forward_hook(self._store(key, selector), with_kwargs=True))
        return self

    def _store(self, key: str, selector: str | None):
        def hook(_module, args, kwargs, output):
            if selector == INPUT:
                value = args[0] if args else next(iter(kwargs.values()))
            elif selector is not None:
                value = output[int(selector)]
                if value is None:
                    raise ConfigError(
                        f"{self.owner} tap {key}: the module gave no output {selector} (attention probabilities "
                        f"need eager attention: {self.owner}.attention=eager)"
                    )
            else:
                value = output
            self.outputs[key] = value

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
