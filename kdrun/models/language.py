"""Language models: Hugging Face ``transformers`` causal (GPT-2) and masked (BERT) LMs, built
from their config classes or loaded from a local directory, never downloaded.

As every kdrun factory, each is called with ``num_classes`` (here the tokenizer's vocabulary
size) and ``input_shape`` (``(block_size,)``). The models are the library's own, unmodified:
taps read their hidden states and attention probabilities through forward hooks
(:mod:`kdrun.features` resolves ``stageK`` / ``last_stage`` to the K-th transformer block).
``transformers`` is imported here only, when a language model is built.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from kdrun.errors import ConfigError

log = logging.getLogger(__name__)

ATTENTION = ("sdpa", "eager")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # tiny configs trip warnings about GPT-2's default special-token ids


def _block_size(input_shape: Sequence[int], what: str) -> int:
    if len(input_shape) != 1:
        raise ConfigError(f"{what} is a language model: it needs a text dataset (input shape (block_size,)), "
                          f"got inputs of shape {tuple(input_shape)}; pick e.g. dataset=lm_stdlib")
    return int(input_shape[0])


def _check(width: int, heads: int, attention: str, what: str) -> None:
    if width % heads:
        raise ConfigError(f"{what}: width={width} must be divisible by heads={heads}")
    if attention not in ATTENTION:
        raise ConfigError(f"{what}: attention={attention!r} must be one of {', '.join(ATTENTION)} "
                          "(eager computes attention probabilities that attention-transfer terms can tap)")


def causal_lm(num_classes: int, input_shape: Sequence[int], layers: int = 2, heads: int = 2, width: int = 64,
              inner: int | None = None, positions: int | None = None, dropout: float = 0.0,
              attention: str = "sdpa") -> nn.Module:
    """A GPT-2 (``GPT2LMHeadModel``) of ``layers`` blocks, ``width`` wide, tied input/output embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    block_size = _block_size(input_shape, "causal_lm")
    _check(width, heads, attention, "causal_lm")
    config = GPT2Config(vocab_size=num_classes, n_positions=positions or block_size, n_embd=width, n_layer=layers,
                        n_head=heads, n_inner=inner, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation=attention)
    _quiet_transformers()
    return _fits(GPT2LMHeadModel(config), num_classes, block_size, "causal_lm")


def masked_lm(num_classes: int, input_shape: Sequence[int], layers: int = 2, heads: int = 2, width: int = 64,
              inner: int | None = None, positions: int | None = None, dropout: float = 0.0,
              attention: str = "sdpa") -> nn.Module:
    """A BERT (``BertForMaskedLM``) of ``layers`` blocks, ``width`` wide."""
    from transformers import BertConfig, BertForMaskedLM

    block_size = _block_size(input_shape, "masked_lm")
    _check(width, heads, attention, "masked_lm")
    config = BertConfig(vocab_size=num_classes, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=inner or 4 * width, max_position_embeddings=positions or block_size,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, pad_token_id=0,
                        attn_implementation=attention)
    _quiet_transformers()
    return _fits(BertForMaskedLM(config), num_classes, block_size, "masked_lm")


def pretrained(num_classes: int, input_shape: Sequence[int], path: str, kind: str = "causal",
               attention: str = "sdpa") -> nn.Module:
    """A model saved with ``save_pretrained`` in the local directory ``path`` (``kind``: causal or
    masked); ``local_files_only``, so nothing is downloaded."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    block_size = _block_size(input_shape, "hf_pretrained")
    directory = Path(os.path.expanduser(str(path)))
    if not (directory / "config.json").is_file():
        raise ConfigError(f"path={path} is not a model directory (no config.json); give a directory written by save_pretrained")
    if kind not in ("causal", "masked"):
        raise ConfigError(f"hf_pretrained: kind={kind!r} must be causal or masked")
    loader = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    _quiet_transformers()
    try:
        model = loader.from_pretrained(str(directory), local_files_only=True, attn_implementation=attention)
    except (OSError, ValueError) as err:
        raise ConfigError(f"path={path}: cannot load a {kind} LM from it ({str(err).splitlines()[0]})") from err
    return _fits(model, num_classes, block_size, f"the model in {path}")


def vocabulary(model: nn.Module) -> int | None:
    """The number of tokens a language model predicts (None for other models)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return None if head is None else int(head.weight.shape[0])


def max_positions(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


def _fits(model: nn.Module, num_classes: int, block_size: int, what: str) -> nn.Module:
    if max_positions(model) < block_size:
        raise ConfigError(f"dataset.source.block_size={block_size} is beyond {what}'s {max_positions(model)} positions; "
                          f"lower block_size (or give the model more positions)")
    if vocabulary(model) != num_classes:
        raise ConfigError(f"{what} predicts {vocabulary(model)} tokens but the dataset's tokenizer has {num_classes}; "
                          "use the model's own tokenizer (dataset.source.tokenizer.kind=pretrained "
                          "dataset.source.tokenizer.path=<the model directory>)")
    return model


# ---- the block stack ---------------------------------------------------------------------------


def block_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The transformer's blocks: the longest ``nn.ModuleList`` whose items share one class
    (GPT-2's ``transformer.h``, BERT's ``bert.encoder.layer``, Llama's ``model.layers``)."""
    stacks = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1
    ]
    return max(stacks, key=lambda item: len(item[1]), default=None)


def attention_module(block: nn.Module) -> str | None:
    """The path (inside a block) of its self-attention: the first module named like one."""
    for name, module in block.named_modules():
        if name and "attention" in type(module).__name__.lower() and "cross" not in name:
            return name
    return None


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> list[int]:
    """DistilBERT's initialisation: the student takes the teacher's embeddings, head and, for
    its M blocks, teacher blocks ``0, N/M, 2N/M, ...`` (every other one when N = 2M). Needs
    the same kind of model and width; returns the teacher blocks taken."""
    student_stack, teacher_stack = block_stack(student), block_stack(teacher)
    if type(student) is not type(teacher) or student_stack is None or teacher_stack is None:
        raise ConfigError(f"student.init=teacher needs a student of the teacher's kind ({type(teacher).__name__}), "
                          f"got {type(student).__name__}")
    (prefix, student_blocks), (_, teacher_blocks) = student_stack, teacher_stack
    taken = [i * len(teacher_blocks) // len(student_blocks) for i in range(len(student_blocks))]
    state = {key: value for key, value in teacher.state_dict().items() if not key.startswith(prefix + ".")}
    for mine, theirs in enumerate(taken):
        state.update({f"{prefix}.{mine}.{key}": value for key, value in teacher_blocks[theirs].state_dict().items()})
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"student.init=teacher: the student's layers do not have the teacher's shapes "
                          f"({str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}); "
                          "give the student the teacher's width and heads") from err
    return taken


@torch.no_grad()
def generate(model: nn.Module, prompts: torch.Tensor, new_tokens: int, *, greedy: bool = False,
             temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """``prompts`` (B, P) continued by ``new_tokens`` tokens: greedy, or sampled from
    ``softmax(logits / temperature)`` with ``generator``. No early stop, so every row has
    P + new_tokens tokens. The window is the model's positions; each step runs the whole window
    (no key/value cache: its API changes between ``transformers`` releases, and these models are small)."""
    was_training = model.training
    model.eval()
    window = max_positions(model)
    ids = prompts
    for _ in range(new_tokens):
        logits = model(input_ids=ids[:, -window:], use_cache=False).logits[:, -1].float()
        if greedy:
            step = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            step = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, step], dim=1)
    model.train(was_training)
    return ids
