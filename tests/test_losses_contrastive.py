"""CRD (Tian et al., ICLR 2020): the NCE form against RepDistiller's formula written out
in loops, the memories (momentum bank, FIFO queue) by hand, gradients, checkpoint
round trips, flat queue memory, and end-to-end runs."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import FAST, make_cfg, read_metrics, recipe_state
from kdrun.errors import ConfigError
from kdrun.losses import StepOutputs, build_recipe
from kdrun.losses.contrastive import CRD, FeatureQueue, SampleBank, info_nce_loss, nce_loss, similarities
from kdrun.run import run


def nce_by_hand(scores: list[list[float]], T: float, n_data: int, mean_exp: float) -> float:
    """RepDistiller's ContrastLoss, literally: P = exp(s/T)/Z with Z = mean_exp * N, Pn = 1/N,
    m = K, loss = -(sum log(P+/(P+ + m Pn)) + sum log(m Pn/(P- + m Pn))) / B."""
    Z, Pn = mean_exp * n_data, 1.0 / n_data
    total = 0.0
    for row in scores:
        m = len(row) - 1
        P = [math.exp(s / T) / Z for s in row]
        total += math.log(P[0] / (P[0] + m * Pn))
        total += sum(math.log(m * Pn / (p + m * Pn)) for p in P[1:])
    return -total / len(scores)


def info_nce_by_hand(scores: list[list[float]], T: float) -> float:
    return sum(-math.log(math.exp(row[0] / T) / sum(math.exp(s / T) for s in row)) for row in scores) / len(scores)


def mean_exp_of(scores: list[list[float]], T: float) -> float:
    values = [math.exp(s / T) for row in scores for s in row]
    return sum(values) / len(values)


SCORES = [[0.9, 0.1, -0.3, 0.2], [0.4, 0.5, -0.8, 0.0]]


@pytest.mark.parametrize("T", [0.07, 0.5])
def test_nce_loss_matches_repdistiller_formula(T):
    mean_exp = mean_exp_of(SCORES, T)
    expected = nce_by_hand(SCORES, T, n_data=50_000, mean_exp=mean_exp)
    # N cancels: the same loss for any dataset size.
    assert nce_by_hand(SCORES, T, n_data=123, mean_exp=mean_exp) == pytest.approx(expected, rel=1e-9)
    got = nce_loss(torch.tensor(SCORES, dtype=torch.float64), math.log(mean_exp), T)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_info_nce_loss_matches_loops():
    got = info_nce_loss(torch.tensor(SCORES, dtype=torch.float64), 0.5)
    assert got.item() == pytest.approx(info_nce_by_hand(SCORES, 0.5), rel=1e-9)


@pytest.mark.parametrize("k", [3, 12])  # fewer draws than rows (gather rows), then more (score all rows)
def test_similarities_match_loops(k):
    torch.manual_seed(0)
    anchor, positive, memory = torch.randn(2, 4), torch.randn(2, 4), torch.randn(5, 4)
    negatives = torch.randint(0, 5, (2, k))
    got = similarities(anchor, positive, memory, negatives)
    for b in range(2):
        expected = [sum(anchor[b, d].item() * positive[b, d].item() for d in range(4))]
        expected += [sum(anchor[b, d].item() * memory[r, d].item() for d in range(4)) for r in negatives[b].tolist()]
        assert got[b].tolist() == pytest.approx(expected, abs=1e-5)


def probe(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, index=None) -> StepOutputs:
    return StepOutputs(
        student_logits=torch.zeros(len(labels), 3), labels=labels, index=index,
        student_features={"embedding": student}, teacher_features={"embedding": teacher},
    )


def identity_heads(term: CRD, dim: int) -> None:
    """Linear heads = identity, so the embeddings are the normalised features themselves."""
    term.setup(probe(torch.zeros(1, dim), torch.zeros(1, dim), torch.zeros(1, dtype=torch.long)))
    with torch.no_grad():
        for head in (term.embed_student, term.embed_teacher):
            head[1].weight.copy_(torch.eye(dim))
            head[1].bias.zero_()


def test_crd_bank_first_step_matches_hand_computation():
    """Two samples (class 0) whose only other-class rows (2..5, class 1) are identical,
    so every negative is known: both directions of NCE, Z from the first batch."""
    torch.manual_seed(0)
    term = CRD(feat_dim=2, nce_k=3, nce_t=0.5, negatives="other_class")
    identity_heads(term, 2)
    bank = term.memory
    bank.grow(6)
    student_rows = [[1.0, 0.0], [0.0, 1.0]] + [[0.6, 0.8]] * 4
    teacher_rows = [[0.0, 1.0], [0.8, 0.6]] + [[-1.0, 0.0]] * 4
    bank.student.copy_(torch.tensor(student_rows))
    bank.teacher.copy_(torch.tensor(teacher_rows))
    bank.labels.copy_(torch.tensor([0, 0, 1, 1, 1, 1]))
    student, teacher = [[3.0, 4.0], [1.0, 0.0]], [[0.0, 2.0], [-1.0, 0.0]]  # normalised: (.6,.8),(1,0) / (0,1),(-1,0)
    loss = term(probe(torch.tensor(student), torch.tensor(teacher), torch.tensor([0, 0]), torch.tensor([0, 1])))

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    s_unit, t_unit = [[0.6, 0.8], [1.0, 0.0]], [[0.0, 1.0], [-1.0, 0.0]]
    # student anchor against teacher rows: positive = its own teacher row, negatives = row 2..5
    s_scores = [[dot(s_unit[i], teacher_rows[i])] + [dot(s_unit[i], teacher_rows[2])] * 3 for i in range(2)]
    t_scores = [[dot(t_unit[i], student_rows[i])] + [dot(t_unit[i], student_rows[2])] * 3 for i in range(2)]
    expected = sum(nce_by_hand(sc, 0.5, 1000, mean_exp_of(sc, 0.5)) for sc in (s_scores, t_scores))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.exp(term.log_mean_exp).tolist() == pytest.approx([mean_exp_of(s_scores, 0.5), mean_exp_of(t_scores, 0.5)], rel=1e-5)


def test_crd_queue_first_step_matches_hand_computation():
    """A one-row queue: every negative is that row; the positive is the other side's current
    embedding (key_momentum=0: the key heads are the live heads)."""
    torch.manual_seed(0)
    term = CRD(feat_dim=2, nce_k=2, nce_t=0.5, memory="queue", queue_size=1, objective="infonce", key_momentum=0.0)
    identity_heads(term, 2)
    term.memory.student.copy_(torch.tensor([[0.0, 1.0]]))
    term.memory.teacher.copy_(torch.tensor([[1.0, 0.0]]))
    loss = term(probe(torch.tensor([[0.6, 0.8]]), torch.tensor([[0.8, 0.6]]), torch.tensor([1]), torch.tensor([7])))
    s_scores = [[0.6 * 0.8 + 0.8 * 0.6, 0.6, 0.6]]  # student vs (its teacher, queue teacher x2)
    t_scores = [[0.96, 0.6, 0.6]]  # teacher vs (its student, queue student x2)
    assert loss.item() == pytest.approx(info_nce_by_hand(s_scores, 0.5) + info_nce_by_hand(t_scores, 0.5), rel=1e-5)
    assert term.memory.index.tolist() == [7] and term.memory.labels.tolist() == [1]


def test_queue_is_written_by_ema_heads():
    """key <- 0.75 * key + 0.25 * live, then the positive and the queued entry use the key heads."""
    term = CRD(feat_dim=2, nce_k=1, memory="queue", queue_size=4, key_momentum=0.75)
    identity_heads(term, 2)
    key_student = term.key_heads[0][1]
    with torch.no_grad():
        key_student.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # swaps the two coordinates
        key_student.bias.fill_(1.0)
    term(probe(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.tensor([3])))
    # weight 0.75*[[0,1],[1,0]] + 0.25*I = [[.25,.75],[.75,.25]], bias 0.75: (2,0) -> (1.25, 2.25), normalised
    assert key_student.weight.flatten().tolist() == pytest.approx([0.25, 0.75, 0.75, 0.25])
    assert key_student.bias.tolist() == pytest.approx([0.75, 0.75])
    norm = math.hypot(1.25, 2.25)
    assert term.memory.student[0].tolist() == pytest.approx([1.25 / norm, 2.25 / norm], rel=1e-5)
    assert not any(p.requires_grad for p in term.key_heads.parameters())


def test_bank_momentum_update_by_hand():
    bank = SampleBank(feat_dim=2, momentum=0.5, exclude_class=False)
    bank.grow(3)
    bank.student.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    bank.teacher.copy_(torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]))
    bank.push(torch.tensor([0, 2]), torch.tensor([4, 5]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    r = 1 / math.sqrt(2)  # 0.5*(1,0) + 0.5*(0,1) = (.5,.5), normalised
    assert bank.student.flatten().tolist() == pytest.approx([r, r, 0.0, 1.0, 1.0, 0.0])
    assert bank.teacher.flatten().tolist() == pytest.approx([0.0, 1.0, 0.0, 1.0, r, r])
    assert bank.labels.tolist() == [4, -1, 5]


def test_queue_is_fifo_and_evicts_the_oldest():
    queue = FeatureQueue(size=4, feat_dim=1, exclude_class=False)

    def push(indices):
        index = torch.tensor(indices)
        values = index.float()[:, None]
        queue.push(index, index + 100, values, -values)

    push([0, 1, 2])
    push([3, 4, 5])  # 4 and 5 overwrite 0 and 1
    assert queue.index.tolist() == [4, 5, 2, 3] and queue.head.item() == 2
    assert queue.student[:, 0].tolist() == [4, 5, 2, 3] and queue.teacher[:, 0].tolist() == [-4, -5, -2, -3]
    assert queue.labels.tolist() == [104, 105, 102, 103]
    push([10, 11, 12, 13, 14, 15])  # longer than the queue: only its last four stay
    assert sorted(queue.index.tolist()) == [12, 13, 14, 15] and queue.head.item() == 0


def test_negatives_avoid_the_anchor_and_its_class():
    torch.manual_seed(0)
    anchor = torch.tensor([0])
    for exclude_class, allowed in ((True, set(range(10, 100))), (False, set(range(1, 100)))):
        bank = SampleBank(feat_dim=2, momentum=0.5, exclude_class=exclude_class)
        bank.grow(100)
        bank.labels.copy_(torch.arange(100) // 10)  # ten classes of ten rows; the anchor is row 0, class 0
        rows = bank.negatives(anchor, bank.labels[anchor], k=20_000)[0].tolist()
        assert set(rows) == allowed  # uniform over the allowed rows: every one is drawn
        # a class clash (p = 0.1) survives the redraws with p = 1e-5, an index clash with 1e-10
        assert sum(r not in allowed for r in rows) <= 2


def test_crd_learns_to_match_samples():
    """Optimising the heads alone on CRD makes each student embedding retrieve its teacher's."""
    torch.manual_seed(0)
    n, batch = 128, 32
    student = torch.randn(n, 12)
    teacher = torch.tanh(student @ torch.randn(12, 20)) + 0.1 * torch.randn(n, 20)
    labels = torch.randint(0, 10, (n,))
    for memory in ("bank", "queue"):
        term = CRD(feat_dim=16, nce_k=64, memory=memory, queue_size=64)
        term.setup(probe(student[:batch], teacher[:batch], labels[:batch]))
        optimizer = torch.optim.Adam(term.parameters(), lr=1e-2)
        for _ in range(8):
            for index in torch.randperm(n).split(batch):
                loss = term(probe(student[index], teacher[index], labels[index], index))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            similarity = term.embed_student(student) @ term.embed_teacher(teacher).t()
        retrieval = (similarity.argmax(1) == torch.arange(n)).float().mean().item()
        # chance is 1/128; over seeds 0-3 here 0.57-0.66 (bank) and 0.24-0.45 (queue)
        assert retrieval > 0.15, memory


