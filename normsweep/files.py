"""The run folder's file names, run labels and atomic writes: the one place the trainer and the collector share."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"  # fully resolved config the job ran with
METRICS = "metrics.jsonl"  # one JSON object per finished epoch
SUMMARY = "summary.json"  # written last: its presence means the job ended
CHECKPOINT = "checkpoint.pt"  # state after the last finished epoch, for resume
MISCLASSIFIED = "misclassified.json"  # test images the final model got wrong (pixels, labels)
MISCLASSIFIED_PNG = "misclassified.png"
TENSORBOARD_DIR = "tensorboard"  # logger=tensorboard: <job>/tensorboard/<run label>, seed <n>/ holds the event files
RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
CURVES_PNG = "curves.png"
BATCH_SIZE_PNG = "batch_size.png"

STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_DIVERGED = "diverged"

# Settings that change how a job runs, not what it computes: a rerun differing only in these is the same job
# (job.py), and runs differing only in these (and the seed) share a row of the table (collect.py).
# conf/config.yaml keeps the same keys out of job folder names.
RUNTIME_KEYS = ("fail_fast", "threads", "device", "cuda_graphs", "data.root", "logger")

NORM_NAMES = {"bn": "BatchNorm", "gn": "GroupNorm", "ln": "LayerNorm"}  # dict order is the table's row order
REG_SUFFIXES = {"none": "", "l1": " with L1", "l2": " with L2", "l1l2": " with L1 and L2"}


def run_label(norm: str, reg: str) -> str:
    """'BatchNorm with L1' for ('bn', 'l1'): the table's row label, as the reference writes it."""
    return NORM_NAMES.get(norm, str(norm)) + REG_SUFFIXES.get(reg, f" with {reg}")


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
