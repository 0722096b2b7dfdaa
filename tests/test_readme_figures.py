"""The README's default-job figures are what a fresh run prints, under the pinned versions.

The README's block is written by ``scripts/default_job.py``; this test runs the default job on an
empty cache with the thread count the README names and compares teacher, student and scratch test
accuracies with the README's. Floating-point results depend on the library versions and the
thread count, so the test skips, saying why, when the installed versions differ from
``constraints.txt``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The packages whose numerics the default job's result depends on.
NUMERIC = ("torch", "numpy", "mnist1d", "scikit-learn", "scipy")


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("<!-- table:readme_default_job -->", 1)[1].split("<!-- /table:readme_default_job -->", 1)[0]


def pinned() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {name.lower(): version for name, version in (line.split("==", 1) for line in lines if "==" in line)}


def version_differences() -> list[str]:
    pins = pinned()
    found = []
    for name in NUMERIC:
        installed = importlib.metadata.version(name)
        if pins.get(name) != installed:
            found.append(f"{name} {installed} (constraints.txt: {pins.get(name)})")
    return found


def test_the_readme_names_its_versions_and_threads():
    block = readme_block()
    assert re.search(r"(\d+) thread\(s\) per process", block) and "torch " in block
    assert "student (distilled)" in block and "gain from distillation" in block


@pytest.mark.slow
def test_the_default_jobs_seed_0_result_is_the_readmes(tmp_path):
    differences = version_differences()
    if differences:
        pytest.skip("versions differ from constraints.txt, so floating-point results may too: " + "; ".join(differences))
    block = readme_block()
    threads = re.search(r"(\d+) thread\(s\) per process", block).group(1)
    machine = re.search(r"-core (\S+) CPU", block).group(1)
    if machine != platform.machine():
        pytest.skip(f"the README was measured on {machine}, this is {platform.machine()}")
    expected = {row: float(value) for row, value in re.findall(r"^(teacher|student \(distilled\)|student \(scratch\))\s.*?([\d.]+)$",
                                                               block, flags=re.M)}
    env = {**os.environ, "OMP_NUM_THREADS": threads, "KDRUN_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "kdrun", f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True,
                            text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    got = {"teacher": summary["teacher"]["test_acc"], "student (distilled)": summary["student"]["test_acc"],
           "student (scratch)": summary["scratch"]["test_acc"]}
    assert got == pytest.approx(expected, abs=0.005), (got, expected)
