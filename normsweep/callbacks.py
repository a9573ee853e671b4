"""Hydra callback: when a multirun ends, collect its job folders into the results table and plots, and make
the process exit non-zero when any job did not complete."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class CollectAtEnd(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from normsweep.collect import NoRunsError, collect  # pandas and matplotlib only when needed

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = collect([sweep_dir])
        except NoRunsError as e:
            log.error("no results table: %s", e)
            raise SystemExit(1) from e
        log.info("results table: %s", report.out_dir / "results.md")
        if report.unfinished_jobs:
            log.error("%d job(s) did not complete: see the Status column of %s", report.unfinished_jobs,
                      report.out_dir / "results.md")
            raise SystemExit(1)
