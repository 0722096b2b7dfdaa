"""Response-based terms (logit standardisation, DKD, DIST) against naive re-derivations of the papers' formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import FAST, make_cfg, read_metrics
from kdrun.losses import StepOutputs, build_recipe
from kdrun.losses.logits import DIST, DecoupledKD, SoftTargets, decoupled_kd_parts, dist_loss, soft_target_kl
from kdrun.run import run

# Two samples, four classes, labels 0 and 2: small enough to follow by hand.
STUDENT = [[1.0, 0.5, -0.3, 0.2], [0.1, -1.2, 0.8, 0.4]]
TEACHER = [[2.0, 0.1, -1.0, 0.5], [-0.5, 0.3, 2.2, 0.0]]
LABELS = [0, 2]


def softmax(z: list[float], T: float = 1.0) -> list[float]:
    exps = [math.exp(v / T) for v in z]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def zscore(z: list[float]) -> list[float]:
    mean = sum(z) / len(z)
    std = math.sqrt(sum((v - mean) ** 2 for v in z) / (len(z) - 1))  # Bessel-corrected, as the authors' code
    return [(v - mean) / std for v in z]


def dkd_by_hand(student, teacher, labels, alpha, beta, T) -> float:
    """Eq. (2) of the DKD paper, one sample and one class at a time."""
    total = 0.0
    for s, t, label in zip(student, teacher, labels):
        p_s, p_t = softmax(s, T), softmax(t, T)
        tckd = kl([p_t[label], 1 - p_t[label]], [p_s[label], 1 - p_s[label]])
        rest_s = [p_s[k] / (1 - p_s[label]) for k in range(len(s)) if k != label]
        rest_t = [p_t[k] / (1 - p_t[label]) for k in range(len(t)) if k != label]
        total += T * T * (alpha * tckd + beta * kl(rest_t, rest_s))
    return total / len(labels)


def outputs_of(student, teacher, labels=None, progress=None) -> StepOutputs:
    labels = torch.tensor(labels if labels is not None else [0] * len(student))
    return StepOutputs(student_logits=student, labels=labels, teacher_logits=teacher, progress=progress)


# --- logit standardisation ---------------------------------------------------------------


def test_standardized_kd_matches_kl_of_zscored_logits():
    T = 2.0
    expected = sum(T * T * kl(softmax(zscore(t), T), softmax(zscore(s), T)) for s, t in zip(STUDENT, TEACHER)) / 2
    got = soft_target_kl(torch.tensor(STUDENT), torch.tensor(TEACHER), T, standardize_logits=True)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_standardized_kd_ignores_logit_shift_and_scale_but_plain_kd_does_not():
    # The paper's point: the student need only match the teacher's logit relations, not their range.
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    rescaled = 3.0 * student + 1.5
    assert soft_target_kl(rescaled, teacher, 4.0, True).item() == pytest.approx(
        soft_target_kl(student, teacher, 4.0, True).item(), rel=1e-4
    )
    assert soft_target_kl(rescaled, teacher, 4.0).item() != pytest.approx(soft_target_kl(student, teacher, 4.0).item(), rel=1e-2)


def test_soft_targets_default_is_unchanged_and_describes_standardisation():
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    plain = SoftTargets(T=4)(outputs_of(student, teacher))
    assert plain.item() == pytest.approx(sum(16 * kl(softmax(t, 4), softmax(s, 4)) for s, t in zip(STUDENT, TEACHER)) / 2, rel=1e-5)
    assert SoftTargets(T=4).describe() == "KD(T=4)"
    assert SoftTargets(T=2, standardize=True).describe() == "KD(T=2,std)"


# --- DKD ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, beta, T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 1.0, 3.0)])
def test_dkd_matches_loops_over_classes(alpha, beta, T):
    term = DecoupledKD(alpha=alpha, beta=beta, T=T)
    got = term(outputs_of(torch.tensor(STUDENT), torch.tensor(TEACHER), LABELS))
    assert got.item() == pytest.approx(dkd_by_hand(STUDENT, TEACHER, LABELS, alpha, beta, T), rel=1e-5)


def test_dkd_parts_recompose_hinton_kd():
    # Paper, Eq. (1)-(3): KD = TCKD + (1 - p_t^teacher) * NCKD, per sample, at any temperature.
    torch.manual_seed(1)
    student, teacher, labels = torch.randn(6, 5) * 3, torch.randn(6, 5) * 3, torch.randint(0, 5, (6,))
    for T in (1.0, 4.0):
        tckd, nckd = decoupled_kd_parts(student, teacher, labels, T)
        teacher_target = torch.softmax(teacher / T, dim=1).gather(1, labels[:, None]).squeeze(1)
        for i in range(6):
            kd_i = soft_target_kl(student[i : i + 1], teacher[i : i + 1], T)
            assert (tckd[i] + (1 - teacher_target[i]) * nckd[i]).item() == pytest.approx(kd_i.item(), rel=1e-4, abs=1e-6)


def test_dkd_is_finite_for_a_confident_teacher_and_zero_for_a_perfect_student():
    teacher = torch.tensor([[60.0, 0.0, -5.0, 1.0]])  # p_target = 1 in float32
    tckd, nckd = decoupled_kd_parts(torch.zeros(1, 4), teacher, torch.tensor([0]), 1.0)
    assert torch.isfinite(tckd).all() and torch.isfinite(nckd).all()
    logits = torch.randn(3, 5)
    assert DecoupledKD()(outputs_of(logits, logits.clone(), [1, 2, 3])).item() == pytest.approx(0.0, abs=1e-5)


def test_dkd_warmup_and_standardisation():
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    term = DecoupledKD(warmup_epochs=20)
    full = term(outputs_of(student, teacher, LABELS)).item()  # probe batch: progress None
    # mdistiller's min(epoch / 20, 1), epoch counted from 1 and constant within the epoch.
    assert term(outputs_of(student, teacher, LABELS, progress=0.0)).item() == pytest.approx(full / 20)
    assert term(outputs_of(student, teacher, LABELS, progress=0.99)).item() == pytest.approx(full / 20)
    assert term(outputs_of(student, teacher, LABELS, progress=4.0)).item() == pytest.approx(full / 4)
    assert term(outputs_of(student, teacher, LABELS, progress=19.0)).item() == pytest.approx(full)
    assert term(outputs_of(student, teacher, LABELS, progress=35.0)).item() == pytest.approx(full)
    assert DecoupledKD(warmup_epochs=0)(outputs_of(student, teacher, LABELS, progress=0.0)).item() == pytest.approx(full)

    std = DecoupledKD(alpha=1, beta=8, T=2, standardize=True)
    zs, zt = [zscore(s) for s in STUDENT], [zscore(t) for t in TEACHER]
    assert std(outputs_of(student, teacher, LABELS)).item() == pytest.approx(dkd_by_hand(zs, zt, LABELS, 1, 8, 2), rel=1e-5)
    assert std.describe() == "DKD(a=1,b=8,T=2,std)"


# --- DIST --------------------------------------------------------------------------------


def test_dist_matches_numpy_corrcoef():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(6, 5)) * 2, rng.normal(size=(6, 5)) * 2
    for tau, beta, gamma in [(1.0, 1.0, 1.0), (4.0, 2.0, 0.5)]:
        p_s = np.exp(student / tau) / np.exp(student / tau).sum(1, keepdims=True)
        p_t = np.exp(teacher / tau) / np.exp(teacher / tau).sum(1, keepdims=True)
        inter = 1 - np.mean([np.corrcoef(p_s[i], p_t[i])[0, 1] for i in range(6)])
        intra = 1 - np.mean([np.corrcoef(p_s[:, c], p_t[:, c])[0, 1] for c in range(5)])
        expected = tau**2 * (beta * inter + gamma * intra)
        got = dist_loss(torch.tensor(student), torch.tensor(teacher), beta, gamma, tau)
        assert got.item() == pytest.approx(expected, rel=1e-6)
        # Each piece alone (beta or gamma switched off) against its own corrcoef value.
        assert dist_loss(torch.tensor(student), torch.tensor(teacher), 1.0, 0.0, tau).item() == pytest.approx(tau**2 * inter, rel=1e-6)
        assert dist_loss(torch.tensor(student), torch.tensor(teacher), 0.0, 1.0, tau).item() == pytest.approx(tau**2 * intra, rel=1e-6)


def test_dist_is_zero_for_a_perfect_student_and_two_for_an_anticorrelated_one():
    logits = torch.randn(4, 6)
    assert DIST()(outputs_of(logits, logits.clone())).item() == pytest.approx(0.0, abs=1e-5)
    # Two classes, probabilities mirrored: every correlation is -1, so inter = intra = 2.
    student = torch.tensor([[1.0, -1.0], [-2.0, 2.0], [0.5, 0.0]])
    assert dist_loss(student, student.flip(1), 1.0, 1.0, 1.0).item() == pytest.approx(4.0, rel=1e-5)


# --- gradients and recipes ---------------------------------------------------------------


@pytest.mark.parametrize("term", [SoftTargets(T=2, standardize=True), DecoupledKD(), DecoupledKD(standardize=True), DIST(tau=4)])
def test_gradients_reach_student_not_teacher(term):
    torch.manual_seed(2)
    student = torch.randn(8, 5, requires_grad=True)
    teacher = torch.randn(8, 5, requires_grad=True)
    loss = term(outputs_of(student, teacher.detach(), [0, 1, 2, 3, 4, 0, 1, 2], progress=30.0))
    assert loss.requires_grad
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize(
    "overrides, formula",
    [
        (["loss=dkd"], "L = 1*CE + 1*DKD(a=1,b=8,T=4)"),
        (["loss=dist"], "L = 1*CE + 2*DIST(b=1,g=1,tau=4)"),
        (["loss=kd", "loss.kd.standardize=true"], "L = 0.1*CE + 0.9*KD(T=4,std)"),
        (["loss=kd_ls", "T=2"], "L = 0.1*CE + 9*KD(T=2,std)"),
        (["loss=kd"], "L = 0.1*CE + 0.9*KD(T=4)"),
    ],
)
def test_configs_compose_into_formulas(overrides, formula):
    assert str(build_recipe(make_cfg(*overrides).loss)) == formula


@pytest.mark.parametrize(
    "overrides, part",
    [(["loss=dkd"], "loss/dkd"), (["loss=dist"], "loss/dist"), (["loss=kd", "loss.kd.standardize=true"], "loss/kd")],
)
def test_trains_end_to_end_on_default_data(tmp_path, overrides, part):
    summary = run(make_cfg(*FAST, *overrides), tmp_path)
    assert summary["status"] == "completed"
    train_rows = [r for r in read_metrics(tmp_path) if r["model"] == "student" and r["split"] == "train"]
    assert len(train_rows) == 2 and all(part in r and math.isfinite(r[part]) for r in train_rows)
    assert summary["student"]["test_acc"] > 20.0  # above chance (10%) after two epochs


@pytest.mark.slow
def test_dkd_trains_on_unlike_resnets(tmp_path):
    cfg = make_cfg(
        "loss=dkd", "dataset=fake", "teacher=resnet32x4", "student=resnet8x4", "epochs=1",
        "dataset.source.num_train=64", "dataset.source.num_test=32", "teacher_training.epochs=1",
    )
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed"
    assert "loss/dkd" in [r for r in read_metrics(tmp_path) if r["split"] == "train" and r["model"] == "student"][0]
