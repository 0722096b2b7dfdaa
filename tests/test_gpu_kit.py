"""The GPU verification kit on a machine without a GPU: ``scripts/gpu_check.sh`` says so and
exits 0 before installing anything (or, where nvidia-smi lists a GPU that torch cannot use,
stops with a report that says why); ``scripts/gpu_report.py`` writes the report from real
pytest and bench outputs; ``scripts/bench.py --peers`` prints the peer ratios, or refuses in one
line without torchdistill."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "scripts" / "gpu_check.sh"
BASH = shutil.which("bash") or "/bin/bash"
on_a_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the kit would run for real")


def tools(tmp_path: Path, nvidia_smi: str | None) -> dict:
    """An environment with ``nvidia-smi`` as given (a shell script) first on PATH, this Python next;
    or, for ``None``, a PATH of the few tools the kit needs before it looks for a GPU, and no nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if nvidia_smi is None:
        for tool in ("dirname", "grep", "sed"):
            (bin_dir / tool).symlink_to(shutil.which(tool))
        return {**os.environ, "PATH": str(bin_dir)}
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n" + nvidia_smi)
    (bin_dir / "nvidia-smi").chmod(0o755)
    return {**os.environ, "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])}


@on_a_gpu
@pytest.mark.parametrize("nvidia_smi, says", [
    (None, "nvidia-smi is not on PATH"),
    ('echo "No devices were found"; exit 6\n', "nvidia-smi lists none"),  # a driver without a GPU
], ids=["no nvidia-smi", "nvidia-smi lists no GPU"])
def test_kit_says_no_gpu_and_exits_0_before_installing_anything(tmp_path, nvidia_smi, says):
    out = tmp_path / "out"
    result = subprocess.run([BASH, str(KIT), "--out", str(out)], capture_output=True, text=True, timeout=60,
                            env=tools(tmp_path, nvidia_smi))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"gpu_check: no GPU ({says}): nothing to check, nothing installed"
    assert not out.exists()


def test_kit_refuses_bad_arguments_in_one_line():
    result = subprocess.run([BASH, str(KIT), "--budget", "soon"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gpu_check: error: --budget needs whole seconds and --out a directory (got budget 'soon', out 'outputs/gpu_check')"
    ]


@pytest.mark.slow
@on_a_gpu
def test_kit_stops_with_a_report_when_torch_cannot_use_the_listed_gpu(tmp_path):
    listed = 'case "$1" in -L) echo "GPU 0: Stub (UUID: GPU-0)";; *) echo "Stub, 1024 MiB, 1.0";; esac\n'
    out = tmp_path / "out"
    result = subprocess.run([BASH, str(KIT), "--no-install", "--out", str(out)], capture_output=True, text=True,
                            timeout=120, env=tools(tmp_path, listed))
    assert result.returncode == 1, result.stdout + result.stderr
    report = (out / "report.md").read_text()
    assert "| GPU 0 (name, memory, driver) | Stub, 1024 MiB, 1.0 |" in report
    assert "| torch_sees_the_gpu | failed (exit 1) |" in report and "has no CUDA" in report
    for step in ("cuda_tests", "bench_default", "bench_cifar"):
        assert f"| {step} | skipped (torch sees no GPU) |" in report


@pytest.fixture(scope="module")
def bench_with_peers(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    pytest.importorskip("torchdistill", reason="--peers needs torchdistill (pip install -e '.[peers]')")
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--peers", "--quick", "--no-e2e", "--switches", "device_data",
         "--out", str(out / "bench_default.json")],
        capture_output=True, text=True, timeout=300, cwd=out,
    )
    (out / "bench_default.log").write_text(result.stdout + result.stderr)
    return out, result


@pytest.mark.slow
def test_bench_peers_prints_the_ratios_to_torchdistill_and_the_hand_written_loop(bench_with_peers):
    out, result = bench_with_peers
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((out / "bench_default.json").read_text())
    for key in ("torchdistill_kd_step_s", "hand_kd_step_s", "kdrun_step_s", "kdrun_step_s_no_cache"):
        assert figures[key] > 0
    assert figures["throughput_vs_torchdistill_no_cache"] == pytest.approx(
        figures["torchdistill_kd_step_s"] / figures["kdrun_step_s_no_cache"])
    assert figures["throughput_vs_torchdistill"] == pytest.approx(figures["torchdistill_kd_step_s"] / figures["kdrun_step_s"])
    assert "| (e) throughput / torchdistill, teacher cache off (like for like" in result.stdout
    assert "| (b) throughput / hand-written loop, teacher cache off (like for like) |" in result.stdout


@pytest.mark.slow
def test_report_has_every_test_outcome_and_the_bench_tables(bench_with_peers):
    out, _ = bench_with_peers
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO / "tests" / "test_cuda.py"), "-m", "cuda", "-n", "0", "-v",
         "-p", "no:cacheprovider", f"--junitxml={out / 'cuda_tests.xml'}"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert tests.returncode == 0, tests.stdout[-3000:]
    (out / "steps.tsv").write_text("step\tstatus\tseconds\tlimit\ncuda_tests\tpassed\t3\t240\n"
                                   "bench_default\tpassed\t30\t150\nbench_cifar\ttimed out after 150s\t150\t150\n")
    (out / "bench_cifar.log").write_text("building the CIFAR preset\n")
    report = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_report.py"), str(out), "--seconds", "200"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert report.returncode == 0, report.stderr
    text = report.stdout
    collected = tests.stdout.count("tests/test_cuda.py::")
    assert collected >= 10 and text.count(" | skipped | ") == collected
    assert f"{collected} skipped" in text and "needs a CUDA GPU" in text
    assert "**1 of 3 steps failed or timed out, 0 skipped**" in text
    assert "### default" in text and "| (e) throughput / torchdistill" in text and "| (a) KD overhead ratio" in text
    assert "### cifar" in text and "building the CIFAR preset" in text  # a cut-short step shows its output's end


@pytest.mark.slow
def test_bench_peers_without_torchdistill_is_one_line_and_exit_2(tmp_path):
    # A Python where torchdistill cannot be imported (an entry of None in sys.modules makes the import fail).
    program = ("import runpy, sys\n"
               "scripts = sys.argv[1]\n"
               "sys.modules['torchdistill'] = None\n"
               "sys.path.insert(0, scripts)\n"
               "sys.argv = [scripts + '/bench.py', '--peers', '--quick']\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", program, str(REPO / "scripts")], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench: error: --peers needs torchdistill") and "[peers]" in lines[0]
    assert not (tmp_path / "outputs").exists()
