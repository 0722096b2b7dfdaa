"""Every term against the value the authors' reference code gives on the same inputs.

Each fixture in ``tests/data/reference/`` names the code (repository, commit, file, function) that
computed its ``expected`` value once, from inputs drawn from its seed (:mod:`helpers.reference`);
adapters and memories that start at random are pinned to weights drawn there too. kdrun's term
must give the same value to 1e-5 relative, in float64 like the reference run.
"""

from __future__ import annotations

import pytest
import torch

from helpers.reference import checksum, fixtures, load, make_inputs
from kdrun.features import group_key
from kdrun.losses import StepOutputs
from kdrun.losses.contrastive import CRD
from kdrun.losses.features import VID, AttentionTransfer, FitNet
from kdrun.losses.logits import DIST, CrossEntropy, DecoupledKD, SoftTargets
from kdrun.losses.relations import PKT, RKD, CorrelationCongruence, SimilarityPreserving
from kdrun.losses.transformer import AttentionMap, HiddenCosine, HiddenMSE

RELATIVE = 1e-5


def logits(x: dict, **extra) -> StepOutputs:
    return StepOutputs(student_logits=x["student_logits"], teacher_logits=x.get("teacher_logits"),
                       labels=x.get("labels", torch.zeros(len(x["student_logits"]), dtype=torch.long)), **extra)


def features(x: dict, student: dict, teacher: dict, **extra) -> StepOutputs:
    batch = len(next(iter(student.values())))
    return StepOutputs(student_logits=torch.zeros(batch, 2, dtype=torch.float64), labels=torch.zeros(batch, dtype=torch.long),
                       student_features=student, teacher_features=teacher, **extra)


def stages(x: dict, side: str) -> dict:
    """The ``stages`` group of one side: ``student0, student1, ...`` as a model's stage1, stage2, ..."""
    count = sum(name.startswith(side) and name[len(side):].isdigit() for name in x)
    return {group_key("stages", i): x[f"{side}{i}"] for i in range(count)}


