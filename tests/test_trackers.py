"""logger=mlflow and logger=wandb: what a run and a sweep record, read back with MLflow's own client
and from W&B's offline run files; failures are one line; nothing touches a network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import FAST, kdrun_cli, make_cfg, read_metrics, wandb_records
from kdrun.errors import ConfigError
from kdrun.reporting.trackers import Guarded, Tracker, flatten
from kdrun.run import run

SHORT = [*FAST, "scratch=false"]  # FAST's teacher, which other tests of the worker have cached


@pytest.fixture(autouse=True)
def wandb_home(tmp_path, monkeypatch):
    """W&B keeps settings, logs and staged files in the user's home; here in the test's folder."""
    for variable in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home" / variable.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)


def resolved_params(run_dir: Path) -> dict[str, str]:
    """The run's resolved config as saved, flattened: what every tracker must hold as parameters."""
    return {key: str(value) for key, value in flatten(yaml.safe_load((run_dir / "config_resolved.yaml").read_text())).items()}


def epoch_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if isinstance(r.get("epoch"), int)]


def mlflow_client(store_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store_dir / 'mlruns' / 'mlflow.db'}")


@pytest.mark.slow
def test_mlflow_run_is_read_back_with_mlflows_client(tmp_path):
    pytest.importorskip("mlflow", reason="logger=mlflow needs the track extra: pip install -e '.[track]'")
    summary = run(make_cfg(*SHORT, "logger=mlflow"), tmp_path)
    client = mlflow_client(tmp_path)
    [found] = client.search_runs([client.get_experiment_by_name("kdrun").experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == tmp_path.name
    assert found.data.params == resolved_params(tmp_path)
    assert found.data.tags["recipe"] == summary["recipe"] == "L = 0.1*CE + 0.9*KD(T=4)"
    assert (found.data.tags["strategy"], found.data.tags["dataset"]) == ("offline", "mnist1d")
    for row in epoch_rows(tmp_path):  # every number of every row, at step = epoch
        for key, value in row.items():
            if key not in ("epoch", "model", "split") and isinstance(value, (int, float)):
                name = f"{row['model']}/{row['split']}/{key}"
                history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, name)}
                assert history[row["epoch"]] == pytest.approx(value), name
    metrics = found.data.metrics
    assert metrics["student.test_acc"] == pytest.approx(summary["student"]["test_acc"])
    assert metrics["figures.compression"] == pytest.approx(summary["figures"]["compression"])
    assert metrics["wall_time_s"] == pytest.approx(summary["wall_time_s"])
    copy = Path(client.download_artifacts(found.info.run_id, "checkpoints/best.pt", str(tmp_path / "download")))
    assert copy.read_bytes() == (tmp_path / "checkpoints" / "best.pt").read_bytes()
    assert {a.path for a in client.list_artifacts(found.info.run_id)} == {"checkpoints", "summary.json"}


def test_mlflow_names_keep_hydra_choices_readable():
    from kdrun.reporting.mlflow_tracker import mlflow_name

    assert mlflow_name("choices.paper_loss/fitnet@_global_") == "choices.paper_loss/fitnet__global_"
    assert mlflow_name("student/val/acc") == "student/val/acc"


def wandb_run_files(where: Path) -> list[Path]:
    return sorted(where.glob("wandb/offline-run-*/run-*.wandb"))


def records_of(path: Path, kind: str) -> list:
    return [getattr(r, kind) for r in wandb_records(path) if r.WhichOneof("record_type") == kind]


def summary_values(path: Path) -> dict:
    """The run summary at its end: every summary update, in order."""
    import json

    values = {}
    for update in records_of(path, "summary"):
        for item in update.update:
            values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values


@pytest.mark.slow
def test_wandb_offline_run_directory_holds_config_curves_figures_and_the_student(tmp_path):
    pytest.importorskip("wandb", reason="logger=wandb needs the track extra: pip install -e '.[track]'")
    import json

    summary = run(make_cfg(*SHORT, "logger=wandb"), tmp_path)
    [run_file] = wandb_run_files(tmp_path)
    [first, *later] = records_of(run_file, "run")
    config = {item.key: json.loads(item.value_json) for item in first.config.update if item.key != "_wandb"}
    assert {key: str(value) for key, value in config.items()} == resolved_params(tmp_path)
    assert first.project == "kdrun" and first.display_name == tmp_path.name
    tags = {tag for record in (first, *later) for tag in record.tags}
    assert {"strategy=offline", "dataset=mnist1d", summary["recipe"]} <= tags

    logged = []
    for history in records_of(run_file, "history"):
        logged.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in history.item})
    for row in epoch_rows(tmp_path):
        step = {f"{row['model']}/epoch": row["epoch"]}
        match = [entry for entry in logged if entry.get(f"{row['model']}/epoch") == row["epoch"]
                 and all(entry.get(f"{row['model']}/{row['split']}/{k}") == pytest.approx(v) for k, v in row.items()
                         if k not in ("epoch", "model", "split") and isinstance(v, (int, float)))]
        assert match, (row, step)

    final = summary_values(run_file)
    assert final["student.test_acc"] == pytest.approx(summary["student"]["test_acc"])
    assert final["recipe"] == summary["recipe"]
    [artifact] = records_of(run_file, "artifact")
    [content] = artifact.manifest.contents
    best = tmp_path / "checkpoints" / "best.pt"
    assert (artifact.type, content.path, content.size) == ("model", "best.pt", best.stat().st_size)
    assert Path(content.local_path) == best.resolve()
    [ended] = records_of(run_file, "exit")
    assert ended.exit_code == 0


