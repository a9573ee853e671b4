"""One job's life in its folder: skip it when it already completed with the same config, resume it from its
checkpoint when it was interrupted, refuse (never replace) a folder that holds another config's results; always end
with summary.json."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from normsweep import files, loggers, progress, tracking
from normsweep.config import Config, schema_defaults, validate
from normsweep.data import Dataset, check_root, load_data, split
from normsweep.runtime import job_scope, resolve_device
from normsweep.train import Member, drain, training

log = logging.getLogger(__name__)

RESULT_FILES = (files.SUMMARY, files.METRICS, files.CHECKPOINT, files.MISCLASSIFIED, files.MISCLASSIFIED_PNG,
                files.MLFLOW_RUN, files.TEST_CORRECT)


def git_state() -> dict:
    """Commit and dirty flag of the code that ran, or nulls when it does not run from a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=files.CHECKOUT, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    try:
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


# Read once, when this process loads the code: a long sweep's job processes keep running the code they loaded
# even if the checkout moves on, and the summary must name the commit that actually ran.
CODE_VERSION = git_state()


def same_job(old: dict | None, new: dict) -> bool:
    """Same settings, runtime keys aside. A key the schema gained since the job ran counts as its default there (the
    job ran as that default does), so a new option at its default does not make it another job and one set otherwise
    does; a key the schema lost (a removed option that did nothing) is not compared."""
    if not isinstance(old, dict):
        return False
    old_flat, new_flat = files.flatten(old), files.flatten(new)
    if not all(key in old_flat for key in IDENTITY_KEYS):  # not a job's config at all (a file of the user's)
        return False
    return not _differing(old_flat, new_flat)


def _differing(old_flat: dict, new_flat: dict) -> list[tuple[str, object, object]]:
    """(key, old value, new value) of the non-runtime settings that differ, in key order, a key the old config lacks
    counting as its schema default."""
    old_flat = {**schema_defaults(), **old_flat}
    return sorted((k, old_flat[k], new_flat[k]) for k in old_flat.keys() & new_flat.keys()
                  if not files.is_runtime_key(k) and old_flat[k] != new_flat[k])


# keys every job's config.yaml has held since the first release: a config.yaml without them is nobody's job
IDENTITY_KEYS = ("norm.name", "reg.name", "batch_size", "epochs", "seed")


def _read_previous(path: Path, parse: Callable[[str], object]) -> dict | None:
    """A file an earlier run left in the job folder, or None when it is missing or unreadable (a damaged file
    means the earlier results cannot be trusted: the job runs again instead of stopping the sweep)."""
    if not path.exists():
        return None
    try:
        content = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as e:
        log.warning("%s is unreadable (%s): ignoring it", path, e)
        return None
    return content if isinstance(content, dict) else None


def run_job(cfg: Config, resolved: dict, job_dir: Path, command: str | None = None,
            sweep_dir: Path | None = None) -> str:
    """Runs one job into job_dir and returns its status. Bad settings or data raise (ValueError, DataError)
    before any file is written; a failure during training is recorded in summary.json, not raised.
    `command` is the command line recorded in summary.json (default: this process's)."""
    job = prepare_job(cfg, resolved, job_dir, command, sweep_dir)
    return job if isinstance(job, str) else job.run()


def check_job(cfg: Config, resolved: dict, job_dir: Path, sweep_dir: Path | None = None) -> tuple[Config, dict]:
    """Every refusal that can be told before anything is written (a sweep runs it for all its jobs before the first
    one trains): bad values, an unusable device, data.root or MLflow store, something other than a file where the
    job writes one, and a folder holding another config's results, which are never replaced.
    -> (cfg, resolved), with logger.tracking_uri filled in when it is null. Raises ValueError or DataError."""
    validate(cfg)
    resolve_device(cfg.device)
    check_root(cfg.data.name, cfg.data.root)
    if cfg.data.val_size:  # the split's own refusals (too few images left, a class not held out), before training
        split(load_data(cfg.data.name, cfg.data.root, cfg.data.train_limit, cfg.data.test_limit),
              cfg.data.val_size, cfg.data.split_seed, cfg.batch_size)
    if cfg.logger.name == "mlflow":
        if cfg.logger.tracking_uri is None:  # the local store, named in the job's config.yaml too
            uri = tracking.default_uri(sweep_dir or job_dir.parent)
            cfg = dataclasses.replace(cfg, logger=dataclasses.replace(cfg.logger, tracking_uri=uri))
            resolved = {**resolved, "logger": {**resolved["logger"], "tracking_uri": uri}}
        tracking.check_reachable(cfg.logger.tracking_uri)
    for name in (files.CONFIG, *RESULT_FILES):
        files.check_own_file(job_dir / name)
    files.check_lock_file(job_dir / files.LOCK)
    _refuse_other_results(job_dir, resolved)
    return cfg, resolved


