"""The run folder's file names, run labels and atomic writes: the one place the trainer and the collector share."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from normsweep.norms import NORMS

CHECKOUT = Path(__file__).resolve().parents[1]  # the folder holding this package and run.py

CONFIG = "config.yaml"  # fully resolved config the job ran with
METRICS = "metrics.jsonl"  # one JSON object per finished epoch
SUMMARY = "summary.json"  # written last: its presence means the job ended
CHECKPOINT = "checkpoint.pt"  # state after the last finished epoch, for resume
MISCLASSIFIED = "misclassified.json"  # test images the final model got wrong (pixels, labels)
MISCLASSIFIED_PNG = "misclassified.png"
MISCLASSIFIED_SHOWN = 10  # test images in a job's misclassified grid (2 rows of 5)
MLFLOW_RUN = "mlflow_run.json"  # logger=mlflow: the store and run id of the job's MLflow run, so a resume continues it
TENSORBOARD_DIR = "tensorboard"  # logger=tensorboard: <job>/tensorboard/<run label>, seed <n>/ holds the event files
TEST_CORRECT = "test_correct.json"  # which test images the final model gets right: the collector's paired tests
RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
CURVES_PNG = "curves.png"
BATCH_SIZE_PNG = "batch_size.png"
FACTORS_PNG = "factors.png"  # best test accuracy against reg.l1 / reg.l2 when a sweep searched them
SWEEP_FILES = (RESULTS_MD, RESULTS_CSV, CURVES_PNG, BATCH_SIZE_PNG, FACTORS_PNG)  # what the collector writes

LOCK = ".lock"  # held (flock) by the one process running the job; says who in its content
COLLECT_LOCK = ".collect.lock"  # held by the collector writing the table into a folder
MLFLOW_LOCK = ".mlflow.lock"  # held while a job creates the sweep's MLflow store, experiment and parent run
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_PRUNED = "pruned"  # stopped by a search's pruner (hydra/sweeper=search), on its validation accuracy
STATUS_DIVERGED = "diverged"
STATUS_RUNNING = "running"  # another process holds the job's lock

# Settings that change how a job runs, not what it computes: a rerun differing only in these is the same job
# (job.py), and runs differing only in these (and the seed) share a row of the table (collect.py).
# conf/config.yaml keeps the same keys out of job folder names.
RUNTIME_KEYS = ("fail_fast", "threads", "device", "cuda_graphs", "data.root", "logger", "objective")


def is_runtime_key(key: str) -> bool:
    """A RUNTIME_KEYS entry or a key under one (logger.tracking_uri under logger)."""
    return any(key == k or key.startswith(f"{k}.") for k in RUNTIME_KEYS)

NORM_NAMES = {name: norm.label for name, norm in NORMS.items()}  # the table's row labels, in its row order
REG_SUFFIXES = {"none": "", "l1": " with L1", "l2": " with L2", "l1l2": " with L1 and L2"}


def run_label(norm: str, reg: str) -> str:
    """'BatchNorm with L1' for ('bn', 'l1'): the table's row label, as the reference writes it."""
    return NORM_NAMES.get(norm, str(norm)) + REG_SUFFIXES.get(reg, f" with {reg}")


