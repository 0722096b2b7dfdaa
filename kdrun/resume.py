"""Resuming a run from its directory.

A run directory is data, possibly from someone else: its ``config.yaml`` is read as plain
YAML, and every ``_target_`` in it must be one that kdrun's own config groups define, so a
tampered (or foreign) config cannot make kdrun run code it names.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
from collections.abc import Iterator
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from kdrun.errors import ConfigError


@functools.lru_cache(maxsize=1)
def own_targets() -> frozenset[str]:
    """Every ``_target_`` that a YAML file of kdrun's config groups names."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if isinstance(target, str):
                found.add(target)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    root = importlib.resources.files("kdrun.conf")
    for path in Path(str(root)).rglob("*.yaml"):
        walk(yaml.safe_load(path.read_text()))
    return frozenset(found)


def targets_in(node, where: str = "") -> Iterator[tuple[str, object]]:
    """(dotted path, value) of every ``_target_`` in a plain config tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if key == "_target_":
                yield path, value
            else:
                yield from targets_in(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from targets_in(value, f"{where}[{i}]")


def run_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def saved_config(resume: str) -> tuple[DictConfig, Path]:
    """The saved config of the run in ``resume`` (a directory) and the directory, after checking
    that the run can be resumed and that the config names only kdrun's own components.

    ``config.yaml`` keeps the interpolations (schedules re-resolve ``${T}`` and ``${alpha}`` per
    epoch); runs from before it existed resume from ``config_resolved.yaml``."""
    run_dir = Path(os.path.expanduser(resume)).resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"resume={resume}: there is no such directory; give the run directory printed by the stopped run")
    if run_status(run_dir) == "completed" and find_saved(run_dir) is not None:
        raise ConfigError(f"resume={resume}: that run completed; there is nothing to carry on (its files stay as they are)")
    cfg = read_saved(run_dir, f"resume={resume}")
    cfg.resume = str(run_dir)
    return cfg, run_dir


def find_saved(run_dir: Path) -> Path | None:
    return next((path for path in (run_dir / "config.yaml", run_dir / "config_resolved.yaml") if path.is_file()), None)


def read_saved(run_dir: Path, what: str) -> DictConfig:
    """The config saved in ``run_dir``, read as data; refused (``what`` starts the message) when it
    is missing, not YAML, or names a ``_target_`` that none of kdrun's configs define."""
    saved = find_saved(run_dir)
    if saved is None:
        raise ConfigError(f"{what}: not a kdrun run directory (it has no config.yaml)")
    try:
        plain = yaml.safe_load(saved.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{what}: {saved.name} is not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(plain, dict):
        raise ConfigError(f"{what}: {saved.name} does not hold a config")
    allowed = own_targets()
    for path, target in targets_in(plain):
        if target not in allowed:
            raise ConfigError(
                f"{what}: {saved.name} names {path}={target!r}, which none of kdrun's configs define; "
                "kdrun does not run code that a run directory names (was the file edited, or copied from elsewhere?)"
            )
    return OmegaConf.create(plain)
