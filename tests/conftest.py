"""Fixtures: a private cache and data directory for the session, one thread per process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One intra-op thread per process: the suite's models are tiny, and on a small shared
# machine two threads per process oversubscribe the cores (several times slower).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session", autouse=True)
def kdrun_cache(tmp_path_factory) -> Path:
    """Every test (and every kdrun subprocess) shares one cache, outside the user's home."""
    cache = tmp_path_factory.mktemp("kdrun-cache")
    os.environ["KDRUN_CACHE_DIR"] = str(cache)
    os.environ["KDRUN_DATA_DIR"] = str(tmp_path_factory.mktemp("kdrun-data"))
    return cache
