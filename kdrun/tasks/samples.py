"""A causal LM run's sample generations (``samples.md``) and generation speed.

From fixed prompts (``dataset.source.prompts``; else the first tokens of the first test blocks)
each model (teacher, student, scratch) continues greedily and by sampling with a fixed seed, so
a person can read the difference. Generation speed is new tokens per second for a batch of test
prompts, and the teacher/student ratio is the generation speed-up in the headline.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from kdrun.engine import distributed
from kdrun.models.language import generate

PROMPT_TOKENS = 8  # when the dataset names no prompts: this many tokens of each of the first test blocks
PROMPTS = 3


def prompt_ids(task, ctx) -> list[list[int]]:
    tokenizer = task.text.tokenizer
    if task.text.prompts:
        return [ids for ids in tokenizer.encode(list(task.text.prompts)) if ids]
    first = next(iter(ctx.data.test))[0][:PROMPTS, :PROMPT_TOKENS]
    return first.tolist()


def continuations(model: nn.Module, prompts: list[list[int]], settings: dict, device: torch.device) -> list[dict]:
    """Per prompt: its greedy and its sampled continuation (ids)."""
    rows = []
    for number, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device=device)
        generator = torch.Generator(device=device).manual_seed(int(settings["seed"]) + number)
        greedy = generate(model, ids, int(settings["new_tokens"]), greedy=True)
        sampled = generate(model, ids, int(settings["new_tokens"]), temperature=float(settings["temperature"]),
                           generator=generator)
        rows.append({"greedy": greedy[0, len(prompt):].tolist(), "sampled": sampled[0, len(prompt):].tolist()})
    return rows


def tokens_per_second(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> float:
    """New tokens per second, generating greedily for the batch ``prompts`` (after a warm-up)."""
    generate(model, prompts, 2, greedy=True)
    sync = torch.cuda.synchronize if prompts.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    generate(model, prompts, new_tokens, greedy=True)
    sync()
    return prompts.shape[0] * new_tokens / (time.perf_counter() - start)


def markdown(tokenizer, prompts: list[list[int]], outputs: dict[str, list[dict]], settings: dict) -> str:
    lines = [
        "# Sample generations", "",
        f"{settings['new_tokens']} new tokens per prompt: greedy, and sampled at temperature "
        f"{settings['temperature']:g} with seed {settings['seed']} + prompt number.", "",
    ]
    for number, prompt in enumerate(prompts):
        lines += [f"## Prompt {number + 1}", "", "```text", tokenizer.decode(prompt), "```", ""]
        for role, rows in outputs.items():
            for how in ("greedy", "sampled"):
                text = tokenizer.decode(rows[number][how]).replace("```", "'''")
                lines += [f"**{role}, {how}:**", "", "```text", text, "```", ""]
    return "\n".join(lines)


def generation_report(ctx, task, models: dict[str, nn.Module]) -> dict:
    """Write ``samples.md`` (rank 0) and return the summary's ``generation`` section."""
    settings = task.generation
    prompts = prompt_ids(task, ctx)
    outputs = {role: continuations(model, prompts, settings, ctx.device) for role, model in models.items()}
    if distributed.is_main():
        (ctx.run_dir / "samples.md").write_text(markdown(task.text.tokenizer, prompts, outputs, settings))
    batch = next(iter(ctx.data.test))[0][: int(settings["speed_batch"]), :PROMPT_TOKENS].to(ctx.device)
    speed = {role: tokens_per_second(model, batch, int(settings["new_tokens"])) for role, model in models.items()}
    section = {"samples": "samples.md", "new_tokens": int(settings["new_tokens"]), "batch": int(batch.shape[0]),
               "tokens_per_s": speed, "speedup": None}
    if "teacher" in speed and "student" in speed:
        section["speedup"] = speed["student"] / speed["teacher"]
    return {"generation": section}
