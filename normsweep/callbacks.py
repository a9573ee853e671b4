"""Hydra callbacks: a single run checked before its folder is made; when a multirun ends, collect its job folders into the results table and plots, and make
the process exit non-zero when any job did not complete."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from normsweep import files

log = logging.getLogger(__name__)


class CheckFirst(Callback):
    """A single run's checks (app.check) before Hydra makes its folder: bad input leaves nothing behind, not even in a
    folder that exists (hydra.run.dir=.). A sweep's jobs are checked by its sweeper, hydra/sweeper=normsweep."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from normsweep import app  # here: the callback is instantiated for every Hydra run, --help included
        from normsweep.files import DataError

        try:
            app.check(config)
        except (ValueError, DataError) as e:
            app.refuse(e)


class CollectAtEnd(Callback):
    def __init__(self, baseline: Optional[str] = None, margin: float = 0.2) -> None:
        self.baseline = baseline  # the differences table's baseline row; None: the first row
        if not margin > 0:  # at the sweep's start, not after hours of training
            raise ValueError(f"hydra.callbacks.collect.margin={margin} must be > 0 (accuracy points)")
        self.margin = margin  # the equivalence margin of the verdicts

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # The collector runs in a fresh process, not imported here: a sweep can run for hours, and this process
        # already holds the normsweep modules of its start; importing collect.py now could mix those with a
        # newer checkout's files. The CLI prints the table and exits 0 (all completed), 1 (some not) or 2 (none).
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        baseline = [] if self.baseline is None else ["--baseline", self.baseline]
        exit_code = subprocess.call([sys.executable, "-m", "normsweep.collect", str(sweep_dir), *baseline,
                                     "--margin", repr(self.margin)],
                                    cwd=files.CHECKOUT)
        if exit_code == 0:
            log.info("results table: %s", sweep_dir / files.RESULTS_MD)
            return
        if exit_code == 1:  # the collector's own line above says how many and whether some run elsewhere
            log.error("some jobs did not complete: see the Status column of %s", sweep_dir / files.RESULTS_MD)
        elif exit_code == 3:
            log.error("no new results table for %s: the collector's message above says why", sweep_dir)
        else:
            log.error("no results table for %s (collector exit code %d)", sweep_dir, exit_code)
        raise SystemExit(1)
