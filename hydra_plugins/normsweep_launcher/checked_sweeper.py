"""hydra/sweeper=normsweep (run.py's default): Hydra's basic sweeper, which first checks every job of the sweep and
refuses a bad one with one line before any folder is made or any job trains (Hydra's own finds a bad value only when
that job comes up, after the jobs before it trained)."""
from __future__ import annotations

import json
from typing import Any, List

from hydra._internal.core_plugins import basic_sweeper  # the module: the scan lists BasicSweeper once
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import open_dict


class CheckedSweeper(basic_sweeper.BasicSweeper):
    def sweep(self, arguments: List[str]) -> Any:
        from normsweep import app, cli, progress  # here, not at Hydra's plugin scan: app loads torch

        # The sweep folder resolved once, here: Hydra copies this config's resolver cache into every job's config, so
        # that ${now:...} in it means one time; resolved first by a job's check, each would take its own, and a second
        # ticking between them put the checks, the progress and the resume line on a folder Hydra never made
        str(self.config.hydra.sweep.dir)
        # The jobs as BasicSweeper.sweep cuts them (the same three calls), but before it makes the sweep folder
        params = [*self._parse_config(), *arguments]
        overrides = OverridesParser.create(config_loader=self.hydra_context.config_loader).parse_overrides(params)
        jobs = [job for batch in self.split_arguments(overrides, None) for job in batch]
        facts, folders = app.check_sweep(self.hydra_context.config_loader, self.config, jobs)
        # Launchers compose each job's config anew from the sweep's Hydra overrides: one more reaches every job
        with open_dict(self.config):
            self.config.hydra.overrides.hydra.append(f"{progress.SWEEP_FACTS_OVERRIDE}={cli.hydra_quote(json.dumps(facts))}")
        with progress.sweep_bar(folders, facts):  # on a terminal: one bar for the sweep, whatever the launcher
            return super().sweep(arguments)

    def validate_batch_is_legal(self, batch: Any) -> None:
        pass  # app.check_sweep composed and checked every job already
