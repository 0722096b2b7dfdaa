"""Token-level and layer-to-layer LM terms against values worked out by hand (plain Python loops
over the formulas of the papers), padding excluded, and the layer mappings.

Reference formulas: forward KL (Hinton et al. 2015), reverse KL (MiniLLM), generalised JSD
(GKD, Agarwal et al. 2024, Eq. 3), skew KL / skew reverse KL (DistiLLM, Ko et al. 2024, Eq. 4-5;
cross-checked below against the authors' code, jongwooko/distillm@17c0f98b distillm/losses.py
skewed_forward_kl / skewed_reverse_kl, which drops the constant teacher entropy from the forward
one), TinyBERT's hidden/attention MSE (Jiao et al. 2020, Eq. 3 and 6), MiniLM (Wang et al. 2020,
Eq. 7-9).
"""

from __future__ import annotations

import math

import pytest
import torch

from kdrun.errors import ConfigError
from kdrun.losses import StepOutputs
from kdrun.losses.lm_features import LayerAttention, LayerHiddenMSE, MiniLM, mapped_layers, value_relation
from kdrun.losses.tokens import ForwardKL, GeneralizedJSD, ReverseKL, SkewKL, support
from kdrun.tasks.base import IGNORE, Batch
from kdrun.tasks.language import CausalLM

STUDENT = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
TEACHER = [[2.0, 0.5, 0.0], [0.0, 1.0, 1.0]]


def softmax(row, T=1.0):
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def by_hand(divergence, T=1.0):
    """Mean over items of ``divergence(p_teacher, q_student)``, times T^2."""
    values = [divergence(softmax(t, T), softmax(s, T)) for s, t in zip(STUDENT, TEACHER)]
    return T * T * sum(values) / len(values)


def outputs(student=STUDENT, teacher=TEACHER) -> StepOutputs:
    return StepOutputs(student_logits=torch.tensor(student, requires_grad=True), labels=torch.tensor([0, 2]),
                       teacher_logits=torch.tensor(teacher))


def jsd(beta):
    def divergence(p, q):
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    return divergence


def skew(lam):
    return lambda p, q: kl(p, [lam * a + (1 - lam) * b for a, b in zip(p, q)])


def skew_reverse(lam):
    return lambda p, q: kl(q, [(1 - lam) * a + lam * b for a, b in zip(p, q)])


@pytest.mark.parametrize(("term", "divergence"), [
    (ForwardKL(T=1.0), kl),
    (ForwardKL(T=2.0), kl),
    (ReverseKL(T=1.0), lambda p, q: kl(q, p)),
    (ReverseKL(T=3.0), lambda p, q: kl(q, p)),
    (GeneralizedJSD(beta=0.5), jsd(0.5)),
    (GeneralizedJSD(beta=0.1, T=2.0), jsd(0.1)),
    (SkewKL(lam=0.1), skew(0.1)),
    (SkewKL(lam=0.3, reverse=True, T=2.0), skew_reverse(0.3)),
])
def test_token_divergences_match_hand_computation(term, divergence):
    value = term(outputs())
    assert value.item() == pytest.approx(by_hand(divergence, term.T), rel=1e-5)
    value.backward()
    assert value.item() > 0


def test_divergences_are_zero_when_the_student_matches_the_teacher():
    same = outputs(student=TEACHER)
    for term in (ForwardKL(T=2.0), ReverseKL(), GeneralizedJSD(beta=0.3), SkewKL(lam=0.2), SkewKL(lam=0.2, reverse=True)):
        assert term(same).item() == pytest.approx(0.0, abs=1e-6)


def test_skew_kl_differs_from_distillm_code_by_the_teacher_entropy_only():
    # DistiLLM's skewed_forward_kl returns -sum p log(lam p + (1-lam) q), the cross-entropy to the mixture.
    lam, values = 0.1, []
    for s, t in zip(STUDENT, TEACHER):
        p, q = softmax(t), softmax(s)
        mixture = [lam * a + (1 - lam) * b for a, b in zip(p, q)]
        values.append(-sum(a * math.log(m) for a, m in zip(p, mixture)) - (-sum(a * math.log(a) for a in p)))
    assert SkewKL(lam=lam)(outputs()).item() == pytest.approx(sum(values) / 2, rel=1e-5)


