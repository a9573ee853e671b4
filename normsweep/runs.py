"""The run folders as the collector reads them: found without following links, each file read within a size limit
and checked value by value, so that a damaged or hostile folder marks its own job and nothing else. No torch."""
from __future__ import annotations

import base64
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from normsweep import files

log = logging.getLogger(__name__)

VALUE_NAMES = files.JOB_METRICS  # what a job is judged by, one number each
STATUS_UNFINISHED = "unfinished"  # no summary.json and no process holding its lock: killed
STATUS_UNREADABLE = "unreadable"  # a file of the job is corrupt: "unreadable: <file>"
# The most a job file may hold before it is refused unread: far above what the trainer writes, far below what
# would stall the collector.
SMALL_FILE_LIMIT = 1 << 20  # config.yaml, .hydra/config.yaml, summary.json: a few KB in practice
LARGE_FILE_LIMIT = 64 << 20  # metrics.jsonl (~200 bytes an epoch), misclassified.json (~40 KB)
EPOCH_NUMBERS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "train_seconds", "test_seconds",
                 "val_loss", "val_acc")


@dataclass
class Misclassified:
    """misclassified.json, checked: what the job's grid shows."""
    label: str | None  # the grid's title; None: the row label
    panels: list[tuple[str, str, np.ndarray]]  # (actual class, predicted class, image (H, W[, 3]) uint8), the first few


@dataclass
class Job:
    path: Path
    config: dict[str, object]  # flattened: {"norm.name": "bn", "optim.lr": 0.01, ...}
    status: str
    epochs_done: int
    values: dict[str, float]  # VALUE_NAMES -> number, nan when unknown
    metrics: pd.DataFrame  # one row per finished epoch, columns as in metrics.jsonl
    misclassified: Misclassified | None = None  # None: no misclassified.json, or an unreadable one
    # the distinct CPU thread counts its epochs ran under, sorted; more than one: resumed under another count, so
    # not bit-identical to an uninterrupted run. Empty: not recorded (folders older than the count)
    threads: list[int] = field(default_factory=list)
    correct: np.ndarray | None = None  # bool [test images]: which its final model gets right (test_correct.json)


def warn(problems: list[str], message: str) -> None:
    """Log a problem as one warning line and keep it for the report."""
    message = " ".join(message.split())  # one line, even for YAML's multi-line parser errors
    log.warning("%s", message)
    problems.append(message)


def find_job_dirs(dirs: list[Path]) -> list[Path]:
    """Every folder under dirs holding a run file; hidden folders (Hydra's .hydra) are never jobs, and a symlinked
    folder is never entered (it may point anywhere, or back up the tree)."""
    found = {}
    for root in dirs:
        for here, subdirs, names in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and not os.path.islink(Path(here, d)))
            if {files.CONFIG, files.SUMMARY, files.METRICS} & set(names):
                found[Path(here).resolve()] = None
    return list(found)


def read_bounded(path: Path, limit: int) -> str:
    """The text of a job file. OSError, before reading a byte, for a symbolic link (in the file's name or its folder's:
    a job file is never followed elsewhere), for anything but a regular file (a FIFO or device would block or never
    end) and for a file over `limit` bytes."""
    path = Path(path)
    for name in (path, path.parent):
        if name.is_symlink():
            raise OSError(f"{name.name} is a symbolic link: not followed")
    too_big = f"{path.name} holds over {limit} bytes, more than a job writes"
    # O_NOFOLLOW again at the open, for a link made since; O_NONBLOCK: opening a FIFO must not wait for a writer
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    finally:
        os.close(folder)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path.name} is not a regular file")
        if info.st_size > limit:
            raise OSError(too_big)
    except OSError:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)  # +1: a file grown past the limit since fstat is refused too
    if len(data) > limit:
        raise OSError(too_big)
    return data.decode("utf-8")