def _refuse_other_results(job_dir: Path, resolved: dict) -> None:
    """A completed or interrupted run of another config (or of one that cannot be read) is never replaced."""
    # config.yaml too: written just before training starts, it is all a job killed in its first epoch leaves, and
    # a file of that name may be the user's own
    results = [name for name in (files.CONFIG, *RESULT_FILES) if (job_dir / name).exists()]
    if results and not same_job(_read_previous(job_dir / files.CONFIG, yaml.safe_load), resolved):
        raise ValueError(f"{job_dir} holds the results of {_whose(job_dir / files.CONFIG, resolved)}, which are "
                         "never replaced: move that folder aside (or pick another hydra.run.dir / hydra.sweep.dir) "
                         "to run this config there")


def _whose(config_path: Path, resolved: dict) -> str:
    """'another config (dropout=0.2 there, 0.03 here)', or why the folder's config cannot be compared."""
    old = _read_previous(config_path, yaml.safe_load)
    if old is None and not config_path.exists():
        return f"a run whose {config_path.name} is missing"
    if old is None or not all(key in files.flatten(old) for key in IDENTITY_KEYS):
        return f"a run whose {config_path.name} is unreadable or not a normsweep job's config"
    differ = [f"{k}={there} there, {here} here"
              for k, there, here in _differing(files.flatten(old), files.flatten(resolved))]
    return f"another config ({'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''})"


def prepare_job(cfg: Config, resolved: dict, job_dir: Path, command: str | None = None,
                sweep_dir: Path | None = None) -> "JobRun | str":
    """Everything before the first training step: checks, the job's lock, the skip/resume decision, the
    config file. -> the job, ready to train and holding its lock, or its status when it already completed
    (or is running in another process, which holds the lock). `sweep_dir`: the folder of the job's sweep
    (default: the job folder's parent), where logger=mlflow keeps its store and parent run."""
    cfg, resolved = check_job(cfg, resolved, job_dir, sweep_dir)
    device = resolve_device(cfg.device)
    sweep_dir = sweep_dir or job_dir.parent
    lock = files.FolderLock(job_dir)
    if not lock.acquire():
        log.warning("skipping %s: it is running in %s", job_dir.name, lock.holder())
        return files.STATUS_RUNNING
    try:
        files.remove_stale_temp_files(job_dir, (files.CONFIG, *RESULT_FILES))  # the lock: no one else writes here
        _refuse_other_results(job_dir, resolved)  # again: another process may have run a job here since the check
        if _completed_with_same_config(job_dir, resolved):
            log.info("skipping %s: already completed with the same config", job_dir.name)
            lock.release()
            return files.STATUS_COMPLETED
        data = split(load_data(cfg.data.name, cfg.data.root, cfg.data.train_limit, cfg.data.test_limit),
                     cfg.data.val_size, cfg.data.split_seed, cfg.batch_size)
        _start_or_resume(job_dir, resolved)
        return JobRun(cfg, job_dir, data, device, command or shlex.join(sys.argv), lock, sweep_dir)
    except BaseException:
        lock.release()
        raise


def _completed_with_same_config(job_dir: Path, resolved: dict) -> bool:
    if not same_job(_read_previous(job_dir / files.CONFIG, yaml.safe_load), resolved):
        return False
    previous = _read_previous(job_dir / files.SUMMARY, json.loads) or {}
    return previous.get("status") == files.STATUS_COMPLETED


