"""Tables of paper experiments as kdrun composes them: the published numbers beside each method,
and what each method runs (batch, lr, epochs, the recipe's formula).

    python scripts/experiment_table.py published imagenet_ --methods ce,at,ofd,crd,reviewkd,kd,dkd
    python scripts/experiment_table.py recipes imagenet_ --losses kd,at,dkd,crd
    python scripts/experiment_table.py recipes crd_resnet32x4_resnet8x4 crd_vgg13_vgg8

Nothing is trained: each experiment is composed as ``kdrun experiment=<name> loss=<method>`` composes
it (Hydra, the experiment's per-method settings included) and its recipe is built from the config.
The first lines printed say how the table was made (command, kdrun commit, library versions).
"""

from __future__ import annotations

import argparse
import importlib.resources
import platform
import subprocess
import sys
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kdrun.config import register_resolvers
from kdrun.losses.recipe import build_recipe

CONF = Path(str(importlib.resources.files("kdrun.conf")))
DASH = "–"


def experiments(prefixes: list[str]) -> list[str]:
    names = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    return [name for name in names if any(name.startswith(prefix) for prefix in prefixes)]


def composed(experiment: str, loss: str | None = None):
    overrides = [f"experiment={experiment}", "dataset.root=DATA"] + ([f"loss={loss}"] if loss else [])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return cfg


def published_table(names: list[str], methods: list[str] | None) -> list[str]:
    cfgs = {name: composed(name) for name in names}
    methods = methods or list(dict.fromkeys(m for cfg in cfgs.values() for m in cfg.published.methods))
    rows = [f"| experiment | teacher | student | {' | '.join(methods)} |", "|---|---:|---:|" + "---:|" * len(methods)]
    for name, cfg in cfgs.items():
        published = cfg.published
        values = [published.methods.get(method) for method in methods]
        cells = [f"{value:.2f}" if value is not None else DASH for value in values]
        rows.append(f"| `{name}` | {cfg.teacher.arch} {published.teacher_acc:.2f} | {cfg.student.arch} {published.student_acc:.2f} | "
                    + " | ".join(cells) + " |")
    return rows


def loss_options() -> list[str]:
    return sorted(p.stem for p in (CONF / "loss").glob("*.yaml"))


def recipes_table(names: list[str], losses: list[str]) -> list[str]:
    rows = ["| experiment | method | epochs | batch | lr | recipe |", "|---|---|---:|---:|---:|---|"]
    for name in names:
        for loss in losses:
            cfg = composed(name, loss)
            recipe = build_recipe(OmegaConf.create(OmegaConf.to_container(cfg.loss, resolve=True)))
            rows.append(f"| `{name}` | {loss} | {cfg.epochs} | {cfg.dataset.batch_size} | {cfg.optim.lr:g} | `{recipe}` |")
    return rows


def provenance(argv: list[str]) -> list[str]:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    return [
        f"<!-- made by: python scripts/experiment_table.py {' '.join(argv)} -->",
        f"<!-- kdrun {sha}, Python {platform.python_version()}, torch {torch.__version__}, hydra {hydra.__version__}; "
        "composition only (nothing trained, no threads involved) -->",
    ]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=("published", "recipes"))
    parser.add_argument("experiments", nargs="+", help="experiment names or name prefixes")
    parser.add_argument("--losses", default=None, help="comma-separated loss options (recipes; default: the published methods that exist)")
    parser.add_argument("--methods", default=None, help="comma-separated columns (published; default: every published method)")
    args = parser.parse_args(argv)
    register_resolvers()
    names = experiments(args.experiments)
    if not names:
        raise SystemExit(f"error: no experiment named {', '.join(args.experiments)}*")
    if args.table == "published":
        rows = published_table(names, args.methods.split(",") if args.methods else None)
    else:
        losses = args.losses.split(",") if args.losses else [
            m for m in dict.fromkeys(m for name in names for m in composed(name).published.methods) if m in loss_options()]
        rows = recipes_table(names, losses)
    print("\n".join(provenance(argv) + rows))


if __name__ == "__main__":
    main()