def _load_yaml(text: str) -> object:
    """safe_load without aliases: a few hundred bytes of nested aliases expand to billions of values (and one that
    refers to itself never ends), while OmegaConf never writes one."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~7x faster, and it caps the nesting depth
    for event in yaml.parse(text, Loader=loader):  # events only: nothing is built or expanded yet
        if isinstance(event, yaml.AliasEvent):
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: aliases (*name) are not allowed")
    return yaml.load(text, Loader=loader)  # a safe loader


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON's true is no number


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_config(path: Path) -> dict[str, object]:
    """config.yaml (or Hydra's snapshot of it), flattened; TypeError or KeyError for one no row can be made of."""
    loaded = _load_yaml(read_bounded(path, SMALL_FILE_LIMIT))
    if not isinstance(loaded, dict):
        raise TypeError(f"holds a {type(loaded).__name__}, not a mapping")
    config = files.flatten(loaded)
    for key, value in config.items():  # the row keys and the run's identity hash these, the cells print them
        if value is not None and not isinstance(value, (str, int, float)):
            raise TypeError(f"{key} is a {type(value).__name__}")
    if not isinstance(config.get("norm.name"), str) or not isinstance(config.get("reg.name"), str):
        raise KeyError("norm.name or reg.name missing")  # without them the run has no label
    for key in ("batch_size", "reg.l1", "reg.l2"):
        if config.get(key) is not None and not _is_number(config[key]):
            raise TypeError(f"{key} is a {type(config[key]).__name__}, not a number")
    return config


def _read_metrics(path: Path) -> list[dict]:
    text = read_bounded(path, LARGE_FILE_LIMIT)
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise TypeError(f"line {number} is not a JSON object")
        for key in EPOCH_NUMBERS:
            if record.get(key) is not None and not _is_number(record[key]):
                raise TypeError(f"line {number}: {key} is a {type(record[key]).__name__}, not a number")
        if "epoch" in record and not (_is_count(record["epoch"]) and record["epoch"] >= 1):
            raise ValueError(f"line {number}: epoch is not a whole number from 1")
        if record.get("threads") is not None and not (_is_count(record["threads"]) and record["threads"] >= 1):
            raise ValueError(f"line {number}: threads is not a whole number from 1")
    return records


def _read_summary(path: Path) -> tuple[str, int | None, dict[str, float], list[int] | None]:
    """-> (status, epochs_done or None, VALUE_NAMES -> number or nan, threads_per_epoch or None)."""
    summary = json.loads(read_bounded(path, SMALL_FILE_LIMIT))
    if not isinstance(summary, dict) or not isinstance(summary.get("status"), str):
        raise TypeError("not a JSON object with a status string")
    for name in VALUE_NAMES:
        if summary.get(name) is not None and not _is_number(summary[name]):
            raise TypeError(f"{name} is a {type(summary[name]).__name__}, not a number")
    epochs_done = summary.get("epochs_done")
    if epochs_done is not None and not _is_count(epochs_done):
        raise TypeError("epochs_done is not a whole number")
    threads = summary.get("threads_per_epoch")
    if threads is not None and not (isinstance(threads, list) and all(_is_count(t) and t >= 1 for t in threads)):
        raise TypeError("threads_per_epoch is not a list of whole numbers from 1")
    values = {name: np.nan if summary.get(name) is None else float(summary[name]) for name in VALUE_NAMES}
    return summary["status"], epochs_done, values, threads


def read_misclassified(path: Path) -> Misclassified:
    """misclassified.json as the trainer writes it ({"class_names": [...], "items": [{"actual", "predicted",
    "image"}, ...]}); TypeError or ValueError for any value out of place, so that drawing it cannot fail."""
    data = json.loads(read_bounded(path, LARGE_FILE_LIMIT))
    if not isinstance(data, dict) or not isinstance(data.get("items"), list):
        raise TypeError("not a JSON object with a list of items")
    class_names = data.get("class_names") or [str(i) for i in range(10)]
    if not isinstance(class_names, list) or not all(isinstance(name, str) for name in class_names):
        raise TypeError("class_names is not a list of strings")
    if data.get("label") is not None and not isinstance(data["label"], str):
        raise TypeError("label is not a string")
    panels = []
    for number, item in enumerate(data["items"]):
        if not isinstance(item, dict):
            raise TypeError(f"item {number} is not a JSON object")
        for key in ("actual", "predicted"):
            if not (_is_count(item.get(key)) and item[key] < len(class_names)):
                raise ValueError(f"item {number}: {key} is not a class index below {len(class_names)}")
        image = np.asarray(item.get("image"))  # ragged lists: ValueError
        shaped = image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)  # gray [H, W], or colour [H, W, 3]
        if not shaped or image.size == 0 or image.dtype.kind not in "iu" or image.min() < 0 or image.max() > 255:
            raise ValueError(f"item {number}: image is not an [H, W] or [H, W, 3] array of whole numbers 0-255")
        if len(panels) < files.MISCLASSIFIED_SHOWN:
            panels.append((class_names[item["actual"]], class_names[item["predicted"]], image.astype(np.uint8)))
    return Misclassified(data.get("label"), panels)


