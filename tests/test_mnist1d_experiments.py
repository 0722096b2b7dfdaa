"""The embedded paper baselines: MNIST-1D's model baselines and the temperature study."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from helpers import kdrun_cli, make_cfg, read_summary
from kdrun.models import count_params
from kdrun.models.mnist1d_paper import logistic, residual_mlp, strided_cnn


def test_paper_models_have_the_reference_parameter_counts():
    # greydanus/mnist1d notebooks/models.py: LinearBase(40, 10), MLPBase(40, 10, 100), ConvBase(10).
    expected = {logistic: 410, residual_mlp: 15_210, strided_cnn: 5_210}
    for factory, params in expected.items():
        model = factory(10, (1, 40))
        assert count_params(model) == params, factory.__name__
        assert model(torch.randn(3, 1, 40)).shape == (3, 10)
        assert {"stem", "embedding", "fc"} <= {name for name, _ in model.named_children()}


def test_the_paper_cnn_refuses_images():
    from kdrun.errors import ConfigError

    with pytest.raises(ConfigError, match=r"takes \(C, L\) signals"):
        strided_cnn(10, (1, 8, 8))


def test_baselines_experiment_has_the_datasets_recipe_and_numbers():
    cfg = make_cfg("experiment=mnist1d_baselines")
    assert (cfg.epochs, cfg.dataset.batch_size, cfg.optim.lr, cfg.optim.weight_decay) == (200, 100, 0.01, 0.0)
    assert cfg.dataset.val_fraction == 0.0 and list(cfg.loss) == ["ce"]
    with open_dict(cfg):
        cfg.choices = {"student": "mnist1d_cnn"}
    assert cfg.published.student_acc == 94.0


@pytest.mark.slow
def test_baselines_sweep_runs_each_model_and_reports_the_published_number(tmp_path):
    result = kdrun_cli("-m", "experiment=mnist1d_baselines", "seed=0", "epochs=1", "dataset.source.num_samples=500",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if (p / "summary.json").exists())
    published = {read_summary(job)["student"]["arch"]: read_summary(job)["published"]["student_acc"] for job in jobs}
    assert published == {"mnist1d_logistic": 32.0, "mnist1d_mlp": 68.0, "mnist1d_cnn": 94.0}


def test_temperature_study_sweeps_T_over_three_seeds_with_alpha_fixed():
    cfg = make_cfg("experiment=mnist1d_temperature_study")
    assert cfg.alpha == 0.9 and cfg.student.arch == "mlp_small" and cfg.teacher.arch == "cnn"
    from hydra import compose, initialize_config_dir

    from helpers import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        full = compose(config_name="train", overrides=["experiment=mnist1d_temperature_study"], return_hydra_config=True)
    assert dict(full.hydra.sweeper.params) == {"T": "1,2,4,8,16", "seed": "0,1,2"}


@pytest.mark.slow
def test_temperature_study_is_one_command_with_a_table_and_a_plot(tmp_path):
    result = kdrun_cli("-m", "experiment=mnist1d_temperature_study", "T=1,16", "seed=0", "epochs=1",
                       "dataset.source.num_samples=500", "teacher_training.epochs=1",
                       f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "sweep"
    assert (sweep / "accuracy_vs_T.png").stat().st_size > 10_000
    table = (sweep / "summary.md").read_text()
    assert "| 1 |" in table and "| 16 |" in table
    alphas = {read_summary(job)["recipe"] for job in sweep.iterdir() if (job / "summary.json").exists()}
    assert alphas == {f"L = 0.1*CE + 0.9*KD(T={T}) + 100*FitNet(last_stage->last_stage)" for T in (1, 16)}