def read_jsonl(path: Path) -> list[dict]:
    """One dict per non-empty line ([] when the file is absent); ValueError on a line that is not JSON."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


ROW_FACTS = ("epoch", "threads")  # keys of a metrics.jsonl row that are facts about the epoch, not curves to log

JOB_METRICS = ("best_train_acc", "best_test_acc", "best_test_loss", "final_test_acc", "test_acc_at_best_val",
               "final_test_loss", "best_val_acc")  # summarize()'s keys


def summarize(history: list[dict]) -> dict[str, float | None]:
    """The four numbers a job is judged by (JOB_METRICS), from its per-epoch rows (None where no epoch has the
    value)."""
    def values(key: str) -> list[float]:
        return [row[key] for row in history if isinstance(row.get(key), (int, float))]

    train_acc, test_acc, test_loss = values("train_acc"), values("test_acc"), values("test_loss")
    # the test accuracy of the epoch a validation split picks (best val_acc; a tie: the lower val_loss, then the
    # earlier epoch): a number not selected on the test set
    validated = [row for row in history if isinstance(row.get("val_acc"), (int, float))
                 and isinstance(row.get("test_acc"), (int, float))]
    picked = min(validated, key=lambda r: (-r["val_acc"], r.get("val_loss", 0.0), r.get("epoch", 0)), default=None)
    return {"best_train_acc": max(train_acc, default=None), "best_test_acc": max(test_acc, default=None),
            "best_test_loss": min(test_loss, default=None), "final_test_acc": test_acc[-1] if test_acc else None,
            "test_acc_at_best_val": picked["test_acc"] if picked else None,
            "final_test_loss": test_loss[-1] if test_loss else None,
            "best_val_acc": picked["val_acc"] if picked else None}


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{'reg': {'l1': 0.001}} -> {'reg.l1': 0.001}; lists become JSON text so every value is hashable."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temp file in the same folder, then rename: a reader (or a kill -9) never sees half a file."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are for others to read too
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


# write_atomic's temp files end so: mkstemp's 8 random characters, then this mark, which no user's file has by chance
TEMP_SUFFIX = ".normsweep-tmp"


def remove_stale_temp_files(folder: Path, names: tuple[str, ...]) -> None:
    """Temp files that write_atomic made for the files `names` and a kill left behind (.<name>.<8 random
    characters>.normsweep-tmp, regular files only); any other file, a user's .metrics.jsonl.backup.tmp included,
    stays. Call only while no one else writes there."""
    pattern = re.compile(rf"\.({'|'.join(map(re.escape, names))})\.[a-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        if pattern.fullmatch(tmp.name) and tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)


def check_own_file(path: Path) -> None:
    """Raises NotRegularFileError when something other than a regular file sits where normsweep writes one: a folder,
    a symlink (writing through it would change its target), a FIFO or a device. Nothing there is fine."""
    path = Path(path)
    if path.is_symlink():
        raise NotRegularFileError(f"{path} is a symlink where normsweep writes a file: remove it and rerun")
    if path.is_dir():
        raise NotRegularFileError(f"{path} is a folder where normsweep writes a file: move it away and rerun")
    if path.exists() and not path.is_file():
        raise NotRegularFileError(f"{path} is not a regular file where normsweep writes one: remove it and rerun")
    if path.is_file() and path.stat().st_nlink > 1:  # Hydra writes in place: through a hard link, into its twin
        raise NotRegularFileError(f"{path} is a hard link (another name of a file elsewhere) where normsweep writes "
                                  "a file: remove it and rerun")


# How each file the collector writes begins (a PNG carries the collector's name in its Software field): a file of
# that name that begins otherwise is someone else's, and is never replaced
COLLECTOR_MARKS = {RESULTS_MD: b"| Regularization", RESULTS_CSV: b"label,"}
COLLECTOR_PNG_MARK = b"normsweep-collect"


def check_collectors_file(path: Path) -> None:
    """Raises NotRegularFileError unless path is missing or is a file the collector wrote (check_own_file, then its
    first bytes): a user's own results.md or curves.png in a sweep folder is kept, not replaced by a table."""
    path = Path(path)
    check_own_file(path)
    if not path.exists():
        return
    fd = open_regular(path, os.O_RDONLY)
    try:
        head = os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    mark = COLLECTOR_MARKS.get(path.name)
    # a PNG without the mark is someone's, a matplotlib one too (the collector's older plots had none: they are left
    # alone, not drawn over)
    ours = head.startswith(mark) if mark is not None else COLLECTOR_PNG_MARK in head
    if not ours:
        raise NotRegularFileError(f"{path} is not a file the collector wrote, and it writes one of that name there: "
                                  "move it away and rerun")