@pytest.mark.parametrize("nce_k", [2, 16])  # memory rows gathered, or all scored (see similarities)
def test_gradients_reach_student_and_both_heads_not_teacher(nce_k):
    torch.manual_seed(0)
    teacher_net = torch.nn.Linear(6, 8)
    for memory in ("bank", "queue"):
        term = CRD(feat_dim=4, nce_k=nce_k, memory=memory, queue_size=8)
        inputs, labels = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
        with torch.no_grad():
            teacher = teacher_net(inputs)
        student = torch.randn(5, 3, 2, 2, requires_grad=True)  # a map: flattened by the head
        term.setup(probe(student.detach(), teacher, labels))
        for step in range(2):  # the second step reads memory written by the first
            student.grad = None
            term(probe(student, teacher, labels, torch.arange(5) + 5 * step)).backward()
        assert student.grad.abs().sum() > 0
        for head in (term.embed_student, term.embed_teacher):
            assert head[1].weight.grad.abs().sum() > 0
        if memory == "queue":
            assert all(p.grad is None for p in term.key_heads.parameters())
        assert all(p.grad is None for p in teacher_net.parameters()) and teacher.grad is None
        assert not any(b.requires_grad for b in term.buffers())


@pytest.mark.parametrize("memory", ["bank", "queue"])
def test_state_round_trip_into_a_fresh_recipe(memory):
    spec = {"crd": {"weight": 0.8, "_target_": "kdrun.losses.contrastive.CRD", "feat_dim": 8, "nce_k": 32, "memory": memory, "queue_size": 20}}
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(60, 5), torch.randn(60, 7), torch.randint(0, 3, (60,))
    recipe = build_recipe(spec)
    recipe.setup(probe(student[:10], teacher[:10], labels[:10]))
    for index in torch.randperm(50).split(10):
        recipe(probe(student[index], teacher[index], labels[index], index))
    state = recipe.state_dict()
    fresh = build_recipe(spec)
    fresh.setup(probe(student[:10], teacher[:10], labels[:10]))
    fresh.load_state_dict(state)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    if memory == "bank":
        assert state["terms.crd.memory.student"].shape == (50, 8)
    else:
        assert "terms.crd.key_heads.1.1.weight" in state
    index = torch.arange(50, 60)  # a new sample range: the bank grows past its saved size
    outputs = probe(student[index], teacher[index], labels[index], index)
    torch.manual_seed(1)
    expected, _ = recipe(outputs)
    torch.manual_seed(1)
    got, _ = fresh(outputs)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def memory_bytes(term: CRD) -> int:
    return sum(buffer.nbytes for buffer in term.memory.buffers())


