"""Language-model runs end to end with tiny models on a tiny text file: every new loss, strategy
and experiment composes and trains; the LM summary, headline and samples; resume gives the same
metrics (masked LM: seeded masks); two CPU processes (DDP, gloo) give one run.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import kdrun_cli, make_cfg, read_metrics, read_summary, sigterm_when_logged

from kdrun.run import run

TEXT = "\n\n".join(
    f"The function number {i} returns the value of argument {i % 5} and raises an error when the value is {i % 3}."
    for i in range(120)
)
TINY_MODELS = [
    "teacher.layers=2", "teacher.width=16", "teacher.heads=2",
    "student.layers=1", "student.width=8", "student.heads=1",
]


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    """A tiny text file as the corpus, byte-level BPE of 300 tokens, blocks of 16, one epoch each
    (causal LMs generate 4 tokens per sample)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    generation = [] if "task=masked_lm" in extra else ["task.generation.new_tokens=4", "task.generation.speed_batch=2"]
    return [
        "experiment=lm_tiny", "dataset=lm_files", f"dataset.source.paths=[{corpus}]", "dataset.source.block_size=16",
        "dataset.source.tokenizer.vocab_size=300", "dataset.batch_size=16", "epochs=1", "teacher_training.epochs=2",
        "scratch=true", *generation, *TINY_MODELS, *extra,
    ]


MASKED = ["task=masked_lm", "teacher=bert_tiny", "student=bert_student"]


@pytest.mark.slow
@pytest.mark.parametrize("option", [
    ["loss=token_kd"], ["loss=reverse_kl"], ["loss=jsd"], ["loss=skew_kl", "loss.skl.reverse=true"],
    ["loss=token_kd", "loss.kd.top_k=20"], ["loss=kd"], ["loss=dkd"],
    ["loss=minilm", "teacher.attention=eager", "student.attention=eager"],
    ["loss=tinybert", "teacher.attention=eager", "student.attention=eager"],
    ["loss=ce", "strategy=sequence", "strategy.prompt_tokens=8"], ["loss=jsd", "alpha=1", "strategy=on_policy", "strategy.lmbda=1",
                                       "strategy.prompt_tokens=8"],
    ["strategy=born_again", "strategy.generations=1"], ["strategy=teacher", "loss=ce"],
    ["strategy=progressive", "strategy.chain=[gpt2_student]"],
    [*MASKED, "loss=distilbert"],
    [*MASKED, "loss=tinybert", "teacher.attention=eager", "student.attention=eager", "loss.hidden.mapping=last"],
    [*MASKED, "loss=distilbert", "student.init=teacher", "student.width=16", "student.heads=2", "student.layers=1"],
])
def test_every_lm_option_composes_and_trains(tmp_path, option):
    summary = run(make_cfg(*tiny(tmp_path, *option)), tmp_path / "run")
    assert summary["status"] == "completed"
    for section in (name for name in ("student", "teacher", "scratch") if summary[name]):
        assert math.isfinite(summary[section]["test_ppl"]) and summary[section]["test_ppl"] > 1
    assert summary["task"]["select"] == "ppl" and not summary["task"]["metrics"]["ppl"]["higher_is_better"]
    assert summary["student"]["best_val_ppl"] > 1
    student = summary["student"]["model"]
    rows = [r for r in read_metrics(tmp_path / "run") if r["model"] == student and r["split"] == "train"]
    if summary["strategy"] == "teacher":  # the teacher trains in the model cache, with its rows there
        return
    assert rows and rows[0]["tokens_per_s"] > 0 and all(math.isfinite(v) for k, v in rows[0].items() if k.startswith("loss"))


@pytest.mark.slow
def test_lm_job_from_the_command_line_writes_summary_headline_and_samples(tmp_path):
    result = kdrun_cli(*tiny(tmp_path), "seed=3", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(tmp_path / "run")
    assert summary["figures"]["metric"] == "ppl" and summary["figures"]["gain"] == pytest.approx(
        summary["scratch"]["test_ppl"] - summary["student"]["test_ppl"])
    assert summary["figures"]["compression"] > 1
    assert summary["figures"]["gain_test"] is None  # perplexity is not a count of right items
    assert len(summary["corpus"]["sha256"]) == 64 and summary["corpus"]["documents"]["train"] > 0
    generation = summary["generation"]
    assert set(generation["tokens_per_s"]) == {"teacher", "student", "scratch"} and generation["speedup"] > 0
    samples = (tmp_path / "run" / "samples.md").read_text()
    for heading in ("**teacher, greedy:**", "**student, sampled:**", "**scratch, greedy:**", "Return the"):
        assert heading in samples
    assert "test ppl" in result.stderr and "generation: teacher" in result.stderr


@pytest.mark.slow
def test_resumed_masked_lm_run_gives_the_same_metrics(tmp_path):
    # The student as wide as the teacher: no projection adapter, whose initial weights would depend on
    # whether this process trained the teacher (the global RNG) rather than only on the seed.
    overrides = tiny(tmp_path, *MASKED, "loss=distilbert", "epochs=3", "seed=11", "student.width=16", "student.heads=2")
    whole = run(make_cfg(*overrides), tmp_path / "whole")
    code, rest = sigterm_when_logged("student epoch 1/3", *overrides, "hydra.run.dir=cut", cwd=tmp_path)
    assert read_summary(tmp_path / "cut")["status"] == "interrupted", rest[-2000:]
    resumed = kdrun_cli(f"resume={tmp_path / 'cut'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def rows(run_dir):
        return [{k: v for k, v in r.items() if k not in ("time_s", "tokens_per_s", "source")}
                for r in read_metrics(run_dir) if r["model"] == "student"]

    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")
    assert read_summary(tmp_path / "cut")["student"]["test_ppl"] == whole["student"]["test_ppl"]


@pytest.mark.slow
def test_lm_run_on_two_cpu_processes(tmp_path):
    overrides = [*tiny(tmp_path), "scratch=false", "seed=29", "hydra.run.dir=ddp"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdrun", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Data parallel: 2 processes, 8 samples per process" in result.stderr
    summary = read_summary(tmp_path / "ddp")
    assert summary["status"] == "completed" and math.isfinite(summary["student"]["test_ppl"])
    single = run(make_cfg(*overrides[:-1]), tmp_path / "single")
    assert summary["student"]["test_ppl"] == pytest.approx(single["student"]["test_ppl"], rel=1e-3)


@pytest.mark.slow
def test_sequence_kd_caches_the_teachers_generations_across_runs(tmp_path):
    overrides = tiny(tmp_path, "strategy=sequence", "strategy.prompt_tokens=4", "loss=ce", "seed=31")
    first = run(make_cfg(*overrides), tmp_path / "first")
    second = run(make_cfg(*overrides), tmp_path / "second")
    assert "caching in" in (tmp_path / "first" / "kdrun.log").read_text()
    assert "reusing the teacher's cached generations" in (tmp_path / "second" / "kdrun.log").read_text()
    assert first["sequence_kd"]["blocks"] == second["sequence_kd"]["blocks"] > 0
    assert first["student"]["test_ppl"] == second["student"]["test_ppl"]