def _start_or_resume(job_dir: Path, resolved: dict) -> None:
    """Keeps the results of an interrupted run of the same config (training resumes from its checkpoint; check_job
    refused the folder if they were another config's). Then writes the config the job runs with."""
    (job_dir / files.SUMMARY).unlink(missing_ok=True)  # a rerun of a failed job: its new summary replaces the old
    files.write_atomic(job_dir / files.CONFIG, yaml.safe_dump(resolved, sort_keys=False))


class JobRun:
    """A prepared job, holding its lock: member() is what training() trains, and its end writes summary.json and
    releases the lock. run() trains it alone; hydra/launcher=gpu trains several, fused where they can be. A failure
    during training ends the job with status failed or diverged, recorded in the summary, and is not raised."""

    def __init__(self, cfg: Config, job_dir: Path, data: Dataset, device: torch.device, command: str,
                 lock: files.FolderLock, sweep_dir: Path):
        self.cfg, self.job_dir, self.device, self.command, self.lock = cfg, job_dir, device, command, lock
        self.data, self.sweep_dir = data, sweep_dir
        self.status: str | None = None  # set when the job has ended
        self.started = time.time()
        self.logger = None
        # a search's trial (hydra/sweeper=search), read now: Hydra sets a job's environment while it is prepared
        self.trial = os.environ.get(progress.TRIAL_ENV)
        self.in_sweep = progress.SWEEP_FACTS in os.environ  # its sweeper draws the bar: none per epoch here

    def run(self) -> str:
        """Train to the end, alone; -> the status."""
        try:
            member = self.member()
            if member is not None:
                drain(training([member], self.data, self.device))
        finally:
            self.release()
        return self.status

    def member(self) -> Member | None:
        """The job as training() takes it, its tracker opened; None when that failed (the job has then ended)."""
        self.started = time.time()
        with job_scope(self.job_dir):
            try:
                self.logger = self._open_logger()
            except Exception as e:  # recorded as the job's failure, as any failure in training
                log.exception("%s failed", self.job_dir.name)
                self.end(files.STATUS_FAILED, f"{type(e).__name__}: {e}", {})
                return None
        prune = None
        if self.trial:
            from normsweep import trial

            prune = trial.reporter(json.loads(self.trial))
        return Member(self.cfg, self.job_dir, self.end, self.logger, prune, epoch_bar=not self.in_sweep)

    def release(self) -> None:
        """Give up the lock (an interrupt: no summary, the job resumes next time). Done already when it ended."""
        self.lock.release()

    def end(self, status: str, error: str | None, extra: dict) -> None:
        """summary.json, the tracker's end, then the lock: the job is over."""
        with job_scope(self.job_dir):
            try:
                self._summarize(status, error, extra)
            finally:
                self.status = status
                self.release()

    def _summarize(self, status: str, error: str | None, extra: dict) -> None:
        history = files.read_jsonl(self.job_dir / files.METRICS)
        summary = {
            "status": status,
            "error": error,
            **files.summarize(history),
            "epochs_done": len(history),
            "params": extra.get("params"),
            "seconds": sum(r["train_seconds"] + r["test_seconds"] for r in history),
            "wall_seconds_this_invocation": time.time() - self.started,
            "device": str(self.device),
            "threads": extra.get("threads"),
            # more than one count: resumed under another thread count, so not bit-identical to an uninterrupted run
            "threads_per_epoch": sorted({r["threads"] for r in history if isinstance(r.get("threads"), int)}),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "host": platform.node(),
            "command": self.command,  # quoted: `python <command>` in a shell runs it again
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **CODE_VERSION,
        }
        files.write_json(self.job_dir / files.SUMMARY, summary)
        if self.logger is not None:
            try:
                self.logger.finish(status, history)
            except Exception as e:  # the job's own files are complete; say what its logger lacks
                log.error("%s: its %s run was not finished (%s: %s)", self.job_dir.name, self.cfg.logger.name,
                          type(e).__name__, e)

    def _open_logger(self):
        """logger=...'s logger for this job (loggers.py), with the settings its config.yaml holds; None for none."""
        resolved = yaml.safe_load((self.job_dir / files.CONFIG).read_text())
        return loggers.open_logger(str(self.cfg.logger.name), self.job_dir, resolved, self.cfg.logger.tracking_uri,
                                   self.sweep_dir, {"normsweep.git_commit": str(CODE_VERSION["git_commit"]),
                                                    "normsweep.command": self.command[:5000]})