def fed_term(memory: str, num_samples: int, batch: int = 2000) -> CRD:
    """A term fed every index of a shuffled dataset of ``num_samples`` once (synthetic features)."""
    torch.manual_seed(0)
    term = CRD(feat_dim=128, nce_k=16, memory=memory, queue_size=2048)
    labels = torch.randint(0, 10, (num_samples,))
    term.setup(probe(torch.randn(2, 16), torch.randn(2, 32), labels[:2]))
    with torch.no_grad():
        for index in torch.randperm(num_samples).split(batch):
            term(probe(torch.randn(len(index), 16), torch.randn(len(index), 32), labels[index], index))
    return term


def test_queue_memory_stays_flat_while_bank_grows_with_the_data():
    small, large = ({memory: memory_bytes(fed_term(memory, n)) for memory in ("bank", "queue")} for n in (1_000, 10_000))
    assert small["queue"] == large["queue"]
    assert 9.5 < large["bank"] / small["bank"] < 10.5
    assert large["bank"] == 10_000 * (2 * 128 * 4 + 8)  # two float32 rows and a label per sample


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="memory"):
        CRD(memory="ring")
    with pytest.raises(ConfigError, match="objective"):
        CRD(objective="triplet")
    with pytest.raises(ConfigError, match="nce_k"):
        CRD(nce_k=0)
    with pytest.raises(ConfigError, match="key_momentum"):
        CRD(key_momentum=1.0)


