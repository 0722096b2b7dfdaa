"""The loss zoo: every term against the value its authors' reference code gives on fixed inputs
(fixtures in tests/data/reference/, each with its provenance), hand-worked values for kdrun's
generalisations, the pre-stage and views machinery, and each option end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from kdrun.losses import StepOutputs
from kdrun.losses.logits import soft_target_kl

REFERENCE = Path(__file__).parent / "data" / "reference"


def fixture(name: str) -> dict:
    return json.loads((REFERENCE / f"{name}.json").read_text())


def step_outputs(inputs: dict) -> StepOutputs:
    """The fixture's inputs as float64 tensors (labels as class indices)."""
    def tensor(value):
        return torch.tensor(value, dtype=torch.float64)

    return StepOutputs(
        student_logits=tensor(inputs["student_logits"]), teacher_logits=tensor(inputs["teacher_logits"]),
        labels=torch.tensor(inputs["labels"], dtype=torch.long), progress=inputs["progress"],
        student_features={k: tensor(v) for k, v in inputs["student_features"].items()},
        teacher_features={k: tensor(v) for k, v in inputs["teacher_features"].items()},
    )


def pinned(name: str):
    """The fixture's term, set up on its inputs (for a pre-stage's objective, as in its stage), with
    the weights the reference used; and the inputs."""
    data = fixture(name)
    outputs = step_outputs(data["inputs"])
    term = instantiate({"_target_": data["term"], **data["settings"]})
    if "stage" in data:
        term.stage_setup(data["stage"], outputs)
    elif term.needs_setup:
        term.setup(outputs)
    term.double().train()
    state = {key: torch.tensor(value, dtype=torch.float64) for key, value in data["state"].items()}
    missing, unexpected = term.load_state_dict(state, strict=False)
    assert not unexpected and all(key.endswith("num_batches_tracked") for key in missing), (missing, unexpected)
    return term, outputs, data


REFERENCE_TERMS = sorted(path.stem for path in REFERENCE.glob("*.json"))


@pytest.mark.parametrize("name", REFERENCE_TERMS)
def test_term_matches_the_reference_code(name):
    term, outputs, data = pinned(name)
    assert data["provenance"]["repository"] and len(data["provenance"]["commit"]) == 40
    value = term.stage_loss(data["stage"], outputs) if "stage" in data else term(outputs)
    assert value.item() == pytest.approx(data["expected"]["loss"], rel=1e-5)


def test_ctkd_temperature_gradient_is_reversed_as_in_the_reference():
    term, outputs, data = pinned("ctkd")
    term(outputs).backward()
    assert term.temperature().item() == pytest.approx(data["expected"]["T"], rel=1e-6)
    assert term.theta.grad.item() == pytest.approx(data["expected"]["theta_grad"], rel=1e-5)
    # The plain gradient of the KD loss, times -strength: theta ascends what the student descends.
    theta = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    T = 1 + 20 * torch.sigmoid(theta)
    soft_target_kl(outputs.student_logits, outputs.teacher_logits, T).backward()
    strength = (1 - math.cos(math.pi * 4 / 10)) / 2  # epoch 4 of a 10-epoch cosine curriculum from 0 to 1
    assert term.theta.grad.item() == pytest.approx(-strength * theta.grad.item(), rel=1e-6)
