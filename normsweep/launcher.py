"""hydra/launcher=gpu: one process trains a sweep's jobs side by side, up to max_parallel at once, one training
step of each in turn. On CUDA each job has its own stream and replays its step as CUDA graphs, so the jobs' kernels
overlap on the GPU; separate processes cannot do that (the GPU time-slices between them). Without CUDA the same
loop runs eagerly on the CPU."""
from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Optional, Sequence

import torch
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from normsweep import app, progress
from normsweep.job import JobRun

log = logging.getLogger(__name__)


class GpuLauncher(Launcher):
    def __init__(self, max_parallel: int = 6) -> None:
        super().__init__()
        if max_parallel < 1:
            raise ValueError(f"hydra.launcher.max_parallel={max_parallel} must be at least 1")
        self.max_parallel = max_parallel
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # task_function (run.py's main) trains a job to its end; this launcher needs the job before its first step,
        # so it runs the same task's first half, app.prepare, and then drives the jobs itself
        self.config, self.hydra_context = config, hydra_context

    def _prepare(self, idx: int, overrides: Sequence[str]) -> JobReturn:
        """Hydra's own job set-up (folder, .hydra/ snapshot, the job's log file) around app.prepare."""
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        return run_job(hydra_context=self.hydra_context, task_function=app.prepare, config=sweep_config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        how = "each on its own CUDA stream" if torch.cuda.is_available() else \
            "no CUDA GPU here, so eagerly on the CPU, taking turns"
        log.info(f"Launching {len(job_overrides)} jobs in this process, up to {self.max_parallel} at a time, {how}")
        root = logging.getLogger()
        sweep_handlers = list(root.handlers)
        waiting = deque(enumerate(job_overrides, start=initial_job_idx))
        running: list[tuple[int, JobReturn, JobRun, list[logging.Handler]]] = []
        returns: dict[int, JobReturn] = {}
        started: dict[int, float] = {}
        while waiting or running:
            while waiting and len(running) < self.max_parallel:
                idx, overrides = waiting.popleft()
                root.handlers = sweep_handlers
                ret = self._prepare(idx, overrides)
                if ret.status == JobStatus.COMPLETED and isinstance(ret.return_value, JobRun):
                    progress.report(ret.hydra_cfg.hydra, ret.return_value.job_dir, "started")
                    started[idx] = time.time()
                    running.append((idx, ret, ret.return_value, list(root.handlers)))  # the job's log file among them
                else:
                    if ret.status == JobStatus.COMPLETED:
                        job_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir)
                        progress.report(ret.hydra_cfg.hydra, job_dir, progress.SKIPPED[ret.return_value])
                    returns[idx] = ret  # skipped (already completed), or failed before training
            for entry in list(running):
                idx, ret, job, handlers = entry
                root.handlers = handlers  # what the job logs goes to its own log file
                if job.advance():
                    continue
                ret.return_value = job.status
                progress.report(ret.hydra_cfg.hydra, job.job_dir,
                                    f"{job.status} in {progress.duration(time.time() - started[idx])}")
                returns[idx] = ret
                running.remove(entry)
                app.stop_unless_completed(job.job_dir, job.status, job.cfg.fail_fast)
        root.handlers = sweep_handlers
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [returns[idx] for idx in sorted(returns)]
