"""``kdrun-export``: the distilled student of a run as an ONNX or TorchScript file, checked against
PyTorch, timed against the teacher with ONNX Runtime on the CPU, and optionally quantized to int8.

Everything lands beside the run's checkpoints (``checkpoints/student.onnx`` or
``checkpoints/student.torchscript.pt``, ``student.int8.onnx``, ``export.json``) and in an ``export``
section of ``summary.json``. Needs the deploy extra (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from kdrun.errors import ConfigError, KdrunError
from kdrun.loading import rebuild_student, rebuild_teacher

log = logging.getLogger("kdrun.export")

# PyTorch's own ONNX tutorial compares ONNX Runtime with PyTorch at these tolerances (float32).
RTOL, ATOL = 1e-3, 1e-5
CHECK_BATCH = 128  # test samples compared, and the large batch timed
SPEED_BATCHES = (1, CHECK_BATCH)
FILES = {"onnx": "student.onnx", "torchscript": "student.torchscript.pt"}


class ExportError(KdrunError):
    """The exported model does not compute what the PyTorch model does (exit status 1)."""


def _runtime():
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("kdrun-export needs ONNX Runtime and the ONNX exporter: pip install 'kdrun[deploy]'") from None
    return onnxruntime


def held_out_data(cfg):
    """The run's task and test loader, rebuilt from its config (the same split and transform)."""
    from kdrun import data as datasets
    from kdrun.config import instantiate_user

    task = instantiate_user(cfg.task, f"task {cfg.task.get('name')}")
    bundle = datasets.build(cfg.dataset, seed=int(cfg.seed))
    return task, bundle.test


def sample_inputs(task, loader, count: int) -> torch.Tensor:
    """The first ``count`` test inputs (repeated when the test set is smaller)."""
    chunks, have = [], 0
    while have < count:
        for loaded in loader:
            inputs = task.batch(loaded).inputs
            if not isinstance(inputs, torch.Tensor):
                raise ConfigError("kdrun-export exports models that take one tensor; this task's inputs are "
                                  f"{type(inputs).__name__}")
            chunks.append(inputs)
            have += len(inputs)
            if have >= count:
                break
    return torch.cat(chunks)[:count].float()


def export_onnx(model: nn.Module, inputs: torch.Tensor, path: Path, what: str) -> None:
    """``model`` as ONNX at ``path`` with a dynamic batch dimension (torch's dynamo exporter)."""
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (inputs[:2],), str(path), dynamo=True, external_data=False, verbose=False,
                              input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},))
    except Exception as err:  # noqa: BLE001 - the exporter fails in many ways on a model it cannot trace
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"cannot export {what} to ONNX ({type(err).__name__}: {first[:300]})") from None


def export_torchscript(model: nn.Module, inputs: torch.Tensor, path: Path, what: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript is deprecated in torch >= 2.10; asked for by name
            torch.jit.trace(model, inputs[:2]).save(str(path))
    except Exception as err:  # noqa: BLE001 - tracing fails in many ways on a model it cannot follow
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"cannot export {what} to TorchScript ({type(err).__name__}: {first[:300]})") from None


def session(path: Path, threads: int):
    runtime = _runtime()
    options = runtime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return runtime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(sess, inputs: np.ndarray, batch: int = 512) -> np.ndarray:
    return np.concatenate([sess.run(None, {"input": inputs[i:i + batch]})[0] for i in range(0, len(inputs), batch)])


def check(reference: torch.Tensor, exported: np.ndarray, what: str) -> dict[str, Any]:
    """``exported`` against PyTorch's ``reference`` outputs: every logit within the tolerance."""
    expected = reference.detach().numpy()
    diff = float(np.abs(exported - expected).max())
    agree = float((exported.argmax(1) == expected.argmax(1)).mean())
    result = {"samples": len(expected), "max_abs_diff": diff, "rtol": RTOL, "atol": ATOL, "top1_agreement": agree}
    if not np.allclose(exported, expected, rtol=RTOL, atol=ATOL):
        raise ExportError(f"{what} differs from PyTorch beyond rtol={RTOL}, atol={ATOL} "
                          f"(max |diff| {diff:.3g}, top-1 agreement {100 * agree:.1f}%); nothing was written")
    return result


