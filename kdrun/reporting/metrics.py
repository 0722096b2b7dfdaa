"""``metrics.jsonl``: one JSON object per line, appended as training goes."""

from __future__ import annotations

import json
import math
import os
import weakref
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kdrun.reporting.trackers import Tracker, scalars


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class TensorBoardSink(Tracker):
    """TensorBoard event files beside metrics.jsonl: every numeric value of a row as a scalar
    tagged ``<model>/<split>/<key>`` at step = epoch (``logger=tensorboard``)."""

    name = "tensorboard"

    def __init__(self, subdir: str = "tensorboard"):
        self.subdir = subdir
        self.writer = None

    def start(self, cfg: DictConfig, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # only when asked for: a slow import

        self.log_dir = Path(run_dir) / self.subdir
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        weakref.finalize(self, self.writer.close)

    def write(self, row: dict[str, Any]) -> None:
        found = scalars(row)
        if found is None:
            return
        epoch, _, values = found
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=epoch)
        self.writer.flush()  # rows come once per epoch; flushing keeps a killed run's curves

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        self.writer.close()


class MetricsLog:
    """Appends rows to ``path``. Under DDP only rank 0 writes the file (and the sink); the
    other ranks keep the same rows in memory (the file's rows at start, then theirs, which
    are the same global values), so code that reads ``rows()`` decides alike on every rank."""

    def __init__(self, path: str | Path | None, sink: Tracker | None = None):
        from kdrun.engine import distributed

        self.path = Path(path) if path is not None else None
        self.sink = sink
        self.memory: list[dict[str, Any]] | None = None
        if not distributed.is_main():
            self.memory, self.sink = self._read(), None

    def write(self, **row: Any) -> None:
        if self.path is None:
            return
        cleaned = {key: _clean(value) for key, value in row.items()}
        if self.memory is not None:
            self.memory.append(cleaned)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(cleaned) + "\n")
        if self.sink is not None:
            self.sink.write(cleaned)

    def rows(self) -> list[dict[str, Any]]:
        return list(self.memory) if self.memory is not None else self._read()

    def _read(self) -> list[dict[str, Any]]:
        if self.path is None or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def drop_after(self, model: str, epoch: int) -> None:
        """On resume, forget rows of ``model`` past the checkpoint's epoch (they will be redone)."""
        rows = self.rows()
        kept = [r for r in rows if not (r.get("model") == model and r.get("epoch", 0) > epoch)]
        if self.memory is not None:
            self.memory = kept
        elif len(kept) != len(rows):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