def read_job(job_dir: Path, problems: list[str]) -> Job | None:
    """One run folder. A file that cannot be read, decoded or understood marks the job `unreadable: <file>`; its
    row comes from Hydra's snapshot (.hydra/config.yaml) when config.yaml is the bad file. None when neither config
    can be read, since then the job has no row to go in."""
    bad: list[str] = []

    def unreadable(name: str, error: Exception) -> None:
        warn(problems, f"{job_dir / name}: unreadable ({type(error).__name__}: {error})")
        bad.append(name)

    def optional(name: str, reader):
        """reader(path) of a job file, or None when it is absent or (marked unreadable) damaged. A dangling symlink
        counts as present: it is damage to report, not an absent file."""
        if not os.path.lexists(job_dir / name):
            return None
        try:
            return reader(job_dir / name)
        except Exception as error:
            unreadable(name, error)
            return None

    try:
        config = _read_config(job_dir / files.CONFIG)
    except Exception as error:  # any damage: OSError, UnicodeDecodeError, YAML, wrong types
        unreadable(files.CONFIG, error)
        try:
            config = _read_config(job_dir / ".hydra" / files.CONFIG)
        except Exception:
            warn(problems, f"{job_dir}: no readable config; job left out of the table")
            return None
    records: list[dict] = optional(files.METRICS, _read_metrics) or []
    metrics = pd.DataFrame(records)
    if "epoch" not in metrics:
        metrics["epoch"] = range(1, len(metrics) + 1)
    summary = optional(files.SUMMARY, _read_summary)
    threads = None
    if summary is None:  # killed, still running, or unreadable summary: whatever the epochs say
        values = {k: np.nan if v is None else float(v) for k, v in files.summarize(records).items()}
        epochs_done = len(metrics)
        status = files.STATUS_RUNNING if files.is_locked(job_dir) else STATUS_UNFINISHED
    else:
        status, epochs_done, summarized, threads = summary
        epochs_done = epochs_done or len(metrics)
        # a summary older than a value (test_acc_at_best_val, final_test_loss): that value from its epochs
        from_epochs = files.summarize(records)
        values = {k: float(from_epochs[k]) if np.isnan(v) and from_epochs[k] is not None else v
                  for k, v in summarized.items()}
    if threads is None:  # a summary older than threads_per_epoch, or none: the epochs' own counts
        threads = [r["threads"] for r in records if r.get("threads") is not None]
    misclassified = optional(files.MISCLASSIFIED, read_misclassified)
    correct = optional(files.TEST_CORRECT, read_test_correct)
    if bad:
        status = f"{STATUS_UNREADABLE}: {', '.join(bad)}"
    return Job(job_dir, config, status, epochs_done, values, metrics, misclassified, sorted(set(threads)), correct)


def read_test_correct(path: Path) -> np.ndarray:
    """test_correct.json (train.write_test_correct) -> bool [images], checked against its own count."""
    data = json.loads(read_bounded(path, SMALL_FILE_LIMIT))
    if not isinstance(data, dict) or not _is_count(data.get("images")) or not isinstance(data.get("bits"), str):
        raise TypeError("not a JSON object with images and bits")
    bits = np.frombuffer(base64.b64decode(data["bits"], validate=True), dtype=np.uint8)
    correct = np.unpackbits(bits)[:data["images"]].astype(bool)
    if len(correct) != data["images"] or int(correct.sum()) != data.get("correct"):
        raise ValueError("its bits do not hold its images and correct counts")
    return correct


def _identity(job: Job) -> str:
    """What makes a run: its resolved config with the seed, without the settings that only say how it ran."""
    return json.dumps(sorted((k, v) for k, v in job.config.items() if not files.is_runtime_key(k)))


def drop_duplicates(jobs: list[Job], problems: list[str]) -> list[Job]:
    """One job per identity: a sweep collected with its copy (collect A A-copy) has the seeds it had, not twice as
    many, and no p-value from one run seen twice. Of the copies, a completed one with the most epochs stays."""
    copies: dict[str, list[Job]] = {}
    for job in jobs:
        copies.setdefault(_identity(job), []).append(job)
    kept, seen_twice = [], []
    for group in copies.values():
        best = max(group, key=lambda job: (job.status == files.STATUS_COMPLETED,
                                           not job.status.startswith(STATUS_UNREADABLE), job.epochs_done))
        kept.append(best)  # max keeps the first of equals: the copy in the first folder given
        if len(group) > 1:
            seen_twice.append(f"{best.path} = {', '.join(str(job.path) for job in group if job is not best)}")
    if seen_twice:
        warn(problems, f"duplicate runs counted once: {'; '.join(seen_twice)}")
    return kept


def grid_is_drawn(job: Job) -> bool:
    """True when misclassified.png is newer than every file it is drawn from: an earlier collection drew it."""
    try:
        png = os.lstat(job.path / files.MISCLASSIFIED_PNG)
        sources = [os.lstat(job.path / name).st_mtime_ns for name in (files.CONFIG, files.SUMMARY, files.MISCLASSIFIED)
                   if os.path.lexists(job.path / name)]
    except OSError:  # gone meanwhile: draw it
        return False
    return stat.S_ISREG(png.st_mode) and png.st_mtime_ns > max(sources, default=0)
