"""Helpers shared by the test modules: composing configs, running the real command line,
reading a run's files. (Fixtures live in conftest.py.)"""

from __future__ import annotations

import importlib.resources
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from kdrun.config import register_resolvers

CONF_DIR = str(importlib.resources.files("kdrun.conf"))

# The headline's speed-up timed briefly (two rounds): most tests check the machinery, not the
# timing; tests/test_first_hour.py checks the timing at its defaults.
QUICK_SPEED = ["speed.min_rounds=2", "speed.budget_s=0"]

# Small and fast: 2,000 MNIST-1D signals, two epochs, a teacher trained for four. Most tests are
# about the machinery, so they use Hinton's KD alone (the default job's kd_fitnet has its own tests).
FAST = [
    *QUICK_SPEED,
    "dataset.source.num_samples=2000",
    "dataset.batch_size=64",
    "epochs=2",
    "teacher_training.epochs=4",
    "loss=kd",
]
DEFAULT_JOB_FAST = [item for item in FAST if not item.startswith("loss=")]


# The loss zoo (tests/test_loss_zoo.py runs each on the embedded default, CIFAR and ImageNet shapes),
# and the settings that shorten its pre-stages to one epoch.
ZOO_LOSSES = ("ab", "ctkd", "cwd", "fsp", "ft", "kdsvd", "ktaad", "mlkd", "nkd", "nst", "ofd", "pad_l2", "reviewkd", "srd", "sskd")
ZOO_STAGES = {
    "ab": ("ab_init", "loss.ab.init_epochs"), "fsp": ("fsp_init", "loss.fsp.init_epochs"),
    "ft": ("ft_paraphraser", "loss.ft.paraphraser_epochs"), "ktaad": ("ktaad_paraphraser", "loss.ktaad.paraphraser_epochs"),
    "sskd": ("sskd_teacher_head", "loss.sskd.head_epochs"),
}


def make_cfg(*overrides: str) -> DictConfig:
    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*QUICK_SPEED, *overrides])
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def kdrun_cli(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command line, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "kdrun", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def sigterm_when_logged(marker: str, *args: str, cwd, command=(sys.executable, "-m", "kdrun")) -> tuple[int, str]:
    """Run kdrun (or ``command``, e.g. torchrun, which passes the signal on), send SIGTERM once
    ``marker`` shows in its log; return its exit code and the rest of its log."""
    process = subprocess.Popen(
        [*command, *args], cwd=cwd, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    for line in process.stderr:
        if marker in line:
            process.send_signal(signal.SIGTERM)
            break
    rest = process.stderr.read()
    return process.wait(timeout=120), rest


def recipe_state(run_dir: Path) -> dict:
    """The recipe's part of the distiller state in ``checkpoints/last.pt`` (adapters, memories), keyed
    as in the recipe (``terms.<name>....``)."""
    from kdrun.engine import checkpoint

    state = checkpoint.load(Path(run_dir) / "checkpoints" / "last.pt")["distiller"]
    return {key.removeprefix("recipe."): value for key, value in state.items() if key.startswith("recipe.")}


def wandb_records(path: Path) -> list:
    """The records of a W&B ``.wandb`` file, parsed with W&B's own protobuf schema.

    wandb no longer ships a Python reader of the file, so its container is read here: a 7-byte
    header (``:W&B``, magic 0xBEE1, version), then 32 KiB blocks of chunks, each a 7-byte header
    (CRC-32 of type byte and data, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)
    and its data; a block's last bytes, too few for a chunk header, are padding."""
    import struct
    import zlib

    from wandb.proto.wandb_internal_pb2 import Record

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), "not a .wandb file"
    block, position, records, pending = 32768, 7, [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == checksum, f"bad checksum at byte {position}"
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
    return records
