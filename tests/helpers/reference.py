"""The inputs of the reference-value fixtures (``tests/data/reference/*.json``), rebuilt from their
seed and shapes: ``{"seed": s, "tensors": [{"name", "shape", "kind", ...}, ...]}``, drawn in order
from one ``torch.Generator`` in float64. The values in a fixture were computed once, with the
authors' reference code, from inputs made by this same function; its ``checksum`` (the sum of
every input) catches a change in how they are drawn."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent.parent / "data" / "reference"


def make_inputs(spec: dict) -> dict[str, torch.Tensor]:
    """``randn`` (times ``scale``), ``relu`` (a randn's positive part, like a post-ReLU feature),
    ``rand`` (uniform in [low, high)), ``softmax`` (rows of a randn, softmaxed over the last dim),
    ``randint`` (in [0, high)) or ``perm`` (the first ``shape[0]`` of a permutation of range(high))."""
    generator = torch.Generator().manual_seed(spec["seed"])
    tensors = {}
    for item in spec["tensors"]:
        shape, kind = tuple(item["shape"]), item.get("kind", "randn")
        if kind == "randint":
            tensors[item["name"]] = torch.randint(item["high"], shape, generator=generator)
            continue
        if kind == "perm":
            tensors[item["name"]] = torch.randperm(item["high"], generator=generator)[: shape[0]]
            continue
        if kind == "rand":
            value = torch.rand(shape, generator=generator, dtype=torch.float64)
            value = value * (item["high"] - item["low"]) + item["low"]
        else:
            value = torch.randn(shape, generator=generator, dtype=torch.float64) * item.get("scale", 1.0)
            value = {"relu": value.relu(), "softmax": value.softmax(-1)}.get(kind, value)
        tensors[item["name"]] = value
    return tensors


def checksum(tensors: dict[str, torch.Tensor]) -> float:
    return float(sum(tensor.double().sum() for tensor in tensors.values()))


def fixtures() -> list[Path]:
    return sorted(FIXTURES.glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())
