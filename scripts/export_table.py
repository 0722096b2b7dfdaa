"""The deployment table of docs/deploy.md: the default job's student exported to ONNX, timed against
the teacher with ONNX Runtime on the CPU (batch 1 and 128), and quantized to int8.

    python scripts/export_table.py                           # runs the default job, exports, prints the table
    python scripts/export_table.py --only RUN_DIR            # exports a finished run, prints its table
    python scripts/export_table.py --write docs/deploy.md    # also puts the table into the page

Extra arguments go to kdrun (e.g. ``epochs=10``). The table is written between the page's
``<!-- export-table -->`` and ``<!-- /export-table -->`` lines, under the command that made it,
the versions and the thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

from docs_tables import write_block



def versions() -> str:
    from importlib.metadata import version

    names = ("kdrun", "torch", "onnx", "onnxscript", "onnxruntime")
    return ", ".join(f"{name} {version(name)}" for name in names) + f", Python {platform.python_version()}"


def table(summary: dict, command: str, threads: int) -> str:
    export = summary["export"]
    speed, quantized = export["speed"], export.get("quantized")
    lines = [
        f"Made by `{command}` on {os.cpu_count()} CPU cores ({platform.machine()}), ONNX Runtime with "
        f"{threads} intra-op thread(s), {speed['statistic']} of {speed['repeats']} calls in turns; {versions()}.",
        "",
        "| model | params | test acc % | batch 1 ms | batch 128 ms |",
        "|---|---|---|---|---|",
    ]
    batches = speed["batches"]
    teacher, student = summary["teacher"], summary["student"]
    rows = [(f"teacher {teacher['arch']}", teacher, teacher["test_acc"], "teacher_ms")]
    # the exported student is best.pt, so its accuracy is the ONNX file's, not the run's final weights'
    rows.append((f"student {student['arch']}, float", student, (quantized or {}).get("float_test_acc"), "student_ms"))
    if quantized:
        rows.append((f"student {student['arch']}, int8", student, quantized["int8_test_acc"], "student_int8_ms"))
    for label, entry, acc, key in rows:
        shown = "-" if acc is None else f"{acc:.2f}"
        lines.append(f"| {label} | {entry['params']:,} | {shown} | {batches['1'][key]:.3f} | {batches['128'][key]:.3f} |")
    lines += ["", f"Speed-up of the float student over the teacher: {batches['1']['speedup']:.1f}x at batch 1, "
              f"{batches['128']['speedup']:.1f}x at batch 128 (PyTorch, in the run's summary: "
              f"{summary['figures']['speedup']:.1f}x at batch {summary['figures']['speed_batch_size']})."]
    if quantized:
        lines.append(f"File size: {quantized['float_bytes']:,} bytes float, {quantized['int8_bytes']:,} bytes int8.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", type=Path, help="a finished run directory: export it, run no training")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--write", type=Path, help="a markdown page whose export_table block receives the table")
    args, kdrun_args = parser.parse_known_args()
    run_dir = args.only
    if run_dir is None:
        run_dir = Path("outputs/runs") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_export_table"
        subprocess.run([sys.executable, "-m", "kdrun", f"hydra.run.dir={run_dir}", *kdrun_args], check=True)
    subprocess.run([sys.executable, "-m", "kdrun.export", str(run_dir), "--quantize", "--threads", str(args.threads),
                    "--repeats", str(args.repeats)], check=True)
    # The command that makes this table again: the run's own overrides (also for --only), not its directory.
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) if args.only else kdrun_args
    command = " ".join(["python scripts/export_table.py", *(o for o in overrides if not o.startswith("hydra.run.dir=")),
                        f"--threads {args.threads}", f"--repeats {args.repeats}"])
    text = table(json.loads((run_dir / "summary.json").read_text()), command, args.threads)
    print(text)
    if args.write:
        write_block(args.write, "export_table", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
