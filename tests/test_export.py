"""kdrun-export: a run's student as ONNX (checked by ONNX Runtime) or TorchScript, timed against the
teacher with ONNX Runtime, quantized to int8; load_student; one-line errors, exit status 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import FAST, make_cfg, read_summary
from kdrun.engine import checkpoint
from kdrun.export import ATOL, RTOL, main, held_out_data
from kdrun.loading import load_student
from kdrun.models.presets import mlp
from kdrun.resume import read_saved
from kdrun.run import run

ort = pytest.importorskip("onnxruntime", reason="kdrun-export needs the deploy extra: pip install -e '.[deploy]'")
pytest.importorskip("onnxscript", reason="kdrun-export needs the deploy extra: pip install -e '.[deploy]'")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The default job (cnn teacher, mlp_small student on MNIST-1D), shortened."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    run(make_cfg(*FAST, "epochs=1", "scratch=false"), run_dir)  # FAST's teacher: often cached already
    return run_dir


def fresh_copy(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.slow
def test_load_student_is_best_pt_in_the_student_architecture(finished_run):
    student = load_student(finished_run)
    reference = mlp(num_classes=10, input_shape=(1, 40), hidden=[128, 128])
    reference.load_state_dict(checkpoint.load(finished_run / "checkpoints" / "best.pt")["model"])
    x = torch.randn(6, 1, 40)
    assert not student.training
    assert torch.equal(student(x), reference.eval()(x))


@pytest.mark.slow
def test_onnx_export_matches_pytorch_in_onnx_runtime_and_times_teacher_and_student(finished_run, tmp_path, capsys):
    run_dir = fresh_copy(finished_run, tmp_path)
    assert main([str(run_dir), "--repeats", "3"]) == 0
    onnx_file = run_dir / "checkpoints" / "student.onnx"
    # our own check, on a batch size the export never saw: the batch dimension is dynamic
    x = torch.randn(5, 1, 40)
    exported = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(exported, load_student(run_dir)(x).numpy(), rtol=RTOL, atol=ATOL)

    result = json.loads((run_dir / "checkpoints" / "export.json").read_text())
    assert read_summary(run_dir)["export"] == result and read_summary(run_dir)["status"] == "completed"
    assert result["format"] == "onnx" and result["file"] == "student.onnx" and result["arch"] == "mlp_small"
    assert result["check"]["samples"] == 128 and result["check"]["max_abs_diff"] <= ATOL + RTOL * 10
    assert result["check"]["top1_agreement"] == 1.0
    speed = result["speed"]
    assert speed["provider"] == "CPUExecutionProvider" and speed["threads"] == 1 and speed["repeats"] == 3
    assert set(speed["batches"]) == {"1", "128"}
    for row in speed["batches"].values():
        assert row["student_ms"] > 0 and row["teacher_ms"] > 0
        assert row["speedup"] == pytest.approx(row["teacher_ms"] / row["student_ms"])
    assert "wrote checkpoints/student.onnx" in capsys.readouterr().out
    assert not list((run_dir / "checkpoints").glob(".export-*"))  # the work folder is gone


@pytest.mark.slow
def test_quantize_writes_int8_model_with_float_and_int8_test_accuracy(finished_run, tmp_path):
    run_dir = fresh_copy(finished_run, tmp_path)
    assert main([str(run_dir), "--quantize", "--repeats", "2"]) == 0
    quantized = json.loads((run_dir / "checkpoints" / "export.json").read_text())["quantized"]
    int8_file = run_dir / "checkpoints" / "student.int8.onnx"
    assert quantized["int8_bytes"] == int8_file.stat().st_size < quantized["float_bytes"]
    # the float figure is the PyTorch student's accuracy on the whole test set, counted here independently
    student, cfg = load_student(run_dir), read_saved(run_dir, "test")
    _, loader = held_out_data(cfg)
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in loader:
            correct += int((student(inputs).argmax(1) == labels).sum())
            total += len(labels)
    assert quantized["float_test_acc"] == pytest.approx(100.0 * correct / total, abs=0.2)
    assert abs(quantized["int8_test_acc"] - quantized["float_test_acc"]) < 5.0  # int8 weights keep the accuracy
    import onnx

    operators = {node.op_type for node in onnx.load(str(int8_file)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= operators  # the Linear layers run in int8


@pytest.mark.slow
def test_torchscript_export_reloads_and_matches(finished_run, tmp_path):
    run_dir = fresh_copy(finished_run, tmp_path)
    assert main([str(run_dir), "--format", "torchscript", "--repeats", "2"]) == 0
    path = run_dir / "checkpoints" / "student.torchscript.pt"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(path))
    x = torch.randn(3, 1, 40)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), load_student(run_dir)(x), rtol=RTOL, atol=ATOL)
    assert read_summary(run_dir)["export"]["format"] == "torchscript"
    assert not (run_dir / "checkpoints" / "student.onnx").exists()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_run_directories_get_one_line_and_exit_2(finished_run, tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "not a kdrun run directory" in one_error_line(capsys)

    no_best = fresh_copy(finished_run, tmp_path)
    (no_best / "checkpoints" / "best.pt").unlink()
    assert main([str(no_best)]) == 2
    assert "no checkpoints/best.pt" in one_error_line(capsys)

    tampered = tmp_path / "tampered"
    shutil.copytree(finished_run, tampered)
    config = tampered / "config.yaml"
    config.write_text(config.read_text().replace("kdrun.models.presets.mlp", "os.system"))
    assert main([str(tampered)]) == 2
    assert "os.system" in one_error_line(capsys)
    assert not (tampered / "checkpoints" / "student.onnx").exists()

    assert main([str(finished_run), "--format", "torchscript", "--quantize"]) == 2
    assert "--format onnx" in one_error_line(capsys)
    with pytest.raises(SystemExit) as exited:
        main([str(finished_run), "--format", "tflite"])
    assert exited.value.code == 2 and "invalid choice" in one_error_line(capsys)


@pytest.mark.slow
def test_kdrun_export_from_the_shell(finished_run, tmp_path):
    run_dir = fresh_copy(finished_run, tmp_path)
    done = subprocess.run([sys.executable, "-m", "kdrun.export", str(run_dir), "--quantize", "--repeats", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "outputs match PyTorch" in done.stdout and "int8" in done.stdout
    assert "[torch.onnx]" not in done.stdout + done.stderr  # the exporter's progress lines stay quiet
