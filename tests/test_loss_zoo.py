"""The loss zoo: every term against the value its authors' reference code gives on fixed inputs
(fixtures in tests/data/reference/, each with its provenance), hand-worked values for kdrun's
generalisations, the pre-stage and views machinery, and each option end to end."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from helpers import ZOO_LOSSES, ZOO_STAGES, kdrun_cli, make_cfg, read_metrics, read_summary, sigterm_when_logged
from kdrun import models
from kdrun.data.views import Views, rotations
from kdrun.distiller import Distiller
from kdrun.engine import checkpoint
from kdrun.errors import ConfigError
from kdrun.losses import StepOutputs, WeightedSum
from kdrun.losses.connectors import ActivationBoundaries, Connector, ofd_margin
from kdrun.losses.correlations import TopSingular, batch_as_positions, kdsvd_loss
from kdrun.losses.factor import FactorTransfer
from kdrun.losses.logit_variants import CurriculumTemperature, MultiLevelKD, below_median, cosine_curriculum
from kdrun.losses.logits import soft_target_kl
from kdrun.losses.maps import paired_maps
from kdrun.losses.review import ReviewKD, hcl_loss
from kdrun.losses.sskd import SelfSupervisedKD
from kdrun.losses.stages import prestages, recipe_views
from kdrun.models.presets import cnn
from kdrun.run import run
from kdrun.strategies.common import StageDistiller, held_still
from kdrun.tasks.classification import Classification

REFERENCE = Path(__file__).parent / "data" / "reference" / "zoo"


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


def test_ofd_margins_match_the_reference_formula():
    data = fixture("ofd")
    source, expected = data["margin_source"], data["expected"]["margins"]
    for weight, bias, margins in zip(source["bn_weight"], source["bn_bias"], expected):
        ours = ofd_margin(torch.tensor(bias, dtype=torch.float64), torch.tensor(weight, dtype=torch.float64))
        assert ours.tolist() == pytest.approx(margins, rel=1e-5)
    # The first channel's P(x < 0) is below 0.001 there: its margin is -3 std.
    assert expected[0][0] == pytest.approx(-3 * abs(source["bn_weight"][0][0]), rel=1e-6)


@pytest.mark.parametrize("name", REFERENCE_TERMS)
def test_gradients_reach_the_student_and_the_adapters_never_the_teacher(name):
    term, outputs, data = pinned(name)
    for features in (outputs.student_features, outputs.teacher_features):
        for tensor in features.values():
            tensor.requires_grad_(True)
    outputs.student_logits.requires_grad_(True)
    value = term.stage_loss(data["stage"], outputs) if "stage" in data else term(outputs)
    value.backward()
    student_grads = [t.grad for t in [outputs.student_logits, *outputs.student_features.values()] if t.grad is not None]
    adapter_grads = [p.grad for p in term.parameters() if p.requires_grad and p.grad is not None]
    assert all(t.grad is None for t in outputs.teacher_features.values())
    if data.get("stage", "").endswith(("paraphraser", "teacher_head")):  # the stage trains the term's modules only
        assert not student_grads and adapter_grads
    else:
        assert student_grads and any(g.abs().sum() > 0 for g in student_grads)
    assert all(torch.isfinite(g).all() for g in student_grads + adapter_grads)


# --- kdrun's readings of the methods, by hand --------------------------------------------------


def test_views_follow_each_sample_with_its_copies():
    views = Views("doubled", 3, lambda x: [2 * x, 3 * x], labelled=False)
    inputs, labels, index = views.expand(torch.tensor([[1.0], [5.0]]), torch.tensor([7, 8]), torch.tensor([0, 1]))
    assert inputs.flatten().tolist() == [1, 2, 3, 5, 10, 15]
    assert labels.tolist() == [7, -1, -1, 8, -1, -1]
    assert index.tolist() == [0, 0, 0, 1, 1, 1]
    _, labelled, _ = replace(views, labelled=True).expand(torch.ones(2, 1), torch.tensor([7, 8]), torch.tensor([0, 1]))
    assert labelled.tolist() == [7, 7, 7, 8, 8, 8]


def test_rotated_views_of_an_image_and_of_a_signal():
    image = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    quarter, half, three_quarters = rotations(image)
    assert quarter[0, 0].tolist() == [[2, 4], [1, 3]]  # turned 90 degrees counter-clockwise
    assert half[0, 0].tolist() == [[4, 3], [2, 1]]
    assert three_quarters[0, 0].tolist() == [[3, 1], [4, 2]]
    signal = torch.tensor([[[1.0, 2.0, 4.0]]])
    assert [v[0, 0].tolist() for v in rotations(signal)] == [[4, 2, 1], [-1, -2, -4], [-4, -2, -1]]
    with pytest.raises(ConfigError, match="square"):
        rotations(torch.zeros(1, 1, 2, 3))


def test_a_vector_is_a_one_position_map_of_the_other_side_s_rank():
    student, teacher = paired_maps(torch.zeros(2, 5), torch.zeros(2, 3, 4, 4), "T")
    assert student.shape == (2, 5, 1, 1) and teacher.shape == (2, 3, 4, 4)
    assert paired_maps(torch.zeros(2, 5), torch.zeros(2, 3), "T")[1].shape == (2, 3, 1)
    with pytest.raises(ConfigError, match="maps of one kind"):
        paired_maps(torch.zeros(2, 5, 7), torch.zeros(2, 3, 4, 4), "T")


def test_a_connector_maps_a_vector_student_onto_the_teacher_s_whole_map():
    connector = Connector(torch.zeros(4, 6), torch.zeros(4, 5, 3))
    assert connector(torch.randn(4, 6)).shape == (4, 5, 3)
    assert isinstance(connector.layers[0], torch.nn.Linear) and connector.layers[0].out_features == 15


def test_ctkd_curriculum_by_hand():
    assert [cosine_curriculum(epoch, 0.0, 1.0, 10) for epoch in (0, 5, 10, 15)] == pytest.approx([0, 0.5, 1, 1])
    term = CurriculumTemperature()
    assert term.strength(0.3) == pytest.approx((1 - math.cos(math.pi / 10)) / 2)  # first epoch
    assert term.temperature().item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))  # theta starts at 1


def test_reviewkd_warmup_and_hcl_by_hand():
    term = ReviewKD(warmup_epochs=20)
    assert [term.warmup(p) for p in (0.0, 0.99, 1.0, 19.5, None)] == pytest.approx([0.05, 0.05, 0.1, 1.0, 1.0])
    # A 2x2 map: only the 1x1 level is smaller. Full MSE 2.5, pooled MSE (2.5 - 0)^2 = 6.25.
    student, teacher = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), torch.zeros(1, 1, 2, 2)
    assert hcl_loss([student], [teacher]).item() == pytest.approx((7.5 + 0.5 * 6.25) / 1.5)


def test_mlkd_masks_scale_by_the_share_at_or_below_the_median():
    assert below_median(torch.tensor([1.0, 2.0, 3.0, 4.0])).item() == 0.5
    assert below_median(torch.tensor([1.0, 1.0, 1.0, 5.0])).item() == 0.75


@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 4, 6)])
def test_top_singular_gradient_equals_pytorch_s_where_that_is_finite(shape):
    generator = torch.Generator().manual_seed(1)
    matrices = torch.randn(*shape, generator=generator, dtype=torch.float64)
    weights = torch.randn(shape[0], shape[2], 2, generator=generator, dtype=torch.float64)

    def loss(values, right):  # invariant to the vectors' signs, which the two SVD calls may choose apart
        return (values * torch.arange(1.0, 3.0, dtype=torch.float64)).sum() + (right[:, :, :2] ** 2 * weights).sum()

    ours = matrices.clone().requires_grad_(True)
    loss(*TopSingular.apply(ours, 2)).backward()
    theirs = matrices.clone().requires_grad_(True)
    _, values, right_h = torch.linalg.svd(theirs, full_matrices=False)
    loss(values[:, :2], right_h.transpose(1, 2)).backward()
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-8, atol=1e-10)


def test_kdsvd_gradients_stay_finite_where_singular_values_repeat():
    # Dead ReLU channels are zero rows: zero singular values repeat, and the SVD's own gradient is 0 * inf there.
    generator = torch.Generator().manual_seed(0)
    students = [torch.relu(torch.randn(16, 32, generator=generator)) for _ in range(2)]
    students[0][:, 10:], students[1][:, 5:] = 0, 0
    for student in students:
        student.requires_grad_(True)
    teachers = [torch.randn(16, 20, generator=generator), torch.randn(16, 24, generator=generator)]
    loss = kdsvd_loss([batch_as_positions(s) for s in students], [batch_as_positions(t) for t in teachers], 1, 16)
    loss.backward()
    assert all(torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 for s in students)


def test_initialisation_terms_are_spent_after_their_stage():
    term = ActivationBoundaries(init_epochs=2)
    (stage,) = term.prestages(0.003)
    assert (stage.name, stage.epochs, stage.trains_student, stage.recipe.weights) == ("ab_init", 2, True, {"ab_init": 0.003})
    assert term(StepOutputs(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))).item() == 0.0
    (paraphraser,) = FactorTransfer().prestages(200.0)
    assert (paraphraser.name, paraphraser.trains_student, paraphraser.recipe.weights) == ("ft_paraphraser", False,
                                                                                         {"ft_paraphraser": 1.0})
    assert paraphraser.recipe.taps("student") == []  # the paraphraser's stage reads the teacher only


def test_recipes_with_two_kinds_of_views_or_two_stages_of_one_name_are_refused():
    with pytest.raises(ConfigError, match="different views"):
        recipe_views(WeightedSum({"mlkd": (1.0, MultiLevelKD()), "sskd": (1.0, SelfSupervisedKD())}))
    with pytest.raises(ConfigError, match="stage named ab_init"):
        prestages(WeightedSum({"ab": (1.0, ActivationBoundaries()), "ab2": (1.0, ActivationBoundaries())}))


def test_a_held_student_stays_in_eval_mode_and_out_of_the_optimizer():
    student, teacher = cnn(3, (1, 8), channels=(4, 4)), cnn(3, (1, 8), channels=(4, 4))
    term = FactorTransfer()
    distiller = Distiller(student, WeightedSum({"ft": (200.0, term)}), Classification(), teacher)
    stage = term.prestages(200.0)[0]
    held = StageDistiller(distiller, stage)
    held.train()
    assert held.holds_student and not student.training
    with held_still(student, True):
        assert not any(p.requires_grad for p in student.parameters())
    assert all(p.requires_grad for p in student.parameters())


# --- every option end to end -----------------------------------------------------------------

TINY = ["epochs=1", "teacher_training.epochs=1", "dataset.batch_size=32"]
# One training step: a batch as large as the training split (val_fraction takes a quarter).
ONE_STEP = ["epochs=1", "teacher_training.epochs=1", "dataset=fake", "dataset.val_fraction=0.25", "scratch=false"]
CIFAR_SHAPE = [*ONE_STEP, "teacher=resnet32x4", "student=resnet8x4", "dataset.source.num_train=16",
               "dataset.source.num_test=8", "dataset.batch_size=12"]
IMAGENET_SHAPE = [*ONE_STEP, "teacher=torchvision", "teacher.name=resnet34", "student=torchvision", "student.name=resnet18",
                  "dataset.source.image_size=224", "dataset.source.num_classes=1000", "dataset.source.num_train=8",
                  "dataset.source.num_test=4", "dataset.batch_size=6"]


def torchvision_taps(loss: str, taps: str) -> list[str]:
    return [f"loss.{loss}.student_taps={taps}", f"loss.{loss}.teacher_taps={taps}"]


# Taps on torchvision ResNets (layer1..4, avgpool) where an option's defaults name kdrun's stages.
IMAGENET_TAPS = {
    "reviewkd": torchvision_taps("reviewkd", "[layer1,layer2,layer3,layer4,avgpool]"),
    **{loss: torchvision_taps(loss, "[layer3,layer4]") for loss in ("ab", "fsp", "kdsvd", "nst", "ofd")},
    **{loss: torchvision_taps(loss, "layer4") for loss in ("cwd", "ft", "ktaad")},
    **{loss: torchvision_taps(loss, "avgpool") for loss in ("pad_l2", "srd", "sskd")},
}


def stage_settings(loss: str) -> list[str]:
    return [f"{ZOO_STAGES[loss][1]}=1"] if loss in ZOO_STAGES else []


def finite_parts(run_dir: Path, model: str = "student") -> dict:
    row = next(r for r in read_metrics(run_dir) if r["model"] == model and r["split"] == "train")
    parts = {key: value for key, value in row.items() if key.startswith("loss/")}
    assert parts and all(math.isfinite(value) for value in parts.values()), row
    return parts


@pytest.mark.parametrize("loss", ZOO_LOSSES)
def test_every_zoo_option_trains_an_epoch_on_the_embedded_default(tmp_path, loss):
    cfg = make_cfg(*TINY, "dataset.source.num_samples=200", f"loss={loss}", *stage_settings(loss))
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed", summary.get("error")
    assert f"loss/{loss}" in finite_parts(tmp_path)
    if loss not in ZOO_STAGES:
        return
    stage, _ = ZOO_STAGES[loss]
    finite_parts(tmp_path, f"student.{stage}")
    stage_state = checkpoint.load(tmp_path / "checkpoints" / stage / "final.pt")["distiller"]
    main_state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["distiller"]
    # What the stage trained (paraphraser, head, connectors) is held still in the run's own training.
    trained = {key.split(".owner.", 1)[1]: value for key, value in stage_state.items() if ".owner." in key}
    assert trained
    for key, value in trained.items():
        assert torch.equal(main_state[f"recipe.terms.{loss}.{key}"], value), key
    # A stage that holds the student leaves it as built; an initialisation changes it.
    torch.manual_seed(int(cfg.seed))
    fresh = models.build(cfg.student, 10, (1, 40)).state_dict()
    unchanged = all(torch.equal(stage_state[f"student.{key}"], value) for key, value in fresh.items())
    assert unchanged == (loss not in ("ab", "fsp"))


@pytest.mark.slow
def test_a_stage_setting_out_of_range_is_one_line_exit_2_and_writes_nothing(tmp_path):
    result = kdrun_cli("loss=ft", "loss.ft.paraphraser_epochs=0", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "kdrun: error: loss.ft.paraphraser_epochs=0 must be an integer >= 1 (the epochs of its stage before the run's training)"
    ]
    assert not (tmp_path / "run").exists()


def test_the_teacher_cache_cannot_be_forced_on_views_that_change_every_step(tmp_path):
    cfg = make_cfg(*TINY, "dataset.source.num_samples=200", "loss=mlkd", "perf.teacher_cache=true")
    with pytest.raises(ConfigError, match="perf.teacher_cache=true, but the recipe trains on a strongly augmented copy"):
        run(cfg, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["cifar", "imagenet"])
@pytest.mark.parametrize("loss", ZOO_LOSSES)
def test_every_zoo_option_takes_a_step_on_cifar_and_imagenet_shapes(tmp_path, loss, shape):
    overrides = CIFAR_SHAPE if shape == "cifar" else [*IMAGENET_SHAPE, *IMAGENET_TAPS.get(loss, [])]
    summary = run(make_cfg(*overrides, f"loss={loss}", *stage_settings(loss)), tmp_path)
    assert summary["status"] == "completed", summary.get("error")
    assert f"loss/{loss}" in finite_parts(tmp_path)
    train_rows = [r for r in read_metrics(tmp_path) if r["model"] == "student" and r["split"] == "train"]
    assert len(train_rows) == 1


@pytest.mark.slow
def test_a_run_stopped_in_a_pre_stage_or_after_it_resumes_where_it_stopped(tmp_path):
    common = ["dataset.source.num_samples=1500", "dataset.batch_size=64", "epochs=3", "teacher_training.epochs=2", "seed=3",
              "scratch=false"]
    overrides = [*common, "loss=ft", "loss.ft.paraphraser_epochs=3"]
    # The teacher comes from the cache in every run here: a teacher trained in the process draws from
    # torch's RNG before the paraphraser is built, so the paraphraser would start elsewhere.
    run(make_cfg(*common, "loss=kd"), tmp_path / "teacher")
    reference = run(make_cfg(*overrides), tmp_path / "reference")

    def curves(run_dir):
        return [(r["model"], r["epoch"], r["split"], r.get("acc"), r.get("loss")) for r in read_metrics(run_dir)]

    # Stopped inside the paraphraser's stage: the stage carries on from its last.pt.
    in_stage = tmp_path / "in_stage"
    returncode, rest = sigterm_when_logged("student ft_paraphraser epoch 2/3", *overrides, f"hydra.run.dir={in_stage}",
                                           cwd=tmp_path)
    assert returncode == 130, rest
    assert (in_stage / "checkpoints" / "ft_paraphraser" / "last.pt").is_file()
    assert not (in_stage / "checkpoints" / "ft_paraphraser" / "final.pt").exists()
    resumed = kdrun_cli(f"resume={in_stage}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming student ft_paraphraser" in resumed.stderr
    assert "student ft_paraphraser epoch 2/3" not in resumed.stderr

    # Stopped in the student's own training: the finished stage is loaded, not trained again.
    after_stage = tmp_path / "after_stage"
    returncode, rest = sigterm_when_logged("student epoch 2/3", *overrides, f"hydra.run.dir={after_stage}", cwd=tmp_path)
    assert returncode == 130, rest
    resumed = kdrun_cli(f"resume={after_stage}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "student ft_paraphraser: finished earlier in this run" in resumed.stderr
    assert "student ft_paraphraser epoch" not in resumed.stderr and "Resuming student from" in resumed.stderr

    for run_dir in (in_stage, after_stage):
        summary = read_summary(run_dir)
        assert summary["status"] == "completed"
        assert summary["student"]["test_acc"] == reference["student"]["test_acc"]
        assert curves(run_dir) == curves(tmp_path / "reference")
