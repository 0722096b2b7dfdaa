"""How kdrun's log looks on the console and in ``kdrun.log`` (``conf/hydra/job_logging/kdrun.yaml``).

In a terminal the console shows progress bars and one line per finished model; the per-epoch
lines (logger ``kdrun.epochs``) go to ``kdrun.log`` and ``metrics.jsonl`` only, unless
``verbose=true``. Without a terminal (CI, SLURM, a pipe) every line is printed, as in the log.
Errors print as the line itself (``kdrun: error: ...``), without a time stamp in front.
"""

from __future__ import annotations

import logging
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Set by the command line from the config's ``verbose`` switch.
VERBOSE = False


class ConsoleFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("[%(asctime)s] %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.ERROR:
            return record.getMessage()
        return super().format(record)


class FileFormatter(logging.Formatter):
    """The log file's lines, without terminal colour codes (Optuna's, tqdm's)."""

    def __init__(self):
        super().__init__("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return ANSI.sub("", super().format(record))


class EpochFilter(logging.Filter):
    """Keeps per-epoch lines off an interactive console (they are in kdrun.log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "kdrun.epochs" or VERBOSE:
            return True
        return not sys.stderr.isatty()
