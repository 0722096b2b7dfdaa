"""The transformer classifier and the transformer distillation terms (TinyBERT, DistilBERT, MiniLM).

Term values are checked against the papers' formulas written a second, naive way
(explicit loops in plain Python on tiny tensors), not by calling the code twice.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FAST, make_cfg, read_metrics, read_summary

from kdrun.errors import ConfigError
from kdrun.features import FeatureTaps
from kdrun.losses import StepOutputs, build_recipe
from kdrun.losses.transformer import AttentionMap, HiddenCosine, HiddenMSE, is_attention
from kdrun.models import build
from kdrun.models.transformer import transformer
from kdrun.run import run

INPUTS = [((1, 40), 4, 10), ((1, 8, 8), 2, 16), ((3, 32, 32), 4, 64)]  # (input shape, patch, tokens)


# ---- model -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "patch", "tokens"), INPUTS)
def test_transformer_shapes_and_taps(shape, patch, tokens):
    model = transformer(num_classes=7, input_shape=shape, dim=16, depth=3, heads=2, patch=patch).eval()
    paths = ["stem", "stage1", "last_stage", "stage2.attn.probs", "last_stage.attn.probs", "embedding"]
    with FeatureTaps(model, paths) as taps:
        logits = model(torch.randn(3, *shape))
        assert logits.shape == (3, 7)
        for path in ("stem", "stage1", "last_stage"):
            assert taps[path].shape == (3, tokens, 16)
        for path in ("stage2.attn.probs", "last_stage.attn.probs"):
            probs = taps[path]
            assert probs.shape == (3, 2, tokens, tokens)
            assert (probs >= 0).all()
            assert torch.allclose(probs.sum(-1), torch.ones(3, 2, tokens), atol=1e-5)
        assert taps["embedding"].shape == (3, 16)
        assert torch.allclose(model.fc(taps["embedding"]), logits, atol=1e-6)


def test_attention_probs_are_softmax_of_scaled_dot_products():
    torch.manual_seed(0)
    model = transformer(num_classes=3, input_shape=(1, 8), dim=4, depth=1, heads=2, patch=2).eval()
    with FeatureTaps(model, ["stem", "stage1.attn.probs"]) as taps:
        model(torch.randn(1, 1, 8))
        tokens = model.stage1.norm1(taps["stem"])[0]
        probs = taps["stage1.attn.probs"][0]
    qkv = model.stage1.attn.qkv(tokens).tolist()  # per token: q (4), k (4), v (4); head h owns entries 2h, 2h+1
    for head in range(2):
        for i in range(4):
            q = qkv[i][2 * head : 2 * head + 2]
            scores = [
                sum(a * b for a, b in zip(q, qkv[j][4 + 2 * head : 4 + 2 * head + 2])) / math.sqrt(2) for j in range(4)
            ]
            expected = [math.exp(s) / sum(math.exp(v) for v in scores) for s in scores]
            assert probs[head, i].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"input_shape": (1, 42), "patch": 4}, "patch=4 must divide"),
        ({"input_shape": (1, 40), "dim": 30, "heads": 4}, "dim=30 must be divisible by heads=4"),
        ({"input_shape": (40,)}, r"\(C, L\) or \(C, H, W\)"),
    ],
)
def test_transformer_rejects_bad_shapes(options, message):
    with pytest.raises(ConfigError, match=message):
        transformer(num_classes=10, **options)


def test_teacher_and_student_configs_build():
    cfg = make_cfg("teacher=transformer", "student=transformer_small")
    teacher, student = (build(cfg[side], 10, (1, 40)) for side in ("teacher", "student"))
    assert (cfg.teacher.arch, cfg.student.arch) == ("transformer", "transformer_small")
    assert (teacher.fc.in_features, teacher.stage4.attn.heads) == (64, 4)
    assert (student.fc.in_features, student.stage2.attn.heads) == (32, 2)
    assert not hasattr(student, "stage3")
    assert sum(p.numel() for p in teacher.parameters()) > 5 * sum(p.numel() for p in student.parameters())


# ---- terms against naive computations ----------------------------------------------------------


def outputs(student: dict, teacher: dict) -> StepOutputs:
    return StepOutputs(
        student_logits=torch.zeros(2, 3),
        labels=torch.zeros(2, dtype=torch.long),
        teacher_logits=torch.zeros(2, 3),
        student_features=student,
        teacher_features=teacher,
    )


def prepared(term, student: dict, teacher: dict) -> tuple:
    probe = outputs(student, teacher)
    term.setup(probe)
    return term, probe


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_hidden_mse_projects_student_tokens_with_learned_linear_map():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 2), torch.randn(2, 3, 4)  # (B, T, D): widths 2 -> 4
    term, probe = prepared(HiddenMSE(), {"last_stage": student}, {"last_stage": teacher})
    conv = term.projections[0]
    weight, bias = conv.weight[:, :, 0].tolist(), conv.bias.tolist()
    squares = []
    for b in range(2):
        for t in range(3):
            for d in range(4):
                projected = sum(weight[d][k] * student[b, t, k].item() for k in range(2)) + bias[d]
                squares.append((projected - teacher[b, t, d].item()) ** 2)
    assert term(probe).item() == pytest.approx(mean(squares), rel=1e-5)


def test_hidden_mse_pools_tokens_when_counts_differ():
    student = torch.arange(8.0).reshape(1, 4, 2)  # tokens (0,1) (2,3) (4,5) (6,7)
    teacher = torch.tensor([[[1.0, 1.0], [5.0, 7.0]]])  # two tokens, same width: no projection
    term, probe = prepared(HiddenMSE(), {"last_stage": student}, {"last_stage": teacher})
    assert isinstance(term.projections[0], torch.nn.Identity)
    # Student tokens pooled in pairs: (1, 2) and (5, 6); squared errors 0, 1, 0, 1.
    assert term(probe).item() == pytest.approx(0.5)


def test_hidden_mse_on_vector_student_and_channel_map_teacher():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 3), torch.randn(2, 2, 2)  # MLP vector vs 1-D CNN map (B, C, L)
    term, probe = prepared(HiddenMSE(teacher_layout="channels"), {"last_stage": student}, {"last_stage": teacher})
    linear = term.projections[0][1]
    weight, bias = linear.weight.tolist(), linear.bias.tolist()
    flat_teacher = teacher.reshape(2, 4).tolist()  # flattened channel by channel
    squares = [
        (sum(weight[j][k] * student[b, k].item() for k in range(3)) + bias[j] - flat_teacher[b][j]) ** 2
        for b in range(2)
        for j in range(4)
    ]
    assert term(probe).item() == pytest.approx(mean(squares), rel=1e-5)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_hidden_cosine_is_one_minus_cosine_per_token():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    term, probe = prepared(HiddenCosine(), {"last_stage": student}, {"last_stage": teacher})
    expected = mean(1 - cosine(student[b, t].tolist(), teacher[b, t].tolist()) for b in range(2) for t in range(3))
    assert term(probe).item() == pytest.approx(expected, rel=1e-5)
    assert term(outputs({"last_stage": teacher}, {"last_stage": teacher})).item() == pytest.approx(0, abs=1e-6)
    assert term(outputs({"last_stage": -teacher}, {"last_stage": teacher})).item() == pytest.approx(2, abs=1e-6)


def test_hidden_terms_sum_over_tap_pairs():
    torch.manual_seed(3)
    features = {name: torch.randn(2, 3, 4) for name in ("s1", "s2", "t1", "t2")}
    probe = outputs(features, features)
    singles = [
        prepared(HiddenCosine([s], [t]), features, features)[0](probe).item() for s, t in (("s1", "t1"), ("s2", "t2"))
    ]
    both, _ = prepared(HiddenCosine(["s1", "s2"], ["t1", "t2"]), features, features)
    assert both.describe() == "HiddenCos(s1->t1, s2->t2)"
    assert both(probe).item() == pytest.approx(sum(singles), rel=1e-6)


def test_forward_before_setup_is_an_error():
    probe = outputs({"last_stage": torch.randn(2, 3, 2)}, {"last_stage": torch.randn(2, 3, 4)})
    with pytest.raises(RuntimeError, match="setup"):
        HiddenMSE()(probe)


def softmax_rows(rows: list[list[float]]) -> list[list[float]]:
    return [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in rows]


def random_attention(*shape) -> torch.Tensor:
    return torch.randn(*shape).softmax(dim=-1)


def test_attention_mse_averages_heads():
    torch.manual_seed(4)
    student, teacher = random_attention(2, 2, 3, 3), random_attention(2, 2, 3, 3)
    term, probe = prepared(AttentionMap(), {"last_stage.attn.probs": student}, {"last_stage.attn.probs": teacher})
    per_head = [
        mean(
            (student[b, h, i, j].item() - teacher[b, h, i, j].item()) ** 2
            for b in range(2)
            for i in range(3)
            for j in range(3)
        )
        for h in range(2)
    ]
    assert term(probe).item() == pytest.approx(sum(per_head) / 2, rel=1e-5)


def test_attention_kl_is_minilm_row_kl_teacher_to_student():
    torch.manual_seed(5)
    student, teacher = random_attention(2, 2, 3, 3), random_attention(2, 2, 3, 3)
    term, probe = prepared(
        AttentionMap(form="kl"), {"last_stage.attn.probs": student}, {"last_stage.attn.probs": teacher}
    )
    rows = [
        sum(
            teacher[b, h, i, j].item() * math.log(teacher[b, h, i, j].item() / student[b, h, i, j].item())
            for j in range(3)
        )
        for b in range(2)
        for h in range(2)
        for i in range(3)
    ]
    assert term(probe).item() == pytest.approx(mean(rows), rel=1e-5)
    assert term(outputs({"last_stage.attn.probs": teacher}, probe.teacher_features)).item() == pytest.approx(
        0, abs=1e-6
    )


def test_attention_compares_head_averages_and_pools_tokens():
    torch.manual_seed(6)
    student, teacher = random_attention(1, 1, 2, 2), random_attention(1, 2, 4, 4)
    term, probe = prepared(AttentionMap(), {"last_stage.attn.probs": student}, {"last_stage.attn.probs": teacher})
    averaged = [[(teacher[0, 0, i, j].item() + teacher[0, 1, i, j].item()) / 2 for j in range(4)] for i in range(4)]
    pooled = [
        [sum(averaged[r][c] for r in (2 * i, 2 * i + 1) for c in (2 * j, 2 * j + 1)) / 4 for j in range(2)]
        for i in range(2)
    ]
    pooled = [[v / sum(row) for v in row] for row in pooled]  # rows renormalised to distributions
    expected = mean((student[0, 0, i, j].item() - pooled[i][j]) ** 2 for i in range(2) for j in range(2))
    assert term(probe).item() == pytest.approx(expected, rel=1e-5)


def test_attention_on_non_attention_features_uses_relation_maps():
    torch.manual_seed(7)
    student, teacher = torch.randn(2, 3), torch.randn(2, 2, 3)  # MLP vector, 1-D CNN map (C=2, L=3)
    term, probe = prepared(
        AttentionMap(["last_stage"], ["last_stage"], teacher_layout="channels"),
        {"last_stage": student},
        {"last_stage": teacher},
    )
    assert term.attention_taps == [(False, False)]
    squares = []
    for b in range(2):
        entries = student[b].tolist()  # a 1-channel signal of 3 positions
        student_map = softmax_rows([[entries[i] * entries[j] for j in range(3)] for i in range(3)])
        columns = teacher[b].T.tolist()  # the 3 positions' 2-channel features
        teacher_map = softmax_rows(
            [[sum(x * y for x, y in zip(columns[i], columns[j])) / math.sqrt(2) for j in range(3)] for i in range(3)]
        )
        squares += [(student_map[i][j] - teacher_map[i][j]) ** 2 for i in range(3) for j in range(3)]
    assert term(probe).item() == pytest.approx(mean(squares), rel=1e-5)


def test_attention_detection_tells_probabilities_from_square_feature_maps():
    assert is_attention(random_attention(2, 4, 5, 5))
    assert not is_attention(torch.rand(2, 4, 5, 5))  # a non-negative CNN map with H = W
    assert not is_attention(random_attention(2, 5, 5))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: HiddenMSE(["stage1", "stage2"], ["stage3"]), r"student_taps.*stage2.*teacher_taps.*stage3"),
        (lambda: HiddenCosine(student_layout="nchw"), "student_layout='nchw' must be one of tokens, channels"),
        (lambda: AttentionMap(form="l1"), "form='l1' must be one of mse, kl"),
    ],
)
def test_bad_term_arguments_are_config_errors(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


# ---- gradients and state -----------------------------------------------------------------------


@pytest.mark.parametrize("term_class", [HiddenMSE, HiddenCosine])
def test_hidden_gradients_reach_student_and_projection_not_teacher(term_class):
    torch.manual_seed(8)
    student = torch.randn(2, 5, 3, requires_grad=True)
    teacher = torch.randn(2, 4, 6, requires_grad=True)  # fewer tokens, wider
    term, _ = prepared(term_class(), {"last_stage": student.detach()}, {"last_stage": teacher.detach()})
    term(outputs({"last_stage": student}, {"last_stage": teacher})).backward()
    assert student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.projections.parameters())
    assert teacher.grad is None


@pytest.mark.parametrize("form", ["mse", "kl"])
def test_attention_gradients_reach_student_not_teacher(form):
    torch.manual_seed(9)
    student_scores, teacher_scores = (
        torch.randn(2, 2, 3, 3, requires_grad=True),
        torch.randn(2, 4, 3, 3, requires_grad=True),
    )
    student, teacher = student_scores.softmax(-1), teacher_scores.softmax(-1)
    term, _ = prepared(
        AttentionMap(form=form),
        {"last_stage.attn.probs": student.detach()},
        {"last_stage.attn.probs": teacher.detach()},
    )
    term(outputs({"last_stage.attn.probs": student}, {"last_stage.attn.probs": teacher})).backward()
    assert student_scores.grad.abs().sum() > 0
    assert teacher_scores.grad is None


def test_projections_round_trip_through_state_dict():
    probe = outputs({"last_stage": torch.randn(2, 3, 2)}, {"last_stage": torch.randn(2, 3, 4)})
    trained, fresh = HiddenMSE(), HiddenMSE()
    trained.setup(probe)
    fresh.setup(probe)
    fresh.load_state_dict(trained.state_dict())
    assert fresh(probe).item() == pytest.approx(trained(probe).item())


def test_recipes_compose_and_print_as_formulas():
    assert str(build_recipe(make_cfg("loss=hidden_mse").loss)) == "L = 1*CE + 1*HiddenMSE(last_stage->last_stage)"
    assert str(build_recipe(make_cfg("loss=hidden_cosine").loss)) == "L = 1*CE + 1*HiddenCos(last_stage->last_stage)"
    attention = build_recipe(make_cfg("loss=attention_map", "loss.attention_map.form=kl").loss)
    assert str(attention) == "L = 1*CE + 1*AttnMap(kl; last_stage.attn.probs->last_stage.attn.probs)"
    distilbert = build_recipe(make_cfg("loss=distilbert").loss)
    assert str(distilbert) == "L = 2*CE + 1*HiddenCos(last_stage->last_stage) + 5*KD(T=2)"
    assert "KD(T=3)" in str(build_recipe(make_cfg("loss=distilbert", "loss.kd.T=3").loss))


# ---- end to end --------------------------------------------------------------------------------

TRANSFORMERS = ["teacher=transformer", "student=transformer_small", "scratch=false"]
LAST_STAGE_ATTENTION = ["loss.attention_map.student_taps=[last_stage]", "loss.attention_map.teacher_taps=[last_stage]"]


def check_run(run_dir, parts):
    summary = read_summary(run_dir)
    assert summary["status"] == "completed", summary.get("error")
    train_rows = [r for r in read_metrics(run_dir) if r["model"] == "student" and r["split"] == "train"]
    assert train_rows and all(
        set(parts) <= set(row) and all(math.isfinite(row[p]) for p in parts) for row in train_rows
    )
    return summary


@pytest.mark.parametrize(
    ("loss", "parts"),
    [
        ("hidden_mse", ["loss/ce", "loss/hidden_mse"]),
        ("hidden_cosine", ["loss/ce", "loss/hidden_cosine"]),
        ("attention_map", ["loss/ce", "loss/attention_map"]),
        ("distilbert", ["loss/ce", "loss/kd", "loss/hidden_cosine"]),
    ],
)
@pytest.mark.slow
def test_transformer_to_transformer_runs(loss, parts, tmp_path):
    run(make_cfg(*FAST, *TRANSFORMERS, f"loss={loss}"), tmp_path)
    summary = check_run(tmp_path, parts)
    assert summary["teacher"]["arch"] == "transformer" and summary["student"]["arch"] == "transformer_small"
    assert summary["teacher"]["test_acc"] > 20.0  # chance is 10%


@pytest.mark.parametrize(
    ("loss", "extra"), [("hidden_mse", []), ("hidden_cosine", []), ("attention_map", LAST_STAGE_ATTENTION)]
)
@pytest.mark.slow
def test_default_cnn_to_mlp_pair_runs(loss, extra, tmp_path):
    run(make_cfg(*FAST, "scratch=false", f"loss={loss}", *extra), tmp_path)
    check_run(tmp_path, ["loss/ce", f"loss/{loss}"])


IMAGES = [
    "dataset=fake",
    "dataset.source.image_size=16",
    "teacher=resnet32x4",
    "student=resnet8x4",
    "epochs=1",
    "dataset.source.num_train=64",
    "dataset.source.num_test=32",
    "teacher_training.epochs=1",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss", "extra"), [("hidden_mse", []), ("hidden_cosine", []), ("attention_map", LAST_STAGE_ATTENTION)]
)
def test_resnet_pair_runs(loss, extra, tmp_path):
    """Image maps: same shapes for the hidden terms; square (B, C, H, W) maps are not taken for attention."""
    run(make_cfg(*IMAGES, f"loss={loss}", *extra), tmp_path)
    check_run(tmp_path, ["loss/ce", f"loss/{loss}"])