def check_torchscript(path: Path, reference: torch.Tensor, inputs: torch.Tensor) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path))
    with torch.no_grad():
        return check(reference, loaded(inputs).numpy(), "the TorchScript student (reloaded)")


def time_sessions(sessions: dict[str, Any], inputs: np.ndarray, repeats: int, warmup: int = 3) -> dict[str, dict]:
    """Median milliseconds per batch of each session at each of SPEED_BATCHES. The sessions run in
    turns, one call each per repeat, so a slow spell of a shared CPU falls on all of them."""
    result: dict[str, dict] = {}
    for size in SPEED_BATCHES:
        batch = inputs[:size]
        for sess in sessions.values():
            for _ in range(warmup):
                sess.run(None, {"input": batch})
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(repeats):
            for name, sess in sessions.items():
                start = time.perf_counter()
                sess.run(None, {"input": batch})
                times[name].append(time.perf_counter() - start)
        row = {f"{name}_ms": 1000 * statistics.median(spent) for name, spent in times.items()}
        if "teacher" in sessions:
            row["speedup"] = row["teacher_ms"] / row["student_ms"]
        result[str(size)] = row
    return result


def accuracy(sess, inputs: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float((run_session(sess, inputs).argmax(1) == labels).mean())


def quantize(float_path: Path, int8_path: Path, threads: int, test: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """ONNX Runtime's post-training dynamic quantization (int8 weights, activations quantized on the
    fly), after its pre-processing (shape inference, graph optimisation), and the test accuracy of
    the float and int8 files, both through ONNX Runtime."""
    _runtime()
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = int8_path.with_name("student.prepared.onnx")
    quant_pre_process(str(float_path), str(prepared))
    quantize_dynamic(str(prepared), str(int8_path), weight_type=QuantType.QInt8)
    inputs, labels = test
    return {
        "method": "onnxruntime dynamic int8 (weights QInt8)", "file": int8_path.name,
        "float_test_acc": accuracy(session(float_path, threads), inputs, labels),
        "int8_test_acc": accuracy(session(int8_path, threads), inputs, labels),
        "float_bytes": float_path.stat().st_size, "int8_bytes": int8_path.stat().st_size,
    }


def full_test_set(task, loader) -> tuple[np.ndarray, np.ndarray]:
    inputs, labels = [], []
    for loaded in loader:
        batch = task.batch(loaded)
        inputs.append(batch.inputs.float())
        labels.append(batch.labels)
    return torch.cat(inputs).numpy(), torch.cat(labels).numpy()


def measure(student_onnx: Path, teacher: nn.Module | None, inputs: torch.Tensor, work: Path, threads: int,
            repeats: int, int8: Path | None) -> dict[str, Any]:
    """Teacher against student (and int8 student) with ONNX Runtime on the CPU."""
    sessions = {"student": session(student_onnx, threads)}
    if teacher is not None:
        teacher_onnx = work / "teacher.onnx"
        export_onnx(teacher, inputs, teacher_onnx, "the teacher")
        sessions["teacher"] = session(teacher_onnx, threads)
    if int8 is not None:
        sessions["student_int8"] = session(int8, threads)
    return {"runtime": f"onnxruntime {_runtime().__version__}", "provider": "CPUExecutionProvider", "threads": threads,
            "repeats": repeats, "statistic": "median ms per batch", "batches": time_sessions(sessions, inputs.numpy(), repeats)}


def export(run_dir: str | Path, fmt: str = "onnx", quantize_int8: bool = False, threads: int = 1,
           repeats: int = 20) -> dict[str, Any]:
    """Export, check, time (and quantize) the student of ``run_dir``; returns what export.json holds."""
    if fmt not in FILES:
        raise ConfigError(f"--format {fmt}: use one of {', '.join(FILES)}")
    if quantize_int8 and fmt != "onnx":
        raise ConfigError("--quantize quantizes the ONNX file: use it with --format onnx")
    _runtime()
    student, cfg, summary = rebuild_student(run_dir)
    run_path = Path(os.path.expanduser(str(run_dir))).resolve()
    ckpt_dir = run_path / "checkpoints"
    task, loader = held_out_data(cfg)
    inputs = sample_inputs(task, loader, CHECK_BATCH)
    with torch.no_grad():
        reference = student(inputs)
    teacher, teacher_note = rebuild_teacher(run_dir, cfg, summary)
    with tempfile.TemporaryDirectory(dir=ckpt_dir, prefix=".export-") as tmp:
        work = Path(tmp)
        onnx_path = work / FILES["onnx"]
        export_onnx(student, inputs, onnx_path, f"the student {summary['student']['arch']}")
        result: dict[str, Any] = {"format": fmt, "file": FILES[fmt], "source": "best.pt", "arch": summary["student"]["arch"]}
        result["check"] = check(reference, run_session(session(onnx_path, threads), inputs.numpy()), "ONNX Runtime's output")
        if fmt == "torchscript":
            export_torchscript(student, inputs, work / FILES[fmt], f"the student {summary['student']['arch']}")
            result["check"] = check_torchscript(work / FILES[fmt], reference, inputs)
        int8 = work / "student.int8.onnx" if quantize_int8 else None
        if int8 is not None:
            result["quantized"] = quantize(onnx_path, int8, threads, full_test_set(task, loader))
        result["speed"] = measure(onnx_path, teacher, inputs, work, threads, repeats, int8)
        result["speed"]["teacher"] = teacher_note
        for name in [FILES[fmt]] + ([int8.name] if int8 is not None else []):
            os.replace(work / name, ckpt_dir / name)
    write_results(run_path, result)
    return result


def write_results(run_dir: Path, result: dict[str, Any]) -> None:
    """``checkpoints/export.json``, and the ``export`` section of ``summary.json`` (each written to a
    temporary file and renamed, so a reader never sees half a file)."""
    from kdrun.reporting.summary import write_summary

    path = run_dir / "checkpoints" / "export.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["export"] = result
    write_summary(run_dir, summary)


def describe(result: dict[str, Any]) -> str:
    """What kdrun-export prints: the file, the check, the speed table, the int8 accuracy."""
    check_ = result["check"]
    lines = [f"wrote checkpoints/{result['file']} ({result['arch']}); outputs match PyTorch on {check_['samples']} test "
             f"samples: max |diff| {check_['max_abs_diff']:.2g} (rtol {check_['rtol']:g}, atol {check_['atol']:g})"]
    speed = result["speed"]
    lines.append(f"{speed['runtime']} on the CPU, {speed['threads']} thread(s), {speed['statistic']} "
                 f"of {speed['repeats']} (teacher: {speed['teacher']}):")
    for size, row in speed["batches"].items():
        parts = [f"{key[:-3]} {value:.3f}" for key, value in row.items() if key.endswith("_ms")]
        if "speedup" in row:
            parts.append(f"speed-up {row['speedup']:.2f}x")
        lines.append(f"  batch {size}: " + ", ".join(parts))
    if "quantized" in result:
        q = result["quantized"]
        lines.append(f"wrote checkpoints/{q['file']}: test acc {q['float_test_acc']:.2f}% float, {q['int8_test_acc']:.2f}% int8 "
                     f"({q['float_bytes']:,} -> {q['int8_bytes']:,} bytes)")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdrun-export", description="Export a run's distilled student (checkpoints/best.pt) to "
                     "ONNX or TorchScript, check it against PyTorch on test samples, time it against the teacher "
                     "with ONNX Runtime on the CPU, and optionally quantize it to int8.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (outputs/runs/<run>)")
    parser.add_argument("--format", choices=sorted(FILES), default="onnx", help="file format (default onnx)")
    parser.add_argument("--quantize", action="store_true", help="also write student.int8.onnx (dynamic int8) and "
                        "compare its test accuracy with the float model's")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads when timing (default 1)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per model and batch size (default 20)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    if args.threads < 1 or args.repeats < 1:
        sys.stderr.write(f"kdrun-export: error: --threads={args.threads} and --repeats={args.repeats} must be >= 1\n")
        return 2
    try:
        result = export(args.run_dir, args.format, args.quantize, args.threads, args.repeats)
    except KdrunError as err:
        sys.stderr.write(f"kdrun-export: error: {err}\n")
        return err.exit_code
    print(describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
