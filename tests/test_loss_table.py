"""scripts/loss_table.py on finished sweep directories written in kdrun's own formats: the table's
rows and figures, and the block it writes into a page with the command and versions above it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "loss_table.py"


def job(sweep: Path, number: int, loss: str, seed: int, student: float, scratch: float, times: dict[str, float]) -> None:
    """One finished job: overrides, summary.json and the students' training rows in metrics.jsonl."""
    directory = sweep / f"{number:03d}_loss-{loss}_seed-{seed}"
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"loss={loss}", f"seed={seed}"]))
    summary = {"status": "completed", "seed": seed, "recipe": f"L = 1*CE + 1*{loss.upper()}",
               "student": {"test_acc": student}, "scratch": {"test_acc": scratch},
               "versions": {"kdrun": "0.1.0", "torch": "2.x"}}
    (directory / "summary.json").write_text(json.dumps(summary))
    rows = [{"epoch": 1, "model": model, "split": "train", "time_s": seconds} for model, seconds in times.items()]
    rows.append({"epoch": 1, "model": "teacher", "split": "train", "time_s": 100.0})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def loss_table():
    sys.path.insert(0, str(SCRIPT.parent))  # the scripts import their shared docs_tables module
    spec = importlib.util.spec_from_file_location("loss_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_table_counts_a_student_s_pre_stage_and_lands_between_the_markers(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    job(sweep, 0, "kd", 0, 62.0, 60.0, {"student": 10.0})
    job(sweep, 1, "kd", 1, 64.0, 61.0, {"student": 12.0})
    job(sweep, 2, "ft", 0, 66.0, 60.0, {"student.ft_paraphraser": 4.0, "student": 20.0})
    job(sweep, 3, "ft", 1, 65.0, 61.0, {"student.ft_paraphraser": 6.0, "student": 22.0})
    page = tmp_path / "page.md"
    page.write_text("# Zoo\n\nbefore\n<!-- table:loss_table -->\nstale\n<!-- /table:loss_table -->\nafter\n")
    monkeypatch.setattr(sys, "argv", ["scripts/loss_table.py", "--only", str(sweep), "--write", str(page)])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert loss_table().main() == 0
    lines = page.read_text().splitlines()
    assert lines[:4] == ["# Zoo", "", "before", "<!-- table:loss_table -->"]
    assert lines[-2:] == ["<!-- /table:loss_table -->", "after"]
    assert lines[4].startswith("Measured with `OMP_NUM_THREADS=1 python scripts/loss_table.py --only ")
    assert "1 thread(s) per process" in lines[4] and "torch " in lines[4]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines if line.startswith("| ")}
    assert rows["scratch (labels only)"][2] == "60.50 ± 0.71"
    assert rows["kd"][2:6] == ["63.00 ± 1.41", "+2.50 ± 0.71", "11", "2 |"]
    # ft: 66 and 65 against 60 and 61 -> +5.00; its paraphraser's epochs count, the teacher's not: (24 + 28) / 2.
    assert rows["ft"][2:6] == ["65.50 ± 0.71", "+5.00 ± 1.41", "26", "2 |"]
    assert "stale" not in page.read_text()


def test_a_page_without_the_markers_gets_the_block_at_its_end(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("no block here\n")
    loss_table()
    from docs_tables import write_block

    write_block(page, "loss_table", "table")
    assert page.read_text() == "no block here\n\n<!-- table:loss_table -->\ntable\n<!-- /table:loss_table -->\n"
    write_block(page, "loss_table", "new")  # written again: replaced in place
    assert page.read_text().count("table:loss_table -->") == 2 and "new" in page.read_text()
