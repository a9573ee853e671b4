"""Where a job runs: its device, the cores and threads of this process, glibc's allocator setting, and which job a
log line belongs to while jobs share a process. No training here. torch is imported where it is used: app.py
reads the cores before a refusal, which must not cost torch's import."""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:
    import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt() parameters, from glibc's malloc.h


def resolve_device(name: str) -> "torch.device":
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is available here: use device=cpu or device=auto")
    return torch.device(name)


def cores_given() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    Why: a step allocates and frees activations of a few MB each; glibc serves blocks that size with mmap and
    returns them with munmap (or trims the heap), so every step page-faults and zero-fills them anew (README,
    Speed). The process then holds on to its peak memory, which for this model is tens of MB. Nothing happens
    without glibc (macOS, Windows, musl's stub).
    """
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_TRIM_THRESHOLD, 2**30)  # trim the heap only when 1 GiB of it is free
        mallopt(M_MMAP_THRESHOLD, 2**28)  # blocks below 256 MiB come from the heap, not from mmap


def set_up_process(threads: int) -> None:
    import torch

    torch.set_num_threads(threads or cores_given())
    keep_freed_memory()


@contextlib.contextmanager
def on_stream(stream: Optional["torch.cuda.Stream"]) -> Iterator[None]:
    """Work queued inside goes to stream (a group's own CUDA stream), or where it would go when stream is None."""
    if stream is None:
        yield
    else:
        import torch

        with torch.cuda.stream(stream):
            yield


# The job folder whose work this process is doing now, while several jobs share it (hydra/launcher=gpu): each job's
# log file takes only the lines logged inside job_scope(its folder).
CURRENT_JOB: contextvars.ContextVar[Optional[Path]] = contextvars.ContextVar("normsweep_current_job", default=None)


@contextlib.contextmanager
def job_scope(job_dir: Optional[Path]) -> Iterator[None]:
    token = CURRENT_JOB.set(job_dir)
    try:
        yield
    finally:
        CURRENT_JOB.reset(token)


class OneJobsLines(logging.Filter):
    """On a job's own log handler: passes the lines logged inside job_scope(job_dir), and no other job's."""

    def __init__(self, job_dir: Path):
        super().__init__()
        self.job_dir = job_dir

    def filter(self, record: logging.LogRecord) -> bool:
        return CURRENT_JOB.get() == self.job_dir


class JobNamingFormatter(logging.Formatter):
    """A console line of a process that trains several jobs (hydra/launcher=gpu) names the job it belongs to, as
    every job's own log lines do: `[bn-l1-bs64-s1] model: ...`."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record)
        job = CURRENT_JOB.get()
        return line if job is None or job.name in record.getMessage() else f"{line} [{job.name}]"
