"""Shared by the scripts that measure the tables in docs/: run a sweep, describe the machine and
versions, and write a table into its marked place in a docs page.

A table lives between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in a page; the scripts
replace what is between the markers, so the prose around a table is edited by hand and the
numbers only by the script that measured them.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import kdrun

REPO = Path(__file__).resolve().parents[1]


def environment(threads: str | None = None) -> str:
    """One line: versions, thread count and machine, for the head of a measured table."""
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    threads = threads or os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads())
    return (f"kdrun {kdrun.__version__} ({sha or 'no git'}), torch {torch.__version__}, Python {platform.python_version()}, "
            f"{threads} thread(s) per process, {os.cpu_count()}-core {platform.machine()} CPU")


def provenance() -> str:
    """The line above a written table: how to regenerate it, and what measured it."""
    import time

    threads = os.environ.get("OMP_NUM_THREADS")
    command = " ".join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), "python", *sys.argv])
    return f"Measured with `{command}` on {time.strftime('%Y-%m-%d')}: {environment()}."


def run_sweep(sweep_dir: Path, overrides: list[str], env: dict | None = None) -> Path:
    """``kdrun -m <overrides>`` into ``sweep_dir``; a sweep whose jobs all completed is kept as it is,
    one cut short (a job without its summary) is removed and run again from the start."""
    from kdrun.reporting.sweep import collect

    if sweep_dir.is_dir():
        jobs = collect(sweep_dir)
        jobs_started = [d for d in sweep_dir.iterdir() if d.is_dir() and (d / "config.yaml").exists()]
        if jobs and len(jobs) == len(jobs_started) and all(job.status == "completed" for job in jobs):
            return sweep_dir
        shutil.rmtree(sweep_dir)
    command = [sys.executable, "-m", "kdrun", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    print("+", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=False, env={**os.environ, **(env or {})})
    return sweep_dir


def write_block(page: Path, name: str, text: str) -> None:
    """Put ``text`` between the page's ``table:NAME`` markers (added at the end when missing)."""
    start, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
    content = page.read_text() if page.exists() else ""
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in content:
        content = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, content, flags=re.S)
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    page.write_text(content)
