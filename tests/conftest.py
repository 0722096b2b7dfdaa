"""Shared fixtures: a private cache for the session and a config composer."""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from kdrun.config import register_resolvers

CONF_DIR = str(importlib.resources.files("kdrun.conf"))

# One intra-op thread per process: the suite's models are tiny, and on a small shared
# machine two threads per process oversubscribe the cores (several times slower).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

# Small and fast: 2,000 MNIST-1D signals, two epochs, a teacher trained for four.
FAST = [
    "dataset.source.num_samples=2000",
    "dataset.batch_size=64",
    "epochs=2",
    "teacher_training.epochs=4",
]


@pytest.fixture(scope="session", autouse=True)
def kdrun_cache(tmp_path_factory) -> Path:
    """Every test (and every kdrun subprocess) shares one cache, outside the user's home."""
    cache = tmp_path_factory.mktemp("kdrun-cache")
    os.environ["KDRUN_CACHE_DIR"] = str(cache)
    os.environ["KDRUN_DATA_DIR"] = str(tmp_path_factory.mktemp("kdrun-data"))
    return cache


def make_cfg(*overrides: str) -> DictConfig:
    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def kdrun_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command line, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "kdrun", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