def sweep_with(logger: str, tmp_path: Path) -> Path:
    """Two jobs (T=2 and T=4) from the command line, tracked by ``logger``; the sweep directory."""
    pytest.importorskip(logger, reason=f"logger={logger} needs the track extra: pip install -e '.[track]'")
    sweep = tmp_path / "sweep"
    done = kdrun_cli("-m", *SHORT, f"logger={logger}", "T=2,4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return sweep


@pytest.mark.slow
def test_mlflow_sweep_is_a_parent_run_with_a_child_per_job_and_the_report(tmp_path):
    sweep = sweep_with("mlflow", tmp_path)
    client = mlflow_client(sweep)
    runs = client.search_runs([client.get_experiment_by_name("kdrun").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("kdrun.role") == "sweep"]
    children = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep"
    assert sorted(c.data.params["T"] for c in children) == ["2", "4"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/summary.md", "report/summary.csv"} <= report
    assert not list(sweep.glob("*/mlruns"))  # one store for the sweep, not one per job


@pytest.mark.slow
def test_wandb_sweep_is_one_group_with_a_report_run(tmp_path):
    sweep = sweep_with("wandb", tmp_path)
    jobs = [path for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[:3].isdigit())
            for path in wandb_run_files(job)]
    [report] = wandb_run_files(sweep)
    assert len(jobs) == 2
    for path in [*jobs, report]:
        assert records_of(path, "run")[0].run_group == "sweep"
    assert [records_of(path, "run")[0].job_type for path in jobs] == ["job", "job"]
    [artifact] = records_of(report, "artifact")
    assert artifact.type == "sweep-report"
    assert {"summary.md", "summary.csv"} <= {c.path for c in artifact.manifest.contents}


@pytest.mark.slow
def test_unreachable_tracking_server_refuses_the_run_with_one_line(tmp_path):
    pytest.importorskip("mlflow", reason="logger=mlflow needs the track extra: pip install -e '.[track]'")
    run_dir = tmp_path / "run"
    done = kdrun_cli(*SHORT, "logger=mlflow", "logger.tracking_uri=http://127.0.0.1:9", f"hydra.run.dir={run_dir}",
                     cwd=tmp_path)  # port 9 on this machine: nothing listens, the connection is refused at once
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("kdrun: error: logger=mlflow: cannot reach the tracking store")
    assert "Traceback" not in done.stderr and "Retrying" not in done.stderr
    assert not (run_dir / "summary.json").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("overrides, wanted", [
    (["logger=mlflow", "logger.tracking_uri=ftp://host/x"], "logger.tracking_uri=ftp://host/x is not an MLflow tracking URI"),
    (["logger=wandb", "logger.mode=cloud"], "logger.mode=cloud must be one of offline, online, disabled"),
])
def test_bad_tracker_settings_are_refused_before_any_work(tmp_path, overrides, wanted):
    pytest.importorskip(overrides[0].split("=")[1], reason="the track extra: pip install -e '.[track]'")
    with pytest.raises(ConfigError, match=wanted):
        run(make_cfg(*SHORT, *overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


class FailingTracker(Tracker):
    """A tracker whose store goes away after the run started (what Guarded is there for)."""

    name = "failing"

    def __init__(self):
        self.rows = 0

    def write(self, row):
        self.rows += 1
        if self.rows == 2:
            raise ConnectionError("tracking server went away\nsecond line")


def test_a_tracker_failing_during_the_run_is_one_warning_and_switched_off(caplog):
    tracker = Guarded(FailingTracker())
    for epoch in range(1, 5):
        tracker.write({"epoch": epoch, "model": "student", "split": "train", "acc": 1.0})
    tracker.finish({"status": "completed"}, Path("."))
    assert tracker.inner.rows == 2  # nothing was sent after the failure
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "logger=failing failed (ConnectionError: tracking server went away second line)" in warning.getMessage()


@pytest.mark.slow
def test_trackers_are_imported_only_when_chosen():
    code = ("import sys, kdrun.run, kdrun.cli, kdrun.export; from kdrun.config import validate; "
            "from helpers import make_cfg; validate(make_cfg()); "
            "print(sorted(m for m in ('mlflow', 'wandb', 'onnxruntime', 'timm') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
