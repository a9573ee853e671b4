"""A sweep's progress as its jobs report it, whatever the launcher: `job 3/6 bn-l1-bs64-s1: completed in 3m12s; sweep
50 % after 9m40s, about 9m left`, from the facts the sweeper hands every job."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hydra.types import RunMode
from omegaconf import DictConfig

from normsweep import files

log = logging.getLogger(__name__)

SKIPPED = {files.STATUS_COMPLETED: "skipped, completed already", files.STATUS_RUNNING: "skipped, running elsewhere"}


# The sweeper hands each job its sweep's facts in hydra.job.env_set (Hydra's per-job settings, which reach every
# launcher's jobs): {"jobs": N, "epochs": total, "epochs_before": done before this run, "started": time}.
SWEEP_FACTS = "NORMSWEEP_SWEEP"
SWEEP_FACTS_OVERRIDE = f"++hydra.job.env_set.{SWEEP_FACTS}"  # how the sweeper adds them; never in a job's command
# hydra/sweeper=search hands each trial's job its trial the same way (study.py): its rerun command leaves it out
TRIAL_ENV = "NORMSWEEP_TRIAL"
TRIAL_OVERRIDE = f"++hydra.job.env_set.{TRIAL_ENV}"


def epochs_in(job_dirs: list[Path]) -> int:
    """Epochs finished in these job folders (lines of their metrics.jsonl)."""
    def count(path: Path) -> int:
        try:
            return sum(1 for line in path.read_text().splitlines() if line.strip())
        except (OSError, UnicodeDecodeError):
            return 0
    return sum(count(job_dir / files.METRICS) for job_dir in job_dirs)


def duration(seconds: float) -> str:
    """3m12s, 45s, 1h02m."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def report(hydra_cfg: DictConfig, job_dir: Path, what: str) -> None:
    """One line for a job that starts or ends: `job 3/6 bn-l1-bs64-s1: completed in 3m12s; sweep 50 % after 9m40s,
    about 9m left` (the estimate from the epochs this run has finished so far), whatever the launcher."""
    facts = hydra_cfg.job.get("env_set", {}).get(SWEEP_FACTS)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    if not facts:  # another sweeper (a search): the job's number alone
        log.info("job %d %s: %s", hydra_cfg.job.num + 1, job_dir.name, what)
        return
    facts = json.loads(facts)
    done, elapsed = epochs_in([d for d in job_dir.parent.iterdir() if d.is_dir()]), time.time() - facts["started"]
    sweep = f"sweep {100 * min(done, facts['epochs']) / max(facts['epochs'], 1):.0f} % after {duration(elapsed)}"
    if done > facts["epochs_before"] and done < facts["epochs"]:
        left = elapsed * (facts["epochs"] - done) / (done - facts["epochs_before"])
        sweep += f", about {duration(left)} left"
    log.info("job %d/%d %s: %s; %s", hydra_cfg.job.num + 1, facts["jobs"], job_dir.name, what, sweep)


BAR_SECONDS = 1.0  # how often the sweep's bar looks at its job folders


@contextmanager
def sweep_bar(job_dirs: list[Path], facts: dict) -> Iterator[None]:
    """On a terminal, one bar for the whole sweep while its jobs train, whatever the launcher (they may train in other
    processes: joblib, submitit): epochs finished in its job folders of all its epochs, with the time left from this
    run's rate, redrawn by a thread of the sweeper's process. For eyes only (stderr); the job k/N lines are the record.

    tqdm formats the bar (format_meter), but the drawing is ours: tqdm leaves the cursor after the bar, so every log
    line written to the same terminal by a job (stdout, maybe another process) would start after it; drawn then
    returned to the line's start, a log line overwrites the bar, which is drawn again below it."""
    if not sys.stderr.isatty() or not job_dirs or os.environ.get("TERM") == "dumb":
        yield
        return
    from tqdm import tqdm

    total, before, started, stop = facts["epochs"], min(facts["epochs_before"], facts["epochs"]), time.time(), threading.Event()

    def draw() -> None:
        done = min(epochs_in(job_dirs), total)
        width = min(shutil.get_terminal_size().columns, 100) - 1
        line = tqdm.format_meter(done, total, time.time() - started, ncols=width, initial=before, unit="epoch",
                                 prefix=f"sweep of {facts['jobs']} jobs")
        sys.stderr.write(f"\r{line[:width]}\x1b[K\r")
        sys.stderr.flush()

    def follow() -> None:
        draw()
        while not stop.wait(BAR_SECONDS):
            draw()

    thread = threading.Thread(target=follow, name="sweep-bar", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sys.stderr.write("\x1b[K")  # the bar goes; the last job's line and the table say how it ended
        sys.stderr.flush()