def test_top_k_and_top_p_keep_the_teachers_most_likely_tokens_and_renormalise():
    teacher = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    assert support(teacher, top_k=2).tolist() == [[True, True, False, False]]
    p = softmax([3.0, 1.0, 0.0, -1.0])  # [0.826, 0.112, 0.041, 0.015]
    assert support(teacher, top_p=0.9).tolist() == [[True, True, False, False]]  # 0.826 < 0.9 <= 0.938
    assert support(teacher, top_p=0.5).tolist() == [[True, False, False, False]]
    student = [0.0, 1.0, 2.0, 0.5]
    kept_p, kept_q = softmax([3.0, 1.0]), softmax(student[:2])
    term = ForwardKL(top_k=2)
    value = term(StepOutputs(student_logits=torch.tensor([student]), labels=torch.tensor([0]), teacher_logits=teacher))
    assert value.item() == pytest.approx(kl(kept_p, kept_q), rel=1e-5)
    reverse = ReverseKL(top_p=0.9)
    value = reverse(StepOutputs(student_logits=torch.tensor([student], requires_grad=True), labels=torch.tensor([0]),
                                teacher_logits=teacher))
    assert value.item() == pytest.approx(kl(kept_q, kept_p), rel=1e-5)
    value.backward()  # tokens outside the set give no NaN gradient
    assert p[0] < 0.9 < p[0] + p[1]


