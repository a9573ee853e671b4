"""Helpers shared by the tests (imported as `from conftest import ...`): the repository, the fast settings every
end-to-end run uses, and readers of what a run leaves on disk."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from normsweep import files  # not train: torch would load in pytest's controller too, before xdist's workers start

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Tiny and deterministic: on the CPU with one thread, the same config gives the same numbers to the last bit.
FAST = ("data=fake", "data.test_limit=100", "device=cpu", "threads=1")
TIMING_KEYS = ("train_seconds", "test_seconds")


def run_py(*overrides: str, multirun: bool = True) -> list[str]:
    """`python run.py [-m] <FAST> <overrides>`: overrides come last, so they win over FAST."""
    return [sys.executable, str(REPO / "run.py"), *(["-m"] if multirun else []), *FAST, *overrides]


def run(*overrides: str, cwd: Path, multirun: bool = True, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(run_py(*overrides, multirun=multirun), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def metrics(job: Path) -> list[dict]:
    """A job's per-epoch rows without the wall-clock columns: what must match between equal runs."""
    return without_timings(files.read_jsonl(job / files.METRICS))


def jobs_in(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def snapshot(job: Path) -> dict[str, tuple[bytes, int]]:
    """Content and modification time of a job's results: equal snapshots mean nothing was rewritten."""
    return {name: ((job / name).read_bytes(), (job / name).stat().st_mtime_ns)
            for name in (files.METRICS, files.CHECKPOINT, files.SUMMARY, files.CONFIG)}


@pytest.fixture
def killed_at_second_checkpoint(monkeypatch) -> Callable[[], None]:
    """A job dies after logging epoch 2, before that epoch's checkpoint (its run then trains epoch 2 again from
    epoch 1's state); -> the function that lets the next run save checkpoints again."""
    from normsweep import train

    save = train.save_checkpoint

    def save_then_die_at_epoch_2(path, model, optimizer, scheduler, history, rng):
        if len(history) == 2:
            raise RuntimeError("killed")
        save(path, model, optimizer, scheduler, history, rng)

    monkeypatch.setattr(train, "save_checkpoint", save_then_die_at_epoch_2)
    return lambda: monkeypatch.setattr(train, "save_checkpoint", save)