@pytest.mark.parametrize("name, formula", [
    ("crd", "L = 1*CE + 0.8*CRD(bank,k=16384,T=0.07)"),
    ("crd_kd", "L = 1*CE + 1*KD(T=4) + 0.8*CRD(bank,k=16384,T=0.07)"),
])
def test_configs_compose_into_the_papers_recipes(name, formula):
    recipe = build_recipe(make_cfg(f"loss={name}").loss)
    assert str(recipe) == formula and recipe.needs_index
    crd = recipe.terms["crd"]
    assert (crd.feat_dim, crd.nce_k, crd.nce_t, crd.memory.momentum) == (128, 16384, 0.07, 0.5)


def crd_train_rows(run_dir):
    return [r for r in read_metrics(run_dir) if r["model"] == "student" and r["split"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["loss.crd.nce_k=256"], ["loss.crd.nce_k=256", "loss.crd.memory=queue", "loss.crd.queue_size=512"]])
def test_end_to_end_on_default_data(tmp_path, overrides):
    summary = run(make_cfg(*FAST, "loss=crd", "scratch=false", *overrides), tmp_path)
    assert summary["status"] == "completed", summary.get("error")
    rows = crd_train_rows(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["loss/crd"]) for r in rows)
    recipe = recipe_state(tmp_path)
    rows_held = len(recipe["terms.crd.memory.labels"])
    if "loss.crd.memory=queue" in overrides:
        assert rows_held == 512
    else:  # one row per training sample, every one seen
        assert 1000 < rows_held <= 2000 and (recipe["terms.crd.memory.labels"] >= 0).all()
    assert torch.isfinite(recipe["terms.crd.log_mean_exp"]).all()


@pytest.mark.slow  # most of the time goes to resnet32x4 itself on the CPU
def test_end_to_end_on_unlike_image_models(tmp_path):
    cfg = make_cfg(
        "dataset=fake", "teacher=resnet32x4", "student=resnet8x4", "epochs=1", "dataset.source.num_train=64",
        "dataset.source.num_test=32", "teacher_training.epochs=1", "loss=crd_kd", "loss.crd.nce_k=64",
    )
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed", summary.get("error")
    assert {"loss/ce", "loss/kd", "loss/crd"} <= set(crd_train_rows(tmp_path)[0])


def test_memory_rows_start_uniform_as_repdistillers_contrast_memory():
    # RepDistiller ContrastMemory: rand(N, d) * 2 * stdv - stdv with stdv = 1 / sqrt(d / 3).
    torch.manual_seed(0)
    bank = SampleBank(feat_dim=12, momentum=0.5, exclude_class=True)
    bank.grow(4000)
    bound = math.sqrt(3 / 12)
    for rows in (bank.student, bank.teacher):
        assert rows.abs().max().item() <= bound and rows.abs().max().item() > 0.99 * bound
        assert rows.pow(2).sum(1).mean().item() == pytest.approx(1.0, abs=0.02)  # unit norm on average
