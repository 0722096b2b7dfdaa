"""FitNet, AT and VID against values worked out by hand or by naive loops, plus gradient,
config-composition and end-to-end checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import FAST, make_cfg, read_metrics, recipe_state
from kdrun.errors import ConfigError
from kdrun.losses import StepOutputs, build_recipe
from kdrun.losses.features import VID, AttentionTransfer, FitNet, attention_transfer, gaussian_nll
from kdrun.run import run

UNLIKE_PAIR = [
    "dataset=fake", "teacher=resnet32x4", "student=resnet8x4", "epochs=1",
    "dataset.source.num_train=64", "dataset.source.num_test=32", "teacher_training.epochs=1",
]


def outputs_with(student: dict, teacher: dict) -> StepOutputs:
    return StepOutputs(
        student_logits=torch.zeros(2, 3), labels=torch.zeros(2, dtype=torch.long),
        teacher_logits=torch.zeros(2, 3), student_features=student, teacher_features=teacher,
    )


def block_mean(maps: np.ndarray, size: int) -> np.ndarray:
    """Average pooling of (B, C, H, W) by explicit loops to (B, C, size, size); H divisible by size."""
    b, c, h, _ = maps.shape
    k = h // size
    pooled = np.zeros((b, c, size, size))
    for i in range(size):
        for j in range(size):
            pooled[:, :, i, j] = maps[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k].mean(axis=(2, 3))
    return pooled


# --- attention transfer -------------------------------------------------------------------


def test_attention_transfer_hand_value():
    # Student channels (1, 2) and (3, 0): attention (1+9)/2, (4+0)/2 = (5, 2) -> (5, 2)/sqrt(29).
    # Teacher attention (1, 0). Squared distance 2 - 2*5/sqrt(29), averaged over 2 positions.
    student = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    expected = (2 - 2 * 5 / math.sqrt(29)) / 2
    assert attention_transfer(student, teacher, p=2).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.0715233, abs=1e-6)


def test_attention_transfer_vector_student_against_map_teacher():
    # Vector (1, 1, 2, 0) -> |f|^2 = (1, 1, 4, 0), pooled to the teacher's 2 positions: (1, 2).
    # Teacher one-channel map (3, 0) -> (9, 0) -> (1, 0). Loss (2 - 2/sqrt(5)) / 2.
    student = torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    teacher = torch.tensor([[[3.0, 0.0]]])
    assert attention_transfer(student, teacher).item() == pytest.approx(1 - 1 / math.sqrt(5), rel=1e-6)


def naive_attention_loss(student: np.ndarray, teacher: np.ndarray, p: float) -> float:
    """The paper's formula with loops: pool maps to the smaller size, Q = sum_c |F_c|^p / C,
    Q / ||Q||, then the squared difference averaged over batch and positions."""
    size = min(student.shape[2], teacher.shape[2])
    total, count = 0.0, 0
    for s_map, t_map in zip(block_mean(student, size), block_mean(teacher, size)):
        q = []
        for feature in (s_map, t_map):
            a = [sum(abs(feature[c, i, j]) ** p for c in range(feature.shape[0])) / feature.shape[0]
                 for i in range(size) for j in range(size)]
            norm = math.sqrt(sum(v * v for v in a))
            q.append([v / norm for v in a])
        total += sum((x - y) ** 2 for x, y in zip(*q))
        count += len(q[0])
    return total / count


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
def test_attention_transfer_against_loops_on_unlike_maps(p):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 4, 4)
    expected = naive_attention_loss(student.double().numpy(), teacher.double().numpy(), p)
    assert attention_transfer(student, teacher, p).item() == pytest.approx(expected, rel=1e-4)


def test_at_sums_over_stage_pairs():
    torch.manual_seed(1)
    features = {f"stage{i}": torch.randn(2, 3, 4, 4) for i in (1, 2)}
    teacher = {f"stage{i}": torch.randn(2, 5, 8, 8) for i in (1, 2)}
    term = AttentionTransfer(["stage1", "stage2"], ["stage1", "stage2"])
    expected = sum(naive_attention_loss(features[k].double().numpy(), teacher[k].double().numpy(), 2) for k in features)
    assert term(outputs_with(features, teacher)).item() == pytest.approx(expected, rel=1e-4)
    assert term.describe() == "AT(p=2, stage1->stage1, stage2->stage2)"


# --- FitNet ---------------------------------------------------------------------------------


def test_fitnet_regressor_and_mse_against_loops_where_the_teacher_map_is_pooled():
    # A student map 3x smaller than the teacher's: the reference has no conv for that; kdrun pools
    # the teacher's map to the student's size and regresses with a 1x1 conv + BN (ReLU off here).
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 3, 2, 2), torch.randn(2, 5, 6, 6)
    term = FitNet("stage2", "stage3", relu=False)
    outputs = outputs_with({"stage2": student}, {"stage3": teacher})
    term.setup(outputs)
    conv, bn = term.regressor.layers
    assert isinstance(conv, nn.Conv2d) and conv.weight.shape == (5, 3, 1, 1) and isinstance(bn, nn.BatchNorm2d)
    term.eval()  # BN uses its running statistics (mean 0, var 1): y = w*x / sqrt(1 + eps) + b
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    pooled = block_mean(teacher.double().numpy(), 2)
    w, gamma, beta = conv.weight.detach().double().numpy()[:, :, 0, 0], bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    squared = []
    for b in range(2):
        for o in range(5):
            for i in range(2):
                for j in range(2):
                    regressed = sum(w[o, c] * student[b, c, i, j].item() for c in range(3)) / math.sqrt(1 + bn.eps) * gamma[o] + beta[o]
                    squared.append((regressed - pooled[b, o, i, j]) ** 2)
    assert term(outputs).item() == pytest.approx(sum(squared) / len(squared), rel=1e-5)
    assert term.describe() == "FitNet(stage2->stage3, no ReLU)"


@pytest.mark.parametrize(
    "student_size, teacher_size, conv_type, kernel, stride",
    [(8, 4, nn.Conv2d, (3, 3), (2, 2)), (4, 8, nn.ConvTranspose2d, (4, 4), (2, 2)), (6, 4, nn.Conv2d, (3, 3), (1, 1)),
     (4, 4, nn.Conv2d, (1, 1), (1, 1))],
)
def test_fitnet_regressor_maps_the_student_size_onto_the_teachers_as_repdistiller(student_size, teacher_size, conv_type, kernel, stride):
    student, teacher = torch.randn(2, 3, student_size, student_size), torch.randn(2, 5, teacher_size, teacher_size)
    term = FitNet("stage2", "stage2")
    outputs = outputs_with({"stage2": student}, {"stage2": teacher})
    term.setup(outputs)
    conv, bn, relu = term.regressor.layers
    assert type(conv) is conv_type and conv.kernel_size == kernel and conv.stride == stride and conv.bias is not None
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
    prediction, target = term.regressor(student, teacher)
    assert prediction.shape == teacher.shape and target is teacher and (prediction >= 0).all()


def test_fitnet_is_zero_when_regressed_student_equals_teacher():
    term = FitNet()
    teacher = torch.randn(4, 6)
    outputs = outputs_with({"last_stage": teacher.clone()}, {"last_stage": teacher})
    term.setup(outputs)
    term.regressor.layers = nn.Identity()
    assert term(outputs).item() == 0.0


def test_fitnet_vector_student_to_map_teacher_uses_a_linear_regressor():
    term = FitNet()
    outputs = outputs_with({"last_stage": torch.randn(4, 8)}, {"last_stage": torch.randn(4, 3, 5)})
    term.setup(outputs)
    linear = term.regressor.layers[1]
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (8, 15)
    assert term(outputs).shape == ()


# --- VID ------------------------------------------------------------------------------------


def test_gaussian_nll_hand_value():
    # 0.5*(log 1 + 1/1) = 0.5 and 0.5*(log 4 + 4/4) = 1.193147; their mean is 0.846574.
    target, mean, variance = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.tensor([[1.0, 4.0]])
    assert gaussian_nll(target, mean, variance).item() == pytest.approx(0.5 * (0.5 + 0.5 * (math.log(4) + 1)), rel=1e-6)


def test_vid_variance_starts_at_init_and_hidden_width_is_teacher_channels():
    term = VID(init_pred_var=5.0)
    term.setup(outputs_with({"last_stage": torch.randn(2, 3, 4, 4)}, {"last_stage": torch.randn(2, 7, 4, 4)}))
    (regressor,) = term.regressors
    _, variance = regressor(torch.randn(2, 3, 4, 4))
    assert variance.shape == (1, 7, 1, 1)
    assert torch.allclose(variance, torch.full_like(variance, 5.0))
    assert [layer.weight.shape[:2] for layer in regressor.mean if isinstance(layer, nn.Conv2d)] == [(7, 3), (7, 7), (7, 7)]


def test_vid_against_loops_with_per_channel_variance():
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)
    term = VID("stage1", "stage2", hidden=5)
    outputs = outputs_with({"stage1": student}, {"stage2": teacher})
    term.setup(outputs)
    (regressor,) = term.regressors
    with torch.no_grad():
        regressor.alpha.uniform_(-1, 2)
        mean = regressor.mean(torch.from_numpy(block_mean(student.numpy(), 2)).float()).double().numpy()
    alpha = regressor.alpha.detach().double().numpy()
    terms = []
    for b in range(2):
        for c in range(4):
            var = math.log1p(math.exp(alpha[c])) + 1e-5
            for i in range(2):
                for j in range(2):
                    terms.append(0.5 * (math.log(var) + (teacher[b, c, i, j].item() - mean[b, c, i, j]) ** 2 / var))
    assert term(outputs).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert term.describe() == "VID(stage1->stage2)"


# --- all three: gradients, taps, errors ----------------------------------------------------

UNLIKE_SHAPES = [((4, 8), (4, 6, 5)), ((4, 6, 8, 8), (4, 10, 4, 4)), ((4, 6, 10), (4, 3, 20))]


@pytest.mark.parametrize("make_term", [FitNet, AttentionTransfer, VID])
@pytest.mark.parametrize("student_shape, teacher_shape", UNLIKE_SHAPES)
def test_gradients_reach_student_and_adapters_not_teacher(make_term, student_shape, teacher_shape):
    torch.manual_seed(4)
    student = torch.randn(student_shape, requires_grad=True)
    teacher = torch.randn(teacher_shape, requires_grad=True)
    term = make_term()
    outputs = outputs_with({"last_stage": student}, {"last_stage": teacher})
    with torch.no_grad():
        term.setup(outputs)
    loss = term(outputs)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    for name, param in term.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_taps_come_from_config_as_one_path_or_a_list():
    assert FitNet("stage1", "stage3").student_taps == ("stage1",)
    assert AttentionTransfer("stage2", "stage3").teacher_taps == ("stage3",)
    assert VID(["stage1", "stage2"], ["stage2", "stage3"]).student_taps == ("stage1", "stage2")


@pytest.mark.parametrize("make_term", [AttentionTransfer, VID])
def test_unequal_tap_lists_are_config_errors(make_term):
    with pytest.raises(ConfigError, match="one to one"):
        make_term(["stage1", "stage2"], ["stage3"])


# --- configs and end-to-end runs -----------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, formula",
    [
        (["loss=fitnet"], "L = 1*CE + 100*FitNet(last_stage->last_stage)"),
        (["loss=at"], "L = 1*CE + 1000*AT(p=2, last_stage->last_stage)"),
        (["loss=vid"], "L = 1*CE + 1*VID(last_stage->last_stage)"),
        (["loss=kd_fitnet"], "L = 0.1*CE + 0.9*KD(T=4) + 100*FitNet(last_stage->last_stage)"),
        (["loss=kd_fitnet", "alpha=0.5", "T=2"], "L = 0.5*CE + 0.5*KD(T=2) + 100*FitNet(last_stage->last_stage)"),
        # fitnet.yaml pulls in ce.yaml after kd's CE, so a list composition keeps CE at weight 1.
        (["loss=[kd,fitnet]", "loss.fitnet.weight=100"], "L = 1*CE + 0.9*KD(T=4) + 100*FitNet(last_stage->last_stage)"),
    ],
)
def test_loss_configs_compose_into_formulas(overrides, formula):
    assert str(build_recipe(make_cfg(*overrides).loss)) == formula


@pytest.mark.parametrize("name", ["fitnet", "at", "vid"])
def test_default_pair_cnn_teacher_to_mlp_student(tmp_path, name):
    summary = run(make_cfg(*FAST, f"loss={name}"), tmp_path)
    assert summary["status"] == "completed"
    train_rows = [r for r in read_metrics(tmp_path) if r["model"] == "student" and r["split"] == "train"]
    assert len(train_rows) == 2 and all(math.isfinite(r[f"loss/{name}"]) for r in train_rows)
    assert train_rows[1][f"loss/{name}"] < train_rows[0][f"loss/{name}"]  # the student moves towards the teacher
    assert summary["student"]["test_acc"] > 12.0  # chance is 10%; two short epochs under a heavy hint weight
    adapters = [key for key in recipe_state(tmp_path) if key.startswith(f"terms.{name}.")]
    assert bool(adapters) == (name != "at")  # FitNet and VID adapters are checkpointed; AT has none


@pytest.mark.slow
def test_unlike_pair_resnet32x4_to_resnet8x4_with_fitnet_and_at(tmp_path):
    # One run covers both terms: 256-channel 8x8 maps on both sides, images instead of signals.
    summary = run(make_cfg(*UNLIKE_PAIR, "loss=[fitnet,at]"), tmp_path)
    assert summary["status"] == "completed"
    assert summary["recipe"] == "L = 1*CE + 100*FitNet(last_stage->last_stage) + 1000*AT(p=2, last_stage->last_stage)"
    (row,) = [r for r in read_metrics(tmp_path) if r["model"] == "student" and r["split"] == "train"]
    assert math.isfinite(row["loss/fitnet"]) and math.isfinite(row["loss/at"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["at", "vid"])
def test_stage_groups_run_on_the_embedded_job_where_the_models_have_as_many_stages(tmp_path, name):
    # The cnn teacher and the mlp student have three stages each: stage1..3 are paired one to one.
    taps = [f"loss.{name}.student_taps=[stages]", f"loss.{name}.teacher_taps=[stages]"]
    summary = run(make_cfg(*FAST, "epochs=1", "student=mlp", f"loss={name}", *taps), tmp_path)
    assert summary["status"] == "completed" and f"{name.upper()}(" in summary["recipe"] and "stages->stages" in summary["recipe"]
    if name == "vid":
        assert sorted({key.split(".")[3] for key in recipe_state(tmp_path) if key.startswith("terms.vid.regressors.")}) == ["0", "1", "2"]


def test_stage_groups_are_refused_on_the_default_pair_whose_stage_counts_differ(tmp_path):
    # cnn: 3 stages, mlp_small: 2; the refusal comes before a teacher trains or a file is written.
    cfg = make_cfg(*FAST, "loss=at", "loss.at.student_taps=[stages]", "loss.at.teacher_taps=[stages]")
    with pytest.raises(ConfigError, match=r"counts differ"):
        run(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_fitnet_without_relu_runs_on_the_embedded_job(tmp_path):
    summary = run(make_cfg(*FAST, "epochs=1", "loss=fitnet", "loss.fitnet.relu=false"), tmp_path)
    assert summary["status"] == "completed" and "FitNet(last_stage->last_stage, no ReLU)" in summary["recipe"]
