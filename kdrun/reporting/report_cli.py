"""``kdrun-report``: a sweep's summary.csv, summary.md and plots, or several runs side by side.

The same report is written by a Hydra callback at the end of every multirun
(``conf/hydra/default.yaml``); the command rebuilds it from the job directories
on disk, so sweeps with failed or killed jobs get one too.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kdrun.reporting import trackers
from kdrun.reporting.sweep import collect, comparison_markdown, is_run_dir, read_job, summary_markdown, write_csv

log = logging.getLogger("kdrun.report")

EPILOG = """\
examples:
  kdrun-report outputs/sweeps/2026-01-01_12-00-00_mnist1d_cnn_to_mlp_small
      writes summary.csv, summary.md and PNG plots into the sweep dir and prints the table
  kdrun-report outputs/runs/RUN_A outputs/runs/RUN_B --out compare.md
      prints RUN_A and RUN_B side by side and writes the table to compare.md

A sweep dir is a folder whose subfolders are run dirs; a run dir holds summary.json
(or .hydra/overrides.yaml for a job killed before it wrote one).
"""


class ReportError(Exception):
    """Bad input to kdrun-report: one line, exit status 2."""


def write_report(sweep_dir: str | Path, plots: bool = True) -> Path:
    """summary.csv, summary.md and the plots of a sweep; returns the path of summary.md."""
    sweep_dir = Path(sweep_dir)
    jobs = collect(sweep_dir)
    if not jobs:
        raise ReportError(f"{sweep_dir} holds no kdrun jobs (no subfolder with summary.json or .hydra/overrides.yaml)")
    write_csv(jobs, sweep_dir / "summary.csv")
    markdown = sweep_dir / "summary.md"
    markdown.write_text(summary_markdown(jobs, sweep_dir.name))
    if plots:
        from kdrun.reporting.plots import plot_sweep  # matplotlib only when there is something to draw

        for path in plot_sweep(jobs, sweep_dir):
            log.info("plot: %s", path)
    return markdown


class SweepReport(Callback):
    """Writes the sweep report when a multirun ends; a failure here is a warning, never a crashed sweep.
    With a tracker (``logger=mlflow|wandb``) the sweep also gets its parent run or group, opened when
    the multirun starts (a tracker that cannot start refuses the sweep) and given the report at the end."""

    def __init__(self, plots: bool = True) -> None:
        self.plots = plots

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from kdrun.errors import ConfigError
        from kdrun.preflight import refuse

        try:
            tracker = trackers.build(config.get("logger"))
            if tracker is not None:
                tracker.start_sweep(config, Path(str(config.hydra.sweep.dir)).resolve())
        except ConfigError as err:
            refuse(err)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            markdown = write_report(config.hydra.sweep.dir, plots=self.plots)
            incomplete = [job for job in collect(config.hydra.sweep.dir) if job.status != "completed"]
        except Exception as err:  # noqa: BLE001 - the sweep's results matter more than its report
            log.warning("sweep report failed (%s: %s); rebuild it with: kdrun-report %s",
                        type(err).__name__, err, config.hydra.sweep.dir, exc_info=log.isEnabledFor(logging.DEBUG))
            return
        log.info("Sweep report:\n%s", markdown.read_text())
        log.info("Sweep table: %s (also summary.csv and plots in that folder)", markdown)
        self.track(config, markdown, "failed" if incomplete else "completed")
        if incomplete:
            from kdrun import cli

            # Jobs that ran in other processes (joblib, submitit) could not record their failure
            # for kdrun's exit status; their summary.json did.
            if not cli._failures:
                cli._failures.append(1)

    @staticmethod
    def track(config: DictConfig, markdown: Path, status: str) -> None:
        """The report's files (tables and plots) to the sweep's parent run or group."""
        sweep_dir = markdown.parent.resolve()
        try:
            tracker = trackers.build(config.get("logger"))
            if tracker is not None:
                files = [markdown, markdown.with_suffix(".csv"), *sorted(sweep_dir.glob("*.png"))]
                tracker.finish_sweep(sweep_dir, [path for path in files if path.is_file()], status)
        except Exception as err:  # noqa: BLE001 - as for the report: a warning, never a crashed sweep
            log.warning("logger=%s: the sweep report was not recorded (%s: %s)", config.logger.get("name"),
                        type(err).__name__, err)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kdrun-report",
        description="Report on kdrun results. Given a sweep dir: write summary.csv, summary.md (mean ± std over "
        "seeds when seed is swept) and PNG plots (accuracy vs T, T x alpha heatmap, learning curves) into it and "
        "print the table. Given run dirs: print them side by side.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="a sweep dir, or one or more run dirs")
    parser.add_argument("--out", type=Path, help="also write the run comparison table to this markdown file")
    parser.add_argument("--no-plots", action="store_true", help="sweep reports: tables only, no PNG files")
    return parser


def _is_sweep_dir(path: Path) -> bool:
    """Hydra's multirun.yaml is there, or a job in it says it ran in a multirun (the Optuna sweeper
    writes no multirun.yaml)."""
    if (path / "multirun.yaml").is_file():
        return True
    for child in path.iterdir():
        hydra_file = child / ".hydra" / "hydra.yaml"
        if hydra_file.is_file() and "mode: MULTIRUN" in hydra_file.read_text():
            return True
    return False


def report(dirs: list[Path], out: Path | None = None, plots: bool = True) -> str:
    """What kdrun-report prints; raises ReportError on bad input."""
    for path in dirs:
        if not path.is_dir():
            raise ReportError(f"no such directory: {path}")
    sweeps = [path for path in dirs if not is_run_dir(path) and _is_sweep_dir(path)]
    runs = [path for path in dirs if is_run_dir(path)]
    for path in dirs:
        if path in sweeps or path in runs:
            continue
        if any(child.is_dir() and is_run_dir(child) for child in path.iterdir()):
            raise ReportError(f"{path} is not a sweep dir (no multirun.yaml); to compare the runs in it, name them: "
                              f"kdrun-report {path}/*")
        raise ReportError(f"no kdrun runs in {path} (a run dir holds summary.json; a sweep dir holds run dirs)")
    if sweeps and runs:
        raise ReportError("give either one or more sweep dirs, or run dirs to compare, not both")
    if out and not runs:
        raise ReportError("--out is for run comparisons; a sweep's tables are written into the sweep dir")
    printed = []
    for sweep in sweeps:
        markdown = write_report(sweep, plots=plots)
        printed.append(markdown.read_text() + f"\nwritten: {markdown}, {markdown.with_suffix('.csv')}\n")
    if runs:
        table = comparison_markdown([read_job(path) for path in runs])
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(table)
        printed.append(table + (f"\nwritten: {out}\n" if out else ""))
    return "\n".join(printed)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        print(report(args.dirs, args.out, plots=not args.no_plots), end="")
    except (ReportError, OSError) as err:
        sys.stderr.write(f"kdrun-report: error: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