def remove_created(folder: Path, names: list[str], since: float) -> None:
    """Undo a run that was refused after it made `folder`: remove the files `names` (paths inside folder) and then
    the folders, but only when folder holds nothing else and every one of those files was written since `since`
    (this process's start). A folder that held anything else, a file the run did not write, or a file that
    appeared meanwhile keeps everything: this never deletes what someone else put there."""
    folder = Path(folder)
    wanted = {folder / name for name in names}
    wanted_dirs = {path.parent for path in wanted}  # .hydra/ for .hydra/config.yaml
    found = []
    try:
        for here, dirs, names_here in os.walk(folder):  # stops at the first entry that is not ours
            for path in [Path(here) / name for name in names_here] + [Path(here) / d for d in dirs]:
                if path.is_symlink() or path not in (wanted | wanted_dirs if path.is_dir() else wanted):
                    return
                if path.is_file():
                    if path.stat().st_mtime < since:
                        return
                    found.append(path)
        for path in found:
            path.unlink()
        # deepest first; rmdir refuses a folder that is not empty, so nothing that appeared meanwhile is lost
        for here, _, _ in sorted(os.walk(folder), key=lambda entry: -len(Path(entry[0]).parts)):
            os.rmdir(here)
    except OSError:
        return  # what could not be removed stays: better a leftover than a lost file


class DataError(Exception):
    """One-line, user-facing message naming the problem (file) and the fix: the data step's refusals (data.py)."""


class NotRegularFileError(ValueError):
    """A path where normsweep reads or writes a file of its own is a symlink, a FIFO, a device or a folder."""


def open_regular(path: Path, flags: int) -> int:
    """os.open that never follows a symlink (O_NOFOLLOW) and never blocks on a FIFO (O_NONBLOCK), and refuses
    anything but a regular file: a lock or job file planted as a link must not make us write to (or read) its
    target, e.g. someone's ~/.bashrc. -> the descriptor, in blocking mode."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR):  # O_NOFOLLOW on a symlink; a folder opened for writing
            what = "a symlink" if e.errno == errno.ELOOP else "a folder"
            raise NotRegularFileError(f"{path} is {what} where normsweep keeps a file of its own: move it away "
                                      "and rerun") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFileError(f"{path} is not a regular file where normsweep keeps one: remove it and rerun")
    os.set_blocking(fd, True)
    return fd


def _is_ours(content: bytes) -> bool:
    """Empty (just made), or what FolderLock writes into its file: {"pid": ..., "host": ..., "since": ...}."""
    if not content.strip():
        return True
    try:
        return set(json.loads(content)) == {"pid", "host", "since"}
    except (ValueError, TypeError):
        return False


def check_lock_file(path: Path) -> None:
    """Raises NotRegularFileError unless path is absent or a lock file of normsweep's (never a symlink or a FIFO)."""
    check_own_file(path)
    if Path(path).is_file() and not _is_ours(Path(path).read_bytes()[:4096]):
        raise NotRegularFileError(f"{path} is not a lock of normsweep's: move it away and rerun")


class FolderLock:
    """An exclusive lock on <folder>/.lock for as long as one process works in the folder.

    fcntl.flock rather than a lock-file library: the kernel releases it when the holding process dies, however it
    dies (kill -9 included), so a stale lock never blocks; the file's content (pid, host, since) only names the
    holder. On NFS, Linux maps flock to byte-range locks that the server arbitrates (NFSv4, or v3 with lockd); a
    lock held from a node that crashed is released when the server's lease expires (typically 90 s)."""

    def __init__(self, folder: Path, name: str = LOCK):
        self.path = Path(folder) / name
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> bool:
        fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        if not _is_ours(os.pread(fd, 4096, 0)):  # a file of that name that someone else wrote: keep it
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise NotRegularFileError(f"{self.path} is not a lock of normsweep's: move it away and rerun")
        holder = {"pid": os.getpid(), "host": platform.node(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> str:
        """'pid 123 on host node1 since 2026-11-26T10:00:00+0000', as the holder wrote it."""
        try:
            fd = open_regular(self.path, os.O_RDONLY)
            try:
                who = json.loads(os.pread(fd, 4096, 0))
            finally:
                os.close(fd)
            return f"pid {who['pid']} on host {who['host']} since {who['since']}"
        except (OSError, ValueError, TypeError, KeyError, NotRegularFileError):
            return "another process"


def is_locked(folder: Path) -> bool:
    """True while some process holds <folder>/.lock (never creates the file)."""
    try:
        fd = open_regular(Path(folder) / LOCK, os.O_RDONLY)
    except (OSError, NotRegularFileError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own shared lock
