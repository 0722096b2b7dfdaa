"""Knob schedules (T, alpha) as pure functions, and how they reach a recipe."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import FAST, make_cfg, read_metrics
from kdrun.engine.schedule import knob_values, progress_of, ramp
from kdrun.errors import ConfigError
from kdrun.losses.recipe import recipe_from, resolve_loss
from kdrun.run import run


def test_ramps_start_and_end_where_asked():
    for kind in ("linear", "cosine", "exp", "step"):
        assert ramp(kind, 10.0, 1.0, 0.0, steps=3) == pytest.approx(10.0)
        assert ramp(kind, 10.0, 1.0, 1.0, steps=3) == pytest.approx(1.0)
    assert ramp("constant", 4.0, 1.0, 0.7) == 4.0


def test_ramp_midpoints():
    assert ramp("linear", 0.5, 1.0, 0.5) == pytest.approx(0.75)
    assert ramp("cosine", 10.0, 1.0, 0.5) == pytest.approx(5.5)  # cos(pi/2) = 0: half-way
    assert ramp("cosine", 10.0, 1.0, 0.25) == pytest.approx(1.0 + 9.0 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert ramp("exp", 16.0, 1.0, 0.5) == pytest.approx(4.0)  # geometric mean
    # step: 2 jumps over 3 equal stretches of [0, 1]
    assert [ramp("step", 10.0, 0.0, p, steps=2) for p in (0.0, 0.3, 0.34, 0.66, 0.67, 1.0)] == pytest.approx(
        [10.0, 10.0, 5.0, 5.0, 0.0, 0.0]
    )
    assert ramp("linear", 1.0, 2.0, 1.5) == 2.0  # clamped


def test_unknown_ramp_is_an_error():
    with pytest.raises(ValueError, match="unknown ramp 'wiggle'"):
        ramp("wiggle", 1.0, 2.0, 0.5)


def test_knob_values_per_epoch_and_per_stage():
    schedule = {
        "T": {"kind": "linear", "start": 8, "end": 2, "per": "epoch"},
        "alpha": {"kind": "linear", "start": 0.5, "end": 1.0, "per": "stage"},
    }
    assert [progress_of(i, 4) for i in range(4)] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert progress_of(0, 1) == 0.0
    assert knob_values(schedule, epoch=1, epochs=3, stage=0, stages=3) == pytest.approx({"T": 8.0, "alpha": 0.5})
    assert knob_values(schedule, epoch=2, epochs=3, stage=1, stages=3) == pytest.approx({"T": 5.0, "alpha": 0.75})
    assert knob_values(schedule, epoch=3, epochs=3, stage=2, stages=3) == pytest.approx({"T": 2.0, "alpha": 1.0})


def test_resolve_loss_re_resolves_T_and_alpha_everywhere_the_recipe_uses_them():
    cfg = make_cfg("loss=kd", "T=4", "alpha=0.9")
    spec = resolve_loss(cfg, T=2.0, alpha=0.25)
    assert spec["kd"]["T"] == 2.0 and spec["kd"]["weight"] == 0.25 and spec["ce"]["weight"] == pytest.approx(0.75)
    assert cfg.T == 4  # the run's config is untouched


def test_knobs_find_what_follows_T_and_alpha_and_set_exactly_that():
    recipe = recipe_from(make_cfg("loss=kd", "T=4", "alpha=0.9"))
    assert recipe.knobs.bindings == {("ce", "weight"): "alpha", ("kd", "weight"): "alpha", ("kd", "T"): "T"}
    recipe.knobs.apply({"T": 2.0, "alpha": 0.25})
    assert recipe.weights == pytest.approx({"ce": 0.75, "kd": 0.25})
    assert recipe.terms["kd"].T == 2.0
    assert str(recipe) == "L = 0.75*CE + 0.25*KD(T=2)"


def test_knobs_leave_what_does_not_refer_to_them():
    recipe = recipe_from(make_cfg("loss=dkd", "T=4"))
    assert recipe.knobs.used == {"T"}  # DKD's alpha/beta are its own settings, not the alpha knob
    recipe.knobs.apply({"T": 1.0, "alpha": 0.1})
    assert recipe.weights == {"ce": 1.0, "dkd": 1.0}
    assert recipe.terms["dkd"].T == 1.0 and recipe.terms["dkd"].beta == 8.0


def test_a_scheduled_setting_the_term_cannot_change_is_refused():
    cfg = make_cfg("loss=crd", "loss.crd.nce_t=${T}", "schedule.T.kind=linear", "schedule.T.start=8", "schedule.T.end=2")
    with pytest.raises(ConfigError, match="schedule.T changes loss.crd.nce_t during training, but CRD cannot change nce_t"):
        recipe_from(cfg)


@pytest.mark.parametrize(
    ("overrides", "formula"),
    [
        (["loss=kd", "schedule.T.kind=linear", "schedule.T.start=10", "schedule.T.end=1"], "L = 0.1*CE + 0.9*KD(T: linear 10->1)"),
        (["loss=kd", "schedule.alpha.kind=linear", "schedule.alpha.start=0.5", "schedule.alpha.end=1"],
         "L = (1-alpha)*CE + alpha*KD(T=4); alpha: linear 0.5->1"),
        (["loss=dist", "schedule.T.kind=step", "schedule.T.start=8", "schedule.T.end=2", "schedule.T.per=stage"],
         "L = 1*CE + 2*DIST(b=1,g=1,tau: step 8->2 in 3 steps per stage)"),
    ],
)
def test_the_formula_shows_schedules(overrides, formula):
    assert str(recipe_from(make_cfg(*overrides))) == formula


def test_a_T_schedule_runs_and_is_logged_per_epoch(tmp_path):
    cfg = make_cfg(*FAST, "epochs=3", "schedule.T.kind=linear", "schedule.T.start=8", "schedule.T.end=2",
                   "schedule.alpha.kind=cosine", "schedule.alpha.start=0.5", "schedule.alpha.end=1.0")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed"
    rows = [r for r in read_metrics(tmp_path) if r["model"] == "student" and r["split"] == "train"]
    assert [r["T"] for r in rows] == pytest.approx([8.0, 5.0, 2.0])
    assert [r["alpha"] for r in rows] == pytest.approx([0.5, 0.75, 1.0])
    # alpha = 1 in the last epoch: CE's weight is 0, so the total is the KD part alone.
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["loss/kd"], rel=1e-4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("schedule.T.kind=wiggle", "schedule.T.kind='wiggle' must be one of constant, linear"),
        ("schedule.alpha.end=1.5", "schedule.alpha.end=1.5 is outside [0, 1]"),
        ("schedule.T.start=0", "schedule.T.start=0 must be > 0"),
        ("schedule.T.per=batch", "schedule.T.per='batch' must be epoch or stage"),
        ("schedule.T.steps=0", "schedule.T.steps=0 must be >= 1"),
    ],
)
def test_bad_schedules_are_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run(make_cfg(*FAST, override), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_masked_cross_entropy_counts_labelled_samples_only():
    from kdrun.losses import StepOutputs
    from kdrun.losses.logits import CrossEntropy
    from kdrun.tasks import IGNORE

    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    mask = torch.tensor([True, False, True, False, True, False])
    hidden = labels.masked_fill(~mask, IGNORE)
    masked = CrossEntropy()(StepOutputs(student_logits=logits, labels=hidden, partial_labels=True))
    expected = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    assert masked.item() == pytest.approx(expected.item())
    all_hidden = torch.full_like(labels, IGNORE)
    none = CrossEntropy()(StepOutputs(student_logits=logits.requires_grad_(), labels=all_hidden, partial_labels=True))
    assert none.item() == 0.0 and none.requires_grad


def test_knobs_resolve_the_config_only_when_a_value_changes(monkeypatch):
    import kdrun.losses.recipe as recipe_module

    recipe = recipe_from(make_cfg("loss=kd", "T=4", "alpha=0.9"))
    calls = []
    monkeypatch.setattr(recipe_module, "resolve_loss", lambda cfg, **knobs: calls.append(knobs) or resolve_loss(cfg, **knobs))
    for _ in range(3):  # every epoch of a run without schedules: the values the recipe was built with
        recipe.knobs.apply({"T": 4.0, "alpha": 0.9})
    assert calls == []
    recipe.knobs.apply({"T": 2.0, "alpha": 0.9})
    recipe.knobs.apply({"T": 2.0, "alpha": 0.9})
    assert calls == [{"T": 2.0, "alpha": 0.9}] and recipe.terms["kd"].T == 2.0
