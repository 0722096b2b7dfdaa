"""Every loss recipe runs end to end on each unlike teacher/student pair (one tiny epoch)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from helpers import CONF_DIR, ZOO_LOSSES, make_cfg, read_metrics
from kdrun.run import run

TINY = ["epochs=1", "teacher_training.epochs=1", "dataset.batch_size=32"]
PAIRS = {
    "cnn_to_mlp": ["dataset.source.num_samples=400"],
    "resnet32x4_to_resnet8x4": [
        "dataset=fake", "teacher=resnet32x4", "student=resnet8x4",
        "dataset.source.num_train=64", "dataset.source.num_test=16",
    ],
    "transformer_to_transformer": ["dataset.source.num_samples=400", "teacher=transformer", "student=transformer_small"],
}
# What a recipe needs beyond its defaults on some pairs.
EXTRA = {
    "crd": ["loss.crd.nce_k=32"],
    "crd_kd": ["loss.crd.nce_k=32"],
}
NON_TRANSFORMER_EXTRA = {
    "attention_map": ["loss.attention_map.student_taps=[last_stage]", "loss.attention_map.teacher_taps=[last_stage]"],
}
# The zoo's options have their own end-to-end tests (tests/test_loss_zoo.py), on the image pairs they are
# for; layer-to-layer transfer between transformers language models (block lists, attention
# probabilities as a tuple output) is tested on language models in test_lm_runs.py.
LANGUAGE_ONLY = {"tinybert", "minilm"}
LOSSES = sorted(p.stem for p in (Path(CONF_DIR) / "loss").glob("*.yaml") if p.stem not in {*ZOO_LOSSES, *LANGUAGE_ONLY})


# The CIFAR and transformer pairs are in the full suite; the fast tier runs every loss on the default pair.
@pytest.mark.parametrize("pair", [pair if pair == "cnn_to_mlp" else pytest.param(pair, marks=pytest.mark.slow) for pair in sorted(PAIRS)])
@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_on_every_pair(tmp_path, loss, pair):
    overrides = [*TINY, *PAIRS[pair], f"loss={loss}", *EXTRA.get(loss, [])]
    if pair != "transformer_to_transformer":
        overrides += NON_TRANSFORMER_EXTRA.get(loss, [])
    summary = run(make_cfg(*overrides), tmp_path)
    assert summary["status"] == "completed"
    train_row = next(r for r in read_metrics(tmp_path) if r["model"] == "student" and r["split"] == "train")
    parts = [key for key in train_row if key.startswith("loss/")]
    assert parts, train_row
    assert all(isinstance(train_row[key], float) and math.isfinite(train_row[key]) for key in parts)
