"""Every shell command in README.md and docs/ runs as written (shortened), unless it is marked as
needing what this machine does not have.

A command is a line in a fenced ``bash``/``sh`` block (or a plain fenced block) that starts with
``kdrun``, ``kdrun-report``, ``kdrun-export``, ``python -m kdrun`` or ``torchrun``. It is skipped
when its line says ``# needs: <what>`` (data on disk, a GPU, a network, a cluster) or when it holds
a placeholder such as ``<run dir>``. The others run with short settings appended (one epoch, a
small MNIST-1D or the first 100,000 characters of the embedded corpus, a brief speed-up timing,
two Optuna trials, the first two values of each swept list), each in its own directory, and must
exit with status 0. A command written the same way on two pages runs once.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
STARTS = ("kdrun ", "kdrun-report ", "kdrun-export ", "python -m kdrun", "torchrun ")
SHORT = ["epochs=1", "teacher_training.epochs=1", "speed.min_rounds=2", "speed.budget_s=0"]
SHORT_DATA = ["dataset.source.num_samples=600"]
SHORT_TEXT = ["dataset.source.max_chars=100000"]


def commands() -> list[tuple[str, str]]:
    """(page:line, command) for every command line in a fenced shell block."""
    found = []
    for page in PAGES:
        fence = None
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            stripped = line.strip()
            if stripped.startswith("```"):
                fence = None if fence is not None else stripped[3:].strip() or "plain"
                continue
            if fence in ("bash", "sh", "shell", "plain") and stripped.startswith(STARTS):
                command = stripped
                while command.endswith("\\") and number < len(lines):
                    command = command[:-1] + " " + lines[number].strip()
                    number += 1
                found.append((f"{page.relative_to(REPO)}:{number}", command))
    return found


def runnable(command: str) -> bool:
    return "# needs:" not in command and not re.search(r"<[^>]+>|\.\.\.", command.split(" #")[0])


def two_values(word: str) -> str:
    """``T=1,2,4,8`` as ``T=1,2``: a sweep runs two values of each list (its parsing and its
    summary are what the page shows); ``interval(1,20)`` and ``[a,b]`` stay as written."""
    key, _, value = word.partition("=")
    if not value or "," not in value or re.search(r"[(\[]", value):
        return word
    return f"{key}={','.join(value.split(',')[:2])}"


def shortened(command: str) -> list[str]:
    words = shlex.split(command.split(" #")[0])
    if words[0] in ("kdrun-report", "kdrun-export") or "--help" in words or "--cfg" in words:
        return words
    multirun = "-m" in words or "--multirun" in words
    if multirun:
        words = [re.sub(r"^(hydra\.sweeper\.n_trials)=\d+$", r"\1=2", two_values(w)) for w in words]
    extra = [*SHORT]
    text = ("experiment=lm", "experiment=distil", "experiment=tinybert", "dataset=lm_")
    if any(w.startswith(text) for w in words):
        extra += SHORT_TEXT
    elif not any(w.startswith(("dataset=", "experiment=crd", "experiment=imagenet")) for w in words):
        extra += SHORT_DATA
    if multirun and any("hparams_search=optuna" in w for w in words) and not any("n_trials" in w for w in words):
        extra.append("hydra.sweeper.n_trials=2")
    return [*words, *extra]


def cases() -> list[tuple[str, str]]:
    """The runnable commands, each shortened form once (at its first page and line)."""
    seen, found = set(), []
    for where, command in commands():
        if not runnable(command):
            continue
        key = tuple(shortened(command))
        if key not in seen:
            seen.add(key)
            found.append((where, command))
    return found


CASES = cases()


def test_the_pages_hold_commands_and_each_skipped_one_says_why():
    every = commands()
    assert len(CASES) >= 10, [c for _, c in every]
    for where, command in every:
        if not runnable(command) and "# needs:" not in command:
            assert re.search(r"<[^>]+>|\.\.\.", command), (where, command)  # a placeholder a user fills in


@pytest.mark.slow
@pytest.mark.parametrize("where, command", CASES, ids=[where for where, _ in CASES])
def test_a_documented_command_runs(tmp_path, where, command):
    words = shortened(command)
    if words[0] in ("kdrun", "kdrun-report", "kdrun-export"):
        words = [sys.executable, "-m", {"kdrun": "kdrun", "kdrun-report": "kdrun.reporting.report_cli",
                                         "kdrun-export": "kdrun.export"}[words[0]], *words[1:]]
    elif words[:3] == ["python", "-m", "kdrun"]:
        words = [sys.executable, *words[1:]]
    elif words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", "--standalone", *words[1:]]
    result = subprocess.run(words, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{where}: {' '.join(words)}\n{result.stderr[-3000:]}"
