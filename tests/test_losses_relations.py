"""Relation-based terms (RKD, SP, PKT, CC) against the papers' formulas written out a second,
naive way (plain Python loops over pairs and triplets), plus gradient and end-to-end checks."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import FAST, make_cfg, read_metrics, recipe_state
from kdrun.errors import ConfigError
from kdrun.losses import StepOutputs, build_recipe
from kdrun.losses.relations import (
    PKT,
    RKD,
    CorrelationCongruence,
    SimilarityPreserving,
    correlation_congruence_loss,
    shared_correlation_loss,
    pkt_loss,
    rkd_loss,
    similarity_preserving_loss,
    taylor_rbf_correlation,
)
from kdrun.run import run

UNLIKE_PAIR = [
    "dataset=fake", "teacher=resnet32x4", "student=resnet8x4", "epochs=1",
    "dataset.source.num_train=64", "dataset.source.num_test=32", "teacher_training.epochs=1",
]


def rows_of(x: torch.Tensor) -> list[list[float]]:
    return x.double().tolist()


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(v):
    n = math.sqrt(dot(v, v))
    return [x / n for x in v] if n > 0 else [0.0 for _ in v]


def huber(x, y):
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def rkd_by_loops(student, teacher, w_d=25.0, w_a=50.0):
    """Park et al. 2019, distance- and angle-wise losses, with Huber losses averaged over all pairs / triplets (diagonal included)."""
    n = len(student)

    def distances(x):
        d = [[math.dist(x[i], x[j]) for j in range(n)] for i in range(n)]
        mu = mean(d[i][j] for i in range(n) for j in range(n) if i != j)
        return [[v / mu for v in row] for row in d]

    def angles(x):  # angle[j][i][k] = <e_ij, e_kj>, vertex j
        def e(i, j):
            return unit([a - b for a, b in zip(x[i], x[j])])

        return [[[dot(e(i, j), e(k, j)) for k in range(n)] for i in range(n)] for j in range(n)]

    ds, dt = distances(student), distances(teacher)
    loss_d = mean(huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n))
    a_s, a_t = angles(student), angles(teacher)
    loss_a = mean(huber(a_s[j][i][k], a_t[j][i][k]) for i in range(n) for j in range(n) for k in range(n))
    return w_d * loss_d + w_a * loss_a


def sp_by_loops(student, teacher):
    """Tung & Mori 2019: row-normalised Gram matrices, squared Frobenius distance / B^2."""
    n = len(student)
    g_s = [unit([dot(student[i], student[j]) for j in range(n)]) for i in range(n)]
    g_t = [unit([dot(teacher[i], teacher[j]) for j in range(n)]) for i in range(n)]
    return sum((g_s[i][j] - g_t[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


def pkt_by_loops(student, teacher):
    """Passalis & Tefas 2018: conditionals from the shifted cosine kernel, KL(teacher || student) / B^2."""
    n = len(student)

    def conditionals(x):
        u = [unit(v) for v in x]
        kernel = [[(dot(u[i], u[j]) + 1) / 2 for j in range(n)] for i in range(n)]
        return [[k / sum(row) for k in row] for row in kernel]

    q, p = conditionals(student), conditionals(teacher)
    return sum(p[i][j] * math.log(p[i][j] / q[i][j]) for i in range(n) for j in range(n)) / n**2


def cc_by_loops(student, teacher, gamma=0.4, order=2):
    """Peng et al. 2019, Taylor-approximated Gaussian RBF correlations on L2-normalised embeddings."""
    n = len(student)

    def correlation(x):
        u = [unit(v) for v in x]
        return [
            [sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot(u[i], u[j]) ** p for p in range(order + 1))
             for j in range(n)]
            for i in range(n)
        ]

    c_s, c_t = correlation(student), correlation(teacher)
    return sum((c_s[i][j] - c_t[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


# A 4 x 3 example: distinct points, no two directions parallel, distances of mixed sizes
# so that both branches of the Huber loss are used.
STUDENT_4x3 = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 0.5, 3.0]])
TEACHER_4x3 = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, 2.0], [2.0, 2.0, -1.0], [-1.0, 0.0, 0.5]])


def test_rkd_matches_loops_over_pairs_and_triplets():
    expected = rkd_by_loops(rows_of(STUDENT_4x3), rows_of(TEACHER_4x3))
    assert expected > 0
    assert rkd_loss(STUDENT_4x3, TEACHER_4x3, 25.0, 50.0).item() == pytest.approx(expected, rel=1e-5)
    # The distance and angle parts separately, through the weights.
    only_d = rkd_by_loops(rows_of(STUDENT_4x3), rows_of(TEACHER_4x3), 1.0, 0.0)
    assert rkd_loss(STUDENT_4x3, TEACHER_4x3, 1.0, 0.0).item() == pytest.approx(only_d, rel=1e-5)


def test_rkd_ignores_scale_and_translation_and_tolerates_duplicates():
    # Distances are normalised by their mean and angles do not see scale: a scaled, shifted copy costs nothing.
    assert rkd_loss(3 * TEACHER_4x3 + 1.5, TEACHER_4x3, 25.0, 50.0).item() == pytest.approx(0.0, abs=1e-5)
    duplicated = torch.cat([STUDENT_4x3, STUDENT_4x3[:1]]).requires_grad_()
    loss = rkd_loss(duplicated, torch.randn(5, 3), 25.0, 50.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(duplicated.grad).all()


def test_sp_hand_value_and_loops():
    # G_s = I; teacher rows are equal, so its normalised Gram is 1/sqrt(2) everywhere:
    # (2 (1 - 1/sqrt2)^2 + 2 * 1/2) / 4 = 1 - sqrt(2)/2.
    student, teacher = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert similarity_preserving_loss(student, teacher).item() == pytest.approx(1 - math.sqrt(2) / 2, abs=1e-6)
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4), torch.randn(5, 7)  # widths may differ
    expected = sp_by_loops(rows_of(student), rows_of(teacher))
    assert similarity_preserving_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_pkt_hand_value_and_loops():
    # Student conditionals (2/3, 1/3) per row, teacher (1/2, 1/2): each row's KL is 1/2 ln(9/8); / B^2 = 4.
    student, teacher = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert pkt_loss(student, teacher).item() == pytest.approx(math.log(9 / 8) / 4, abs=1e-6)
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 3), torch.randn(6, 5)
    expected = pkt_by_loops(rows_of(student), rows_of(teacher))
    assert pkt_loss(student, teacher).item() == pytest.approx(expected, rel=1e-4)


def test_cc_taylor_kernel_approaches_the_gaussian_and_matches_loops():
    torch.manual_seed(2)
    features = torch.randn(4, 6)
    u = [unit(v) for v in rows_of(features)]
    gaussian = torch.tensor([[math.exp(-0.4 * math.dist(a, b) ** 2) for b in u] for a in u])
    assert torch.allclose(taylor_rbf_correlation(features, 0.4, 12).double(), gaussian.double(), atol=1e-6)
    student, teacher = torch.randn(5, 8), torch.randn(5, 8)
    expected = cc_by_loops(rows_of(student), rows_of(teacher))
    assert correlation_congruence_loss(student, teacher, 0.4, 2).item() == pytest.approx(expected, rel=1e-5)


def outputs_for(term, student: torch.Tensor, teacher: torch.Tensor) -> StepOutputs:
    return StepOutputs(
        student_logits=torch.zeros(len(student), 3),
        labels=torch.zeros(len(student), dtype=torch.long),
        student_features={term.student_taps[0]: student},
        teacher_features={term.teacher_taps[0]: teacher},
    )


@pytest.mark.parametrize("make_term", [RKD, SimilarityPreserving, PKT, CorrelationCongruence])
def test_gradients_reach_student_and_embeddings_not_teacher(make_term):
    torch.manual_seed(3)
    term = make_term()
    # An MLP-like student vector against a CNN-like teacher map: flattening makes them comparable.
    student = torch.randn(6, 10, requires_grad=True)
    teacher = torch.randn(6, 4, 5, requires_grad=True)  # not detached: the term must not build graph through it
    term.setup(outputs_for(term, student.detach(), teacher.detach()))
    loss = term(outputs_for(term, student, teacher))
    assert loss.dim() == 0 and loss.item() > 0
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    for name, param in term.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("make_term", [RKD, SimilarityPreserving, PKT, CorrelationCongruence])
def test_a_batch_of_one_has_no_relations_and_costs_nothing(make_term):
    term = make_term()
    student, teacher = torch.randn(1, 4), torch.randn(1, 3)
    term.setup(outputs_for(term, student, teacher))
    assert term(outputs_for(term, student, teacher)).item() == pytest.approx(0.0, abs=1e-6)


def test_cc_embeddings_are_sized_from_the_probe():
    term = CorrelationCongruence(embed_dim=16)
    term.setup(outputs_for(term, torch.randn(4, 10), torch.randn(4, 8, 3, 3)))
    shapes = {name: tuple(p.shape) for name, p in term.named_parameters()}
    assert shapes == {
        "embed_student.1.weight": (16, 10), "embed_student.1.bias": (16,),
        "embed_teacher.1.weight": (16, 72), "embed_teacher.1.bias": (16,),
    }


@pytest.mark.parametrize(
    "name, formula",
    [
        ("rkd", "L = 1*CE + 1*RKD(embedding,d=25,a=50)"),
        ("sp", "L = 1*CE + 3000*SP(last_stage)"),
        ("pkt", "L = 1*CE + 30000*PKT(embedding)"),
        ("cc", "L = 1*CE + 0.02*CC(embedding)"),
    ],
)
def test_configs_compose_to_the_paper_recipes(name, formula):
    assert str(build_recipe(make_cfg(f"loss={name}").loss)) == formula


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rkd", "sp", "pkt", "cc"])
def test_trains_cnn_teacher_to_mlp_student(tmp_path, name):
    summary = run(make_cfg(*FAST, f"loss={name}"), tmp_path)
    assert summary["status"] == "completed"
    train_rows = [r for r in read_metrics(tmp_path) if r["model"] == "student" and r["split"] == "train"]
    assert all(math.isfinite(r[f"loss/{name}"]) and r[f"loss/{name}"] >= 0 for r in train_rows)
    assert summary["student"]["test_acc"] > 15.0  # ten classes, two short epochs: above chance
    if name == "cc":  # the learned embeddings are trained and checkpointed with the recipe
        assert {"terms.cc.embed_student.1.weight", "terms.cc.embed_teacher.1.weight"} <= set(recipe_state(tmp_path))


@pytest.mark.slow  # most of the time goes to resnet32x4 itself (teacher provisioning, speed-up figure) on the CPU
@pytest.mark.parametrize("name", ["rkd", "sp"])
def test_trains_resnet32x4_to_resnet8x4_on_images(tmp_path, name):
    summary = run(make_cfg(*UNLIKE_PAIR, f"loss={name}"), tmp_path)
    assert summary["status"] == "completed"
    train_rows = [r for r in read_metrics(tmp_path) if r["model"] == "student" and r["split"] == "train"]
    assert train_rows and math.isfinite(train_rows[0][f"loss/{name}"]) and train_rows[0][f"loss/{name}"] > 0


def test_cc_reference_form_hand_value():
    # |s - t| rows (1, 2) and (3, 1) and (0, 2): consecutive products 1*3 + 2*1 = 5 and 3*0 + 1*2 = 2; mean 3.5.
    student = torch.tensor([[1.0, 2.0], [3.0, 1.0], [0.0, 2.0]])
    assert shared_correlation_loss(student, torch.zeros(3, 2)).item() == pytest.approx(3.5)
    assert shared_correlation_loss(student, -student).item() == pytest.approx(4 * 3.5)  # |2s| = 2|s|, products x4


@pytest.mark.parametrize("form", ["reference", "paper"])
def test_cc_forms_run_one_epoch_on_the_embedded_job(tmp_path, form):
    summary = run(make_cfg(*FAST, "epochs=1", "loss=cc", f"loss.cc.form={form}"), tmp_path)
    assert summary["status"] == "completed"
    assert summary["recipe"].endswith("0.02*CC(embedding)" if form == "reference" else "0.02*CC(embedding,paper,gamma=0.4,P=2)")
    (row,) = [r for r in read_metrics(tmp_path) if r["model"] == "student" and r["split"] == "train"]
    assert math.isfinite(row["loss/cc"]) and row["loss/cc"] >= 0


def test_cc_form_is_checked():
    with pytest.raises(ConfigError, match="loss.cc.form='taylor' must be one of reference, paper"):
        CorrelationCongruence(form="taylor")