def pin(module: torch.nn.Module, weights: dict) -> None:
    """Copy pinned values into ``module``'s parameters ({parameter name: tensor})."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.reshape(params[name].shape))


def ce(x, s):
    return CrossEntropy()(logits(x))


def kd(x, s):
    return SoftTargets(T=s["T"], standardize=s.get("standardize", False))(logits(x))


def dkd(x, s):
    return DecoupledKD(alpha=s["alpha"], beta=s["beta"], T=s["T"], standardize=s.get("standardize", False))(logits(x))


def dkd_warmup(x, s):
    term = DecoupledKD(alpha=s["alpha"], beta=s["beta"], T=s["T"], warmup_epochs=s["warmup_epochs"])
    # kdrun's progress is in epochs from 0 (2.5 = half-way through the third); mdistiller's epoch counts from 1.
    return [term(logits(x, progress=epoch - 1 + 0.5)) for epoch in s["epochs"]]


def dist(x, s):
    return DIST(beta=s["beta"], gamma=s["gamma"], tau=s["tau"])(logits(x))


def fitnet(x, s):
    term = FitNet("stage2", "stage2", relu=s["relu"]).double()
    outputs = features(x, {"stage2": x["student"]}, {"stage2": x["teacher"]})
    term.setup(outputs)
    term.double().train()  # BN on the batch's statistics, as the reference ran
    conv, bn = term.regressor.layers[0], term.regressor.layers[1]
    pin(conv, {"weight": x["conv.weight"], "bias": x["conv.bias"]})
    pin(bn, {"weight": x["bn.weight"], "bias": x["bn.bias"]})
    return term(outputs)


def at(x, s):
    return AttentionTransfer(["stages"], ["stages"], p=s["p"])(features(x, stages(x, "student"), stages(x, "teacher")))


def vid(x, s):
    term = VID(["stages"], ["stages"], init_pred_var=s["init_pred_var"], eps=s["eps"])
    outputs = features(x, stages(x, "student"), stages(x, "teacher"))
    term.setup(outputs)
    term.double()
    for i, regressor in enumerate(term.regressors):
        pin(regressor, {"mean.0.weight": x[f"vid{i}.regressor.0.weight"], "mean.2.weight": x[f"vid{i}.regressor.2.weight"],
                        "mean.4.weight": x[f"vid{i}.regressor.4.weight"], "alpha": x[f"vid{i}.log_scale"]})
    return term(outputs)


def relation(make):
    def value(x, s):
        term = make(**s)
        return term(features(x, {term.student_taps[0]: x["student"]}, {term.teacher_taps[0]: x["teacher"]}))

    return value


def cc(x, s):
    term = CorrelationCongruence(embed_dim=s["embed_dim"], form=s["form"])
    outputs = features(x, {"embedding": x["student"]}, {"embedding": x["teacher"]})
    term.setup(outputs)
    term.double()
    pin(term.embed_student, {"1.weight": x["embed_s.weight"], "1.bias": x["embed_s.bias"]})
    pin(term.embed_teacher, {"1.weight": x["embed_t.weight"], "1.bias": x["embed_t.bias"]})
    return term(outputs)


def crd(x, s, monkeypatch):
    # In float32: kdrun's CRD computes in float32 whatever the input (its scores at T=0.07 stay out of autocast).
    term = CRD(feat_dim=s["feat_dim"], nce_k=s["nce_k"], nce_t=s["nce_t"], momentum=s["momentum"])
    step = [features(x, {"embedding": x[f"student{i}"]}, {"embedding": x[f"teacher{i}"]}, index=x[f"index{i}"]) for i in range(2)]
    term.setup(step[0])
    pin(term.embed_student, {"1.weight": x["embed_s.weight"], "1.bias": x["embed_s.bias"]})
    pin(term.embed_teacher, {"1.weight": x["embed_t.weight"], "1.bias": x["embed_t.bias"]})
    # The reference's memory (memory_v1: student embeddings, memory_v2: teacher's), whole from the start.
    memory = term.memory
    memory.student, memory.teacher = x["memory_v1"].float(), x["memory_v2"].float()
    memory.labels = torch.full((len(memory.student),), -1, dtype=torch.long)
    # The negatives the reference was given (its contrast_idx[:, 1:]), one draw per step.
    draws = iter([x["negatives0"], x["negatives1"]])
    monkeypatch.setattr(memory, "negatives", lambda index, labels, k: next(draws))
    return [term(outputs) for outputs in step]


def hidden_mse(x, s):
    term = HiddenMSE(["a", "b"], ["a", "b"])
    outputs = features(x, {"a": x["student0"], "b": x["student1"]}, {"a": x["teacher0"], "b": x["teacher1"]})
    term.setup(outputs)
    term.double()
    for projection in term.projections:  # TinyBERT's one fit_dense, a 1x1 conv over kdrun's channel-first tokens
        pin(projection, {"weight": x["fit_dense.weight"], "bias": x["fit_dense.bias"]})
    return term(outputs)


def attention_map(x, s):
    term = AttentionMap(["a", "b"], ["a", "b"], form=s["form"])
    outputs = features(x, {"a": x["student0"], "b": x["student1"]}, {"a": x["teacher0"], "b": x["teacher1"]})
    term.setup(outputs)
    return term(outputs)


def hidden_cosine(x, s):
    term = HiddenCosine(["a"], ["a"])
    outputs = features(x, {"a": x["student"]}, {"a": x["teacher"]})
    term.setup(outputs)
    return term(outputs)


KDRUN = {
    "ce": ce, "kd": kd, "kd_ls": kd, "dkd": dkd, "dkd_ls": dkd, "dkd_warmup": dkd_warmup, "dist": dist,
    "fitnet": fitnet, "at": at, "vid": vid, "rkd": relation(RKD), "sp": relation(SimilarityPreserving),
    "pkt": relation(PKT), "cc": cc, "crd": crd, "hidden_mse": hidden_mse, "attention_map": attention_map,
    "hidden_cosine": hidden_cosine,
}
FIXTURES = fixtures()


def test_every_term_option_has_a_reference_fixture():
    covered = {load(path)["term"] for path in FIXTURES}
    assert covered == set(KDRUN)
    # every loss option's terms (conf/loss/*.yaml) are among them
    assert {"ce", "kd", "kd_ls", "dkd", "dist", "fitnet", "at", "vid", "rkd", "sp", "pkt", "cc", "crd",
            "hidden_mse", "hidden_cosine", "attention_map"} <= covered


@pytest.mark.parametrize("path", FIXTURES, ids=lambda path: path.stem)
def test_term_equals_the_reference_code(path, monkeypatch):
    fixture = load(path)
    provenance = fixture["reference"]
    assert {"repository", "commit", "file", "function"} <= set(provenance) and len(provenance["commit"]) == 40
    inputs = make_inputs(fixture["inputs"])
    assert checksum(inputs) == pytest.approx(fixture["checksum"], rel=1e-12), "the inputs are drawn differently now"
    compute = KDRUN[fixture["term"]]
    with torch.no_grad():
        value = compute(inputs, fixture["settings"], monkeypatch) if compute is crd else compute(inputs, fixture["settings"])
    values = [float(v) for v in value] if isinstance(value, list) else float(value)
    assert values == pytest.approx(fixture["expected"], rel=RELATIVE)
