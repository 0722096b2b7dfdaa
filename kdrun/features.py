"""Forward-hook taps: read intermediate outputs of unmodified models by module path."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch
import torch.nn as nn

from kdrun.errors import ConfigError


LAST_STAGE = "last_stage"
# ``path:N`` taps element N of a module's tuple output, ``path:in`` its input, ``block:attention``
# the attention probabilities of a transformer block (its self-attention's second output).
INPUT, ATTENTION = "in", "attention"


def split_selector(path: str) -> tuple[str, str | None]:
    """``"a.b:1"`` -> ``("a.b", "1")``; a path without a selector has None."""
    module, colon, selector = path.partition(":")
    return module, selector if colon else None


def _stage_alias(model: nn.Module, head: str) -> tuple[str, str | None] | None:
    """``stageK`` / ``last_stage`` on a model whose blocks are a list (a ``transformers`` model):
    block K (1-based) of the stack; ``stage0`` is the first block's input (the embeddings)."""
    from kdrun.models.language import block_stack

    if head != LAST_STAGE and not (head.startswith("stage") and head[5:].isdigit()):
        return None
    stack = block_stack(model)
    if stack is None:
        return None
    prefix, blocks = stack
    index = len(blocks) if head == LAST_STAGE else int(head[5:])
    if index > len(blocks):
        raise ConfigError(f"{head}: the model has {len(blocks)} blocks (stage1..stage{len(blocks)}, stage0 = embeddings)")
    return (f"{prefix}.0", INPUT) if index == 0 else (f"{prefix}.{index - 1}", None)


def resolve_tap(model: nn.Module, path: str) -> tuple[str, str | None]:
    """A tap as ``(module path, selector)``. ``last_stage`` (or ``last_stage.<sub.path>``) stands
    for the model's deepest ``stageN``; on a model without ``stageN`` children but with a list of
    transformer blocks, ``stageK`` and ``last_stage`` name the blocks (see :func:`_stage_alias`)."""
    module_path, selector = split_selector(path)
    head, dot, rest = module_path.partition(".")
    stages = [int(name[5:]) for name, _ in model.named_children() if name.startswith("stage") and name[5:].isdigit()]
    if head == LAST_STAGE and stages:
        module_path = f"stage{max(stages)}{dot}{rest}"
    elif not stages:
        alias = _stage_alias(model, head)
        if alias is not None:
            module_path, selector = (alias[0] + dot + rest, selector) if dot else (alias[0], selector or alias[1])
    if selector == ATTENTION:
        from kdrun.models.language import attention_module

        inner = attention_module(dict(model.named_modules()).get(module_path, nn.Module()))
        if inner is None:
            raise ConfigError(f"{path}: {module_path} has no self-attention module to read probabilities from")
        module_path, selector = f"{module_path}.{inner}", "1"
    return module_path, selector


def resolve_path(model: nn.Module, path: str) -> str:
    """The module path a tap hooks (see :func:`resolve_tap`)."""
    return resolve_tap(model, path)[0]


def check_paths(model: nn.Module, paths: Iterable[str], owner: str) -> None:
    """Raise a ConfigError listing the available paths when one does not exist."""
    available = dict(model.named_modules())
    for given in paths:
        path, selector = resolve_tap(model, given)
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

    Outputs are keyed by the path as given (an alias such as ``last_stage`` stays
    the key), so loss terms need not know which model they read. Used as a context
    manager, so hooks are removed when the work is done.
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
            module_path, selector = resolve_tap(self.model, path)
            self._handles.append(modules[module_path].register_forward_hook(self._store(path, selector), with_kwargs=True))
        return self

    def _store(self, path: str, selector: str | None):
        def hook(_module, args, kwargs, output):
            if selector == INPUT:
                value = args[0] if args else next(iter(kwargs.values()))
            elif selector is not None:
                value = output[int(selector)]
                if value is None:
                    raise ConfigError(
                        f"{self.owner} tap {path}: the module gave no output {selector} (attention probabilities "
                        f"need eager attention: {self.owner}.attention=eager)"
                    )
            else:
                value = output
            self.outputs[path] = value

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
