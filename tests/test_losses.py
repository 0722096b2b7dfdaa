"""Loss terms against values worked out by hand, plus gradient and recipe checks."""

from __future__ import annotations

import math

import pytest
import torch

from kdrun.errors import ConfigError
from kdrun.losses import StepOutputs, build_recipe
from kdrun.losses.logits import CrossEntropy, SoftTargets, soft_target_kl


def kl_by_hand(teacher_logits: list[float], student_logits: list[float], T: float) -> float:
    """T^2 * sum_i p_i log(p_i / q_i), with p, q softmaxes at temperature T, in plain Python."""

    def softmax(z):
        exps = [math.exp(v / T) for v in z]
        return [e / sum(exps) for e in exps]

    p, q = softmax(teacher_logits), softmax(student_logits)
    return T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_soft_target_kl_matches_hand_values():
    # Teacher p = (0.75, 0.25) at T=1, student uniform: 0.75 ln 1.5 + 0.25 ln 0.5 = 0.130812...
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    assert soft_target_kl(student, teacher, T=1.0).item() == pytest.approx(0.1308120, abs=1e-6)
    # At T=2 the teacher softens to (0.634, 0.366); times T^2 = 4 gives 0.145363...
    assert soft_target_kl(student, teacher, T=2.0).item() == pytest.approx(0.1453631, abs=1e-6)


@pytest.mark.parametrize("T", [1.0, 3.0, 8.0])
def test_soft_target_kl_batch_mean_against_formula(T):
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    expected = sum(kl_by_hand(t.tolist(), s.tolist(), T) for s, t in zip(student, teacher)) / 5
    assert soft_target_kl(student, teacher, T).item() == pytest.approx(expected, rel=1e-5)


def test_kd_is_zero_when_student_matches_teacher():
    logits = torch.randn(3, 6)
    assert soft_target_kl(logits, logits.clone(), T=4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_gradients_reach_student_not_teacher():
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    outputs = StepOutputs(student_logits=student, labels=torch.tensor([0, 1, 2, 3]), teacher_logits=teacher.detach())
    loss = SoftTargets(T=4)(outputs) + CrossEntropy()(outputs)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_recipe_is_weighted_sum_with_named_parts_and_formula():
    recipe = build_recipe({
        "ce": {"weight": 0.1, "_target_": "kdrun.losses.logits.CrossEntropy"},
        "kd": {"weight": 0.9, "_target_": "kdrun.losses.logits.SoftTargets", "T": 4},
    })
    assert str(recipe) == "L = 0.1*CE + 0.9*KD(T=4)"
    assert recipe.needs_teacher
    torch.manual_seed(1)
    outputs = StepOutputs(student_logits=torch.randn(6, 3), labels=torch.randint(0, 3, (6,)), teacher_logits=torch.randn(6, 3))
    total, parts = recipe(outputs)
    assert set(parts) == {"loss/ce", "loss/kd"}
    ce = torch.nn.functional.cross_entropy(outputs.student_logits, outputs.labels)
    kd = soft_target_kl(outputs.student_logits, outputs.teacher_logits, 4.0)
    assert parts["loss/ce"].item() == pytest.approx(ce.item())
    assert total.item() == pytest.approx(0.1 * ce.item() + 0.9 * kd.item(), rel=1e-6)


def test_ce_only_recipe_needs_no_teacher():
    recipe = build_recipe({"ce": {"weight": 1.0, "_target_": "kdrun.losses.logits.CrossEntropy"}})
    assert not recipe.needs_teacher
    assert str(recipe) == "L = 1*CE"


@pytest.mark.parametrize(
    "spec, message",
    [
        ({}, "no terms"),
        ({"kd": {"_target_": "kdrun.losses.logits.SoftTargets"}}, "needs a 'weight'"),
        ({"kd": {"weight": -1, "_target_": "kdrun.losses.logits.SoftTargets"}}, "must be a finite number >= 0"),
    ],
)
def test_bad_recipes_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_recipe(spec)


def test_terms_can_be_active_in_an_epoch_window():
    recipe = build_recipe({
        "ce": {"weight": 1.0, "_target_": "kdrun.losses.logits.CrossEntropy", "start_epoch": 2},
        "kd": {"weight": 0.5, "_target_": "kdrun.losses.logits.SoftTargets", "T": 2, "stop_epoch": 2},
    })
    assert str(recipe) == "L = 1*CE[epochs 2-] + 0.5*KD(T=2)[epochs 0-2]"
    torch.manual_seed(0)
    outputs = StepOutputs(student_logits=torch.randn(4, 3, requires_grad=True), labels=torch.tensor([0, 1, 2, 0]), teacher_logits=torch.randn(4, 3))
    early = StepOutputs(**{**outputs.__dict__, "progress": 0.5})
    late = StepOutputs(**{**outputs.__dict__, "progress": 2.0})
    total, parts = recipe(early)
    assert set(parts) == {"loss/kd"} and total.item() == pytest.approx(0.5 * soft_target_kl(outputs.student_logits, outputs.teacher_logits, 2.0).item())
    total, parts = recipe(late)
    assert set(parts) == {"loss/ce"}
    total.backward()
    assert outputs.student_logits.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="stop_epoch=1 must be after start_epoch=3"):
        build_recipe({"ce": {"weight": 1.0, "_target_": "kdrun.losses.logits.CrossEntropy", "start_epoch": 3, "stop_epoch": 1}})
