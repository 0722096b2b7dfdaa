"""``metrics.jsonl``: one JSON object per line, appended as training goes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None

    def write(self, **row: Any) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({key: _clean(value) for key, value in row.items()}) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        if self.path is None or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def drop_after(self, model: str, epoch: int) -> None:
        """On resume, forget rows of ``model`` past the checkpoint's epoch (they will be redone)."""
        rows = self.rows()
        kept = [r for r in rows if not (r.get("model") == model and r.get("epoch", 0) > epoch)]
        if len(kept) != len(rows):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
