"""Language modelling: next-token prediction (causal LM) and masked-token prediction (masked LM).

A batch holds blocks of token ids and a padding mask (empty for packed blocks, see
:mod:`kdrun.data.text`). The scored items are the predicted tokens, flattened to ``(tokens,
vocab)`` logits and ``(tokens,)`` labels, so every logit term (KD, DKD, DIST, the token terms of
:mod:`kdrun.losses.tokens`) distils per token and padding never counts. Metrics: perplexity
(``exp`` of the mean token cross-entropy; it selects ``best.pt``, lower is better), the mean token
cross-entropy and token accuracy; training rows also report tokens/s.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from kdrun.errors import ConfigError
from kdrun.tasks.base import IGNORE, Batch, Metric
from kdrun.tasks.classification import Classification

log = logging.getLogger(__name__)


class LanguageModelling(Classification):
    """What causal and masked LM share: metrics, model calls, the run's tokenizer. A scored item is
    a token with its label, so the statistics are a classifier's (token accuracy, summed
    cross-entropy) and perplexity is ``exp`` of the mean cross-entropy."""

    metrics = (
        Metric("ppl", higher_is_better=False, title="ppl"),
        Metric("loss", higher_is_better=False, title="token CE", fmt="{:.4f}"),
        Metric("acc", higher_is_better=True, title="token acc %", suffix="%"),
    )
    select = "ppl"
    unit = "tokens"
    rate_key = "tokens_per_s"

    def __init__(self):
        self.text = None

    def prepare(self, data) -> None:
        if getattr(data, "text", None) is None:
            raise ConfigError(f"task={self.name} needs a text dataset (dataset=lm_stdlib, lm_files or lm_hf_disk); "
                              f"dataset {data.name} is not one")
        self.text = data.text

    def split(self, loaded) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Token ids, the padding mask (None for packed blocks: its width is 0) and the sample index."""
        ids, mask = loaded[0], loaded[1]
        return ids, (mask if mask.shape[-1] else None), (loaded[2] if len(loaded) > 2 else None)

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**batch.inputs, use_cache=False).logits

    @staticmethod
    def inputs(ids: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask.long()}

    @staticmethod
    def real(logits: torch.Tensor, labels: torch.Tensor, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(items, vocab)`` and ``(items,)``; with padding, only the real items. Selecting them
        needs their count on the host (a sync on CUDA); packed blocks skip it."""
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        if not padded:
            return logits, labels
        keep = labels != IGNORE
        return logits[keep], labels[keep]

    def correct_items(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """None: the figure is perplexity, not a count of right items, and a sequence's tokens are
        not independent items, so McNemar's test on token accuracy would overstate the evidence."""
        return None

    def finish(self, sums: dict[str, float]) -> dict[str, float]:
        metrics = super().finish(sums)
        if "loss" in metrics:
            metrics["ppl"] = math.exp(min(metrics["loss"], 700.0))  # exp overflows beyond ~709
        return metrics


class CausalLM(LanguageModelling):
    """Next-token prediction: position t predicts token t+1. ``generation`` sets the sample
    generations written to ``samples.md`` after the run (``new_tokens`` per prompt, greedy and
    sampled at ``temperature`` with ``seed``)."""

    name = "causal_lm"

    def __init__(self, generation: dict | None = None):
        super().__init__()
        self.generation = {"new_tokens": 40, "temperature": 1.0, "seed": 0, "speed_batch": 16, **(generation or {})}

    def batch(self, loaded) -> Batch:
        ids, mask, index = self.split(loaded)
        labels = ids if mask is None else ids.masked_fill(~mask, IGNORE)
        return Batch(self.inputs(ids, mask), labels, index=index, mask=mask)

    def scored(self, output: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.real(output[:, :-1], batch.labels[:, 1:], batch.mask is not None)

    def after_run(self, ctx, models: dict[str, nn.Module]) -> dict:
        from kdrun.tasks.samples import generation_report

        return {"corpus": self.text.corpus, **generation_report(ctx, self, models)}


class MaskedLM(LanguageModelling):
    """Masked-token prediction (BERT): ``mask_prob`` of each block's real tokens are chosen; of
    those 80% become the mask token, 10% a random token, 10% stay; the chosen ones are scored.

    A fixed number per block (``round(mask_prob * block_size)``) is chosen, so scored shapes are
    static and packed blocks need no data-dependent indexing. In training the choice comes from
    the global RNG, which the loop reseeds every epoch from (seed, stream, epoch), so a resumed
    run draws the same masks; in evaluation (under ``no_grad``) from a hash of each block's
    tokens, so every model and every epoch is scored on the same masked tokens. Student and
    teacher see the one masked batch. New masks every epoch: the teacher-output cache stays off.
    """

    name = "masked_lm"
    fixed_inputs = False

    def __init__(self, mask_prob: float = 0.15):
        super().__init__()
        if not 0 < mask_prob < 1:
            raise ConfigError(f"task.mask_prob={mask_prob} must be in (0, 1)")
        self.mask_prob = float(mask_prob)

    def prepare(self, data) -> None:
        super().prepare(data)
        if self.text.tokenizer.mask_id is None:
            raise ConfigError("task=masked_lm needs a tokenizer with a mask token; this pretrained tokenizer has none "
                              "(a causal LM's?); use task=causal_lm or a masked LM's tokenizer")

    def uniforms(self, ids: torch.Tensor, salt: int) -> torch.Tensor:
        """Numbers in [0, 1) per position: random in training, a hash of the block in evaluation."""
        if torch.is_grad_enabled():
            return torch.rand(ids.shape, device=ids.device)
        position = torch.arange(ids.shape[1], device=ids.device)
        block = (ids * (position + 1)).sum(dim=1, keepdim=True) % 1_000_003
        state = (ids * 7919 + position * 104_729 + block * 31 + salt) % 2_147_483_647
        for _ in range(3):  # Park-Miller steps mix the bits; every product stays below 2^63
            state = state * 48_271 % 2_147_483_647
        return state.double().div(2_147_483_647).float()

    def batch(self, loaded) -> Batch:
        ids, mask, index = self.split(loaded)
        chosen = max(1, round(self.mask_prob * ids.shape[1]))
        scores = self.uniforms(ids, 1)
        if mask is not None:
            scores = scores.masked_fill(~mask, -1.0)
        positions = scores.topk(chosen, dim=1).indices
        labels = ids.gather(1, positions)
        if mask is not None:
            labels = labels.masked_fill(~mask.gather(1, positions), IGNORE)
        roll = self.uniforms(ids, 2).gather(1, positions)
        random_tokens = (self.uniforms(ids, 3).gather(1, positions) * self.text.tokenizer.vocab_size).long()
        replaced = torch.where(roll < 0.8, torch.full_like(labels, self.text.tokenizer.mask_id),
                               torch.where(roll < 0.9, random_tokens, ids.gather(1, positions)))
        masked = ids.scatter(1, positions, replaced)
        return Batch(self.inputs(masked, mask), labels, index=index, mask=mask, extra={"positions": positions})

    def after_run(self, ctx, models: dict[str, nn.Module]) -> dict:
        return {"corpus": self.text.corpus}

    def scored(self, output: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        positions = batch.extra["positions"]
        picked = output.gather(1, positions.unsqueeze(-1).expand(-1, -1, output.shape[-1]))
        return self.real(picked, batch.labels, batch.mask is not None)



LM_FACTORIES = {"kdrun.models.language.causal_lm": "causal", "kdrun.models.language.masked_lm": "masked"}
TASK_KINDS = {"kdrun.tasks.language.CausalLM": "causal", "kdrun.tasks.language.MaskedLM": "masked"}
TEXT_SOURCE = "kdrun.data.text.corpus"


def model_kind(model_cfg) -> str | None:
    """``causal``/``masked`` for a language model's config, None for other models."""
    target = str(model_cfg.get("_target_"))
    if target == "kdrun.models.language.pretrained":
        return str(model_cfg.get("kind", "causal"))
    return LM_FACTORIES.get(target)


def _check_directory(value, field: str, what: str) -> None:
    path = Path(os.path.expanduser(str(value)))
    if not path.is_dir():
        raise ConfigError(f"{field}={value} does not exist or is not a directory ({what})")


def check_config(cfg) -> None:
    """Language-model settings a user can get wrong, refused before anything is written: a model
    of the wrong kind for the task, a language model or task without a text dataset, missing
    model, tokenizer or data paths, a block_size beyond a model's positions."""
    task_kind = TASK_KINDS.get(str(cfg.task.get("_target_")))
    source = cfg.dataset.source
    text = str(source.get("_target_")) == TEXT_SOURCE
    for role in ("teacher", "student"):
        kind = model_kind(cfg[role])
        if kind is None:
            continue
        if not text:
            raise ConfigError(f"{role}={cfg[role].arch} is a language model; it needs a text dataset "
                              f"(dataset=lm_stdlib, lm_files or lm_hf_disk), not {cfg.dataset.name}")
        if task_kind is not None and kind != task_kind:
            raise ConfigError(f"{role}={cfg[role].arch} is a {kind} LM but task={cfg.task._target_.rsplit('.', 1)[-1]} "
                              f"needs a {task_kind} one (e.g. {'gpt2_tiny' if task_kind == 'causal' else 'bert_tiny'})")
        if cfg[role].get("path") is not None:
            _check_directory(cfg[role].path, f"{role}.path", "a model saved with save_pretrained")
        positions = cfg[role].get("positions")
        if positions is not None and text and int(positions) < int(source.block_size):
            raise ConfigError(f"dataset.source.block_size={source.block_size} is beyond {role}.positions={positions}")
    if task_kind is not None and not text:
        raise ConfigError(f"task={cfg.task._target_.rsplit('.', 1)[-1]} needs a text dataset (dataset=lm_stdlib, "
                          f"lm_files or lm_hf_disk), not {cfg.dataset.name}")
    if text:
        _check_text_source(source)


def _check_text_source(source) -> None:
    tokenizer = source.get("tokenizer") or {}
    if tokenizer.get("kind") == "pretrained":
        _check_directory(tokenizer.get("path"), "dataset.source.tokenizer.path", "a tokenizer saved with save_pretrained")
    if source.get("reader") == "hf_disk":
        _check_directory(source.path, "dataset.source.path", "a dataset saved with save_to_disk")
    if source.get("reader") == "files":
        paths = source.paths
        for path in [paths] if isinstance(paths, str) else list(paths):
            if not Path(os.path.expanduser(str(path))).is_file():
                raise ConfigError(f"dataset.source.paths: {path} does not exist (give text or .jsonl files)")


def refuse(cfg, strategy: str, why: str) -> None:
    """A strategy that does not apply to language models says so in one line."""
    if TASK_KINDS.get(str(cfg.task.get("_target_"))) is not None:
        raise ConfigError(f"strategy={strategy} does not work with language models: {why}; use offline, sequence, "
                          "on_policy, progressive, born_again or teacher")
