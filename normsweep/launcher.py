"""What hydra/launcher=gpu does (its plugin, hydra_plugins/normsweep_launcher/gpu_launcher.py, imports this in
launch()): Hydra's own job set-up around the task's prepare half for every job, then the prepared jobs grouped by
shape and trained side by side, each group fused into one model (train.training), and each job's status turned into
Hydra's return value by the task's finish half. A task without those halves runs plainly, one job after another."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import open_dict

from normsweep import progress
from normsweep.job import JobRun
from normsweep.runtime import JobNamingFormatter, OneJobsLines, job_scope, on_stream
from normsweep.train import training

log = logging.getLogger(__name__)


# more(the return of a job that ended) -> overrides of the jobs to start in its place ([] for none): how a search
# refills its slots as trials finish (study.py), where Hydra's launch() takes a fixed batch
Refill = Callable[[JobReturn], list[list[str]]]


def launch(plugin, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
           more: Optional[Refill] = None) -> list[JobReturn]:
    """plugin: the GpuLauncher, with Hydra's config, context and task function, and its own settings. more: called
    with each job's return as it ends, for jobs to start in its place (numbered on from the last job's)."""
    setup_globals()
    configure_log(plugin.config.hydra.hydra_logging, plugin.config.hydra.verbose)
    Path(str(plugin.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    task = plugin.task_function
    prepare, finish = getattr(task, "prepare", None), getattr(task, "finish", None)
    jobs = list(enumerate(job_overrides, start=initial_job_idx))
    try:
        if prepare is None or finish is None:
            log.info(f"Launching {len(jobs)} jobs one after another: {getattr(task, '__name__', task)} is not "
                     "normsweep's task (no prepare and finish halves), so it runs as Hydra's basic launcher runs it")
            returns, numbers = [], Numbers(jobs, more)
            while jobs:
                returns.append(_hydra_job(plugin, *jobs.pop(0), task))
                jobs += numbers.refill(returns[-1])
            return returns
        return Sweep(plugin, prepare, finish, Numbers(jobs, more)).run(jobs)
    finally:
        configure_log(plugin.config.hydra.hydra_logging, plugin.config.hydra.verbose)


def _hydra_job(plugin, idx: int, overrides: Sequence[str], task: Callable) -> JobReturn:
    """Hydra's job set-up (folder, .hydra snapshot, the job's log file) around task, as Hydra's basic launcher does."""
    log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
    sweep_config = plugin.hydra_context.config_loader.load_sweep_config(plugin.config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = idx
        sweep_config.hydra.job.num = idx
    return run_job(hydra_context=plugin.hydra_context, task_function=task, config=sweep_config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


class Numbers:
    """The jobs a refill starts, numbered on from the sweep's last job."""

    def __init__(self, jobs: list[tuple[int, Sequence[str]]], more: Optional[Refill]):
        self.more, self.next = more, max((idx for idx, _ in jobs), default=-1) + 1

    def refill(self, ended: JobReturn) -> list[tuple[int, Sequence[str]]]:
        """(number, overrides) of the jobs to start in place of the one that ended; none without a refill."""
        new = []
        for overrides in self.more(ended) if self.more else []:
            new.append((self.next, overrides))
            self.next += 1
        return new


FUSE_KEYS = ("norm", "batch_size", "epochs", "data", "precision", "device", "threads", "cuda_graphs")


def fuse_key(job: JobRun) -> tuple:
    """Jobs with equal keys can share one fused model: the same norm (and its groups), batch size, epochs, data,
    precision and device. Seed, L1, L2, learning rate, momentum and dropout may differ between them."""
    return tuple(repr(getattr(job.cfg, key)) for key in FUSE_KEYS)


@dataclass
class Group:
    """Jobs trained as one (a fused model, or one job alone), on their own CUDA stream."""

    jobs: list[tuple[JobReturn, JobRun]]
    steps: object = None  # train.training's generator, once started
    stream: Optional[torch.cuda.Stream] = None
    started: float = 0.0  # when it started training (set by Sweep._start): its jobs' "completed in" counts from it


class Sweep:
    def __init__(self, plugin, prepare: Callable, finish: Callable, numbers: Numbers):
        self.plugin, self.prepare, self.finish, self.numbers = plugin, prepare, finish, numbers
        self.returns: dict[int, JobReturn] = {}
        self.waiting: list[Group] = []  # groups prepared, waiting for a free slot (max_parallel)
        self.sweep_handlers: list[logging.Handler] = []
        self.job_handlers: list[logging.Handler] = []

    def run(self, jobs: list[tuple[int, Sequence[str]]]) -> list[JobReturn]:
        plugin = self.plugin
        how = "each group on its own CUDA stream" if torch.cuda.is_available() else \
            "no CUDA GPU here, so on the CPU, taking turns"
        log.info(f"Launching {len(jobs)} jobs in this process, {'fused by shape' if plugin.fuse else 'unfused'}, "
                 f"up to {plugin.max_parallel} groups at a time, {how}")
        self.sweep_handlers = list(logging.getLogger().handlers)
        for handler in self.sweep_handlers:  # the console: each job's lines name it
            handler.setFormatter(JobNamingFormatter(handler.formatter or logging.Formatter()))
        # prepared a window at a time: every prepared job holds its lock (a file) until it ends
        window = plugin.max_parallel * (plugin.max_fused if plugin.fuse else 1)
        for start in range(0, len(jobs), window):
            self.waiting = self._group(self._prepare(jobs[start:start + window]))
            self._train()
        return [self.returns[idx] for idx in sorted(self.returns)]

    def _prepare(self, jobs: list[tuple[int, Sequence[str]]]) -> list[tuple[JobReturn, JobRun]]:
        """The jobs to train, prepared; a job that needs none ends here, and a refill starts others in its place."""
        pending, ready = list(jobs), []
        while pending:
            prepared = self._prepared(*pending.pop(0))
            if isinstance(prepared, tuple):
                ready.append(prepared)
            else:
                pending += self.numbers.refill(prepared)
        return ready

    def _prepared(self, idx: int, overrides: Sequence[str]) -> tuple[JobReturn, JobRun] | JobReturn:
        """The job through Hydra's set-up and the task's prepare half: (its return, the JobRun) to train, or its final
        return when it needs no training (skipped, or failed before training)."""
        root = logging.getLogger()
        root.handlers = list(self.sweep_handlers)
        ret = _hydra_job(self.plugin, idx, overrides, self.prepare)
        if ret.status == JobStatus.COMPLETED and isinstance(ret.return_value, JobRun):
            job = ret.return_value
            # the job's log file takes its own lines only, from here on (Hydra's configure_log made it for the job)
            for handler in root.handlers:
                if isinstance(handler, logging.FileHandler):
                    handler.addFilter(OneJobsLines(job.job_dir))
                    self.job_handlers.append(handler)
            root.handlers = [*self.sweep_handlers, *self.job_handlers]
            return ret, job
        root.handlers = [*self.sweep_handlers, *self.job_handlers]
        if ret.status == JobStatus.COMPLETED:
            hydra_cfg = ret.hydra_cfg.hydra
            progress.report(hydra_cfg, Path(hydra_cfg.runtime.output_dir), progress.SKIPPED[ret.return_value])
            ret.return_value = self.finish(ret.cfg, hydra_cfg, ret.return_value)
        self.returns[idx] = ret
        return ret

    def _group(self, prepared: list) -> list[Group]:
        groups: dict[tuple, list] = {}
        for entry in prepared:
            key = fuse_key(entry[1]) if self.plugin.fuse else (id(entry),)
            groups.setdefault(key, []).append(entry)
        size = self.plugin.max_fused
        return [Group(members[i:i + size]) for members in groups.values() for i in range(0, len(members), size)]

    def _train(self) -> None:
        running: list[Group] = []
        try:
            while self.waiting or running:
                while self.waiting and len(running) < self.plugin.max_parallel:
                    running.append(self._start(self.waiting.pop(0)))
                for group in list(running):
                    with on_stream(group.stream):
                        try:
                            next(group.steps)
                        except StopIteration:
                            running.remove(group)
                            for _, job in group.jobs:
                                if job.status is None:  # never so, unless training() lost a member: say so
                                    job.end("failed", "training ended without telling this job's end", {})
                    self._collect_ended(group)
        finally:  # an interrupt: the jobs still training give up their locks and resume next time
            for group in running + self.waiting:
                for _, job in group.jobs:
                    job.release()

    def _start(self, group: Group) -> Group:
        device = group.jobs[0][1].device
        group.started = time.time()  # not when it was formed: a group may wait for a free slot
        group.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        members = []
        for ret, job in group.jobs:
            with job_scope(job.job_dir):
                progress.report(ret.hydra_cfg.hydra, job.job_dir, "started")
            member = job.member()
            if member is not None:
                members.append(member)
        if members:
            group.steps = training(members, group.jobs[0][1].data, device)
        else:
            group.steps = iter(())
        return group

    def _collect_ended(self, group: Group) -> None:
        """Each job of the group that has ended since the last look: its progress line and Hydra's return value; with
        a refill, the jobs that start in place of those, grouped by shape among themselves (a running group's model
        takes no new lane)."""
        new = []
        for entry in list(group.jobs):
            ret, job = entry
            if job.status is None:
                continue
            group.jobs.remove(entry)
            hydra_cfg = ret.hydra_cfg.hydra
            with job_scope(job.job_dir):
                progress.report(hydra_cfg, job.job_dir,
                                f"{job.status} in {progress.duration(time.time() - group.started)}")
            ret.return_value = self.finish(ret.cfg, hydra_cfg, job.status)
            self.returns[ret.hydra_cfg.hydra.job.num] = ret
            new += self.numbers.refill(ret)
        if new:
            self.waiting += self._group(self._prepare(new))
