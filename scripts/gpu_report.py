"""The markdown report of ``scripts/gpu_check.sh``, from what its steps left in its output folder.

    python scripts/gpu_report.py OUT [--seconds S] [--budget B] > OUT/report.md

Reads ``steps.tsv`` (each step's status and time), ``gpus.csv`` (``nvidia-smi`` query),
``cuda_tests.xml`` (pytest's JUnit XML; the ``-v`` log ``cuda_tests.log`` when a time limit cut
pytest short), ``bench_<preset>.log`` (bench.py's output, whose table is copied as it is) and
the logs of failed steps; versions come from the Python running this script.
"""

from __future__ import annotations

import argparse
import csv
import platform
import re
import subprocess
import time
import xml.etree.ElementTree as ElementTree
from importlib import metadata
from pathlib import Path

OUTCOMES = ("passed", "failed", "error", "xfailed", "xpassed", "skipped")
OUTCOME_OF = {"failure": "failed", "error": "error", "skipped": "skipped"}
VERBOSE_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b ?(.*?)(\s+\[\s*\d+%\])?$")


def versions() -> list[tuple[str, str]]:
    """What ran: Python, torch with its CUDA, cuDNN and NCCL, kdrun (and its git commit), torchdistill."""
    rows = [("Python", platform.python_version())]
    try:
        import torch

        nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-"
        rows += [("torch", f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                           f"NCCL {nccl})"),
                 ("GPUs torch sees", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                  or "none")]
    except ImportError as err:
        rows.append(("torch", f"not importable ({err})"))
    for package in ("kdrun", "torchdistill"):
        try:
            rows.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            rows.append((package, "not installed"))
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    rows.append(("git commit", sha.stdout.strip() or "unknown (not a git checkout)"))
    return rows


def test_outcomes(out: Path) -> list[tuple[str, str, str, str]]:
    """(test, outcome, seconds, detail) per CUDA test, from the JUnit XML or else the ``-v`` log."""
    xml = out / "cuda_tests.xml"
    if xml.exists():
        rows = []
        for case in ElementTree.parse(xml).getroot().iter("testcase"):
            outcome, detail = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = "xfailed" if child.get("type") == "pytest.xfail" else OUTCOME_OF[child.tag]
                    text = (child.get("message") or child.text or "").strip()
                    detail = text.splitlines()[0][:240] if text else ""
            rows.append((f"{case.get('name')}", outcome, f"{float(case.get('time', 0)):.1f}", detail))
        return rows
    log = out / "cuda_tests.log"
    rows = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        match = VERBOSE_LINE.match(line.strip())
        if match:
            outcome = {"XFAIL": "xfailed", "XPASS": "xpassed"}.get(match.group(2), match.group(2).lower())
            rows.append((match.group(1).split("::", 1)[1], outcome, "", match.group(3).strip(" ()")[:240]))
    return rows


def bench_table(log: Path) -> str | None:
    """bench.py's printed tables, from its heading line to the line before ``written to``."""
    lines = log.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("kdrun bench, preset")]
    ends = [i for i, line in enumerate(lines) if line.startswith("written to")]
    if not starts or not ends:
        return None
    return "\n".join(lines[starts[-1]:ends[-1]]).strip()


def tail(path: Path, count: int = 30) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else ["(no output)"]
    return "\n".join(lines[-count:])


def report(out: Path, seconds: int | None, budget: int | None) -> str:
    steps = list(csv.DictReader((out / "steps.tsv").open(), delimiter="\t")) if (out / "steps.tsv").exists() else []
    failed = [step for step in steps if step["status"] != "passed" and not step["status"].startswith("skipped")]
    skipped = [step for step in steps if step["status"].startswith("skipped")]
    verdict = ("**every step passed**" if steps and not failed and not skipped else
               f"**{len(failed)} of {len(steps)} steps failed or timed out, {len(skipped)} skipped**")
    took = f", {seconds} s in all" + (f" (budget {budget} s)" if budget else "") if seconds is not None else ""
    lines = ["# kdrun GPU check", "", f"{time.strftime('%Y-%m-%d %H:%M')}{took}: {verdict}", "", "## Machine and versions", "",
             "| | |", "|---|---|"]
    gpus = (out / "gpus.csv").read_text().strip().splitlines() if (out / "gpus.csv").exists() else []
    lines += [f"| GPU {i} (name, memory, driver) | {gpu.strip()} |" for i, gpu in enumerate(gpus)]
    lines += [f"| {name} | {value} |" for name, value in versions()]
    lines += ["", "## Steps", "", "| step | status | seconds | limit (s) |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['limit']} |" for s in steps]
    tests = test_outcomes(out)
    counts = ", ".join(f"{sum(t[1] == o for t in tests)} {o}" for o in OUTCOMES if any(t[1] == o for t in tests))
    lines += ["", "## CUDA tests (tests/test_cuda.py)", "", counts or "no test outcomes recorded", ""]
    if tests:
        lines += ["| test | outcome | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {name} | {outcome} | {secs} | {detail.replace('|', '/')} |" for name, outcome, secs, detail in tests]
    lines += ["", "## Benchmarks (scripts/bench.py)"]
    for step in (step for step in steps if step["step"].startswith("bench_")):
        log = out / f"{step['step']}.log"
        table = bench_table(log) if log.exists() else None
        lines += ["", f"### {step['step'].removeprefix('bench_')}", ""]
        if table or step in skipped:
            lines.append(table or f"no table ({step['status']})")
        else:
            lines += [f"no table ({step['status']}); the end of its output:", "", "```", tail(log), "```"]
    for step in (step for step in failed if not step["step"].startswith("bench_")):
        lines += ["", f"## {step['step']}: {step['status']}, the end of its output", "", "```",
                  tail(out / f"{step['step']}.log"), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="gpu_check.sh's output folder")
    parser.add_argument("--seconds", type=int, help="the kit's total time")
    parser.add_argument("--budget", type=int, help="the kit's time budget")
    args = parser.parse_args()
    print(report(args.out, args.seconds, args.budget), end="")


if __name__ == "__main__":
    main()