def test_padding_counts_nowhere_in_token_terms():
    """A padded causal batch: the scored items are the real next tokens only, so the loss equals
    the hand value over those positions, whatever the logits at padded positions are."""
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    ids = torch.tensor([[1, 2, 0, 1], [2, 1, 0, 0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    task = CausalLM()
    batch = task.batch((ids, mask))
    s_items, labels = task.scored(student, batch)
    t_items, _ = task.scored(teacher, batch)
    assert labels.tolist() == [2, 0, 1, 1]  # positions 0-2 of row 1, position 0 of row 2
    rows = [(0, 0), (0, 1), (0, 2), (1, 0)]
    expected = sum(kl(softmax(teacher[b, t].tolist()), softmax(student[b, t].tolist())) for b, t in rows) / 4
    value = ForwardKL()(StepOutputs(student_logits=s_items, labels=labels, teacher_logits=t_items))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    student[1, 2:] = 100.0  # padded positions change: nothing does
    again = ForwardKL()(StepOutputs(student_logits=task.scored(student, batch)[0], labels=labels, teacher_logits=t_items))
    assert again.item() == pytest.approx(expected, rel=1e-5)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="beta"):
        GeneralizedJSD(beta=1.0)
    with pytest.raises(ConfigError, match="lam"):
        SkewKL(lam=0)
    with pytest.raises(ConfigError, match="top_k"):
        ForwardKL(top_k=-1)
    with pytest.raises(ConfigError, match="top_p"):
        ReverseKL(top_p=0)


def test_unequal_vocabularies_are_a_config_error():
    with pytest.raises(ConfigError, match="vocabularies differ"):
        ForwardKL()(outputs(student=[[0.0, 1.0]]))


# ---- layer mappings, TinyBERT, MiniLM ----------------------------------------------------------


def test_layer_mappings():
    assert mapped_layers(4, 12, "uniform") == [3, 6, 9, 12]  # TinyBERT's g(m) = 3m
    assert mapped_layers(2, 4, "uniform") == [2, 4]
    assert mapped_layers(2, 4, "last") == [3, 4]
    assert mapped_layers(2, 4, [1, 3]) == [1, 3]
    with pytest.raises(ConfigError, match="one teacher block"):
        mapped_layers(2, 4, [1, 5])
    with pytest.raises(ConfigError, match="uniform, last"):
        mapped_layers(2, 4, "every")


def mse(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def test_tinybert_hidden_mse_over_real_tokens_with_a_learned_projection():
    torch.manual_seed(0)
    term = LayerHiddenMSE(mapping="uniform", embeddings=False)
    term.pairs = [(1, 2)]
    term.student_taps, term.teacher_taps = ("stage1",), ("stage2",)
    student, teacher = torch.randn(2, 3, 2), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    probe = StepOutputs(student_logits=torch.zeros(1, 1), labels=torch.zeros(1), student_features={"stage1": student},
                        teacher_features={"stage2": teacher}, mask=mask)
    term.setup(probe)
    projected = term.projection(student).detach()
    real = [(0, 0), (0, 1), (0, 2), (1, 0)]
    expected = sum(mse(projected[b, t].tolist(), teacher[b, t].tolist()) for b, t in real) / 4
    assert term(probe).item() == pytest.approx(expected, rel=1e-5)
    assert "1->2" in term.describe()


def test_attention_mse_and_kl_per_real_query_row():
    torch.manual_seed(1)
    student = torch.rand(1, 2, 3, 3).softmax(-1)
    teacher = torch.rand(1, 2, 3, 3).softmax(-1)
    mask = torch.tensor([[True, True, False]])
    features = StepOutputs(student_logits=torch.zeros(1, 1), labels=torch.zeros(1), mask=mask,
                           student_features={"stage1:attention": student}, teacher_features={"stage1:attention": teacher})
    for form in ("mse", "kl"):
        term = LayerAttention(form=form)
        term.student_taps, term.teacher_taps = ("stage1:attention",), ("stage1:attention",)
        rows = [(h, i) for h in range(2) for i in range(2)]  # heads x real query rows
        if form == "mse":
            expected = sum(mse(student[0, h, i].tolist(), teacher[0, h, i].tolist()) for h, i in rows) / len(rows)
        else:
            expected = sum(kl(teacher[0, h, i].tolist(), student[0, h, i].tolist()) for h, i in rows) / len(rows)
        assert term(features).item() == pytest.approx(expected, rel=1e-5)


def test_minilm_value_relation_and_loss_by_hand():
    torch.manual_seed(2)
    values = torch.randn(1, 3, 4)  # 2 heads of width 2
    relation = value_relation(values, heads=2)
    for head in range(2):
        for i in range(3):
            scores = [sum(values[0, i, 2 * head + d] * values[0, j, 2 * head + d] for d in range(2)).item() / math.sqrt(2)
                      for j in range(3)]
            assert relation[0, head, i].tolist() == pytest.approx(softmax(scores), rel=1e-5)
    student_attention, teacher_attention = torch.rand(1, 2, 3, 3).softmax(-1), torch.rand(1, 2, 3, 3).softmax(-1)
    student_qkv, teacher_qkv = torch.randn(1, 3, 12), torch.randn(1, 3, 12)
    term = MiniLM(student_taps=["a", "v"], teacher_taps=["a", "v"])
    out = StepOutputs(student_logits=torch.zeros(1, 1), labels=torch.zeros(1),
                      student_features={"a": student_attention, "v": student_qkv},
                      teacher_features={"a": teacher_attention, "v": teacher_qkv})
    s_rel, t_rel = value_relation(student_qkv[..., 8:], 2), value_relation(teacher_qkv[..., 8:], 2)
    expected = 0.0
    for s, t in ((student_attention, teacher_attention), (s_rel, t_rel)):
        expected += sum(kl(t[0, h, i].tolist(), s[0, h, i].tolist()) for h in range(2) for i in range(3)) / 6
    assert term(out).item() == pytest.approx(expected, rel=1e-5)


def test_causal_scoring_of_packed_blocks_needs_no_mask():
    task = CausalLM()
    ids = torch.tensor([[1, 2, 3], [3, 2, 1]])
    batch = task.batch((ids, torch.zeros(2, 0, dtype=torch.bool)))
    assert batch.mask is None and isinstance(batch, Batch)
    logits, labels = task.scored(torch.zeros(2, 3, 5), batch)
    assert logits.shape == (4, 5) and labels.tolist() == [2, 3, 2, 1]
    assert IGNORE not in labels.tolist()
