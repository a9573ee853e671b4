"""The loggers, behind one table: a logger is a class opened for one job with its settings, then open(history) when
its training starts (the epochs a resumed job has already), log_epoch(row) after every epoch's checkpoint, and
finish(status, history) when the job ends. logger=tensorboard and logger=mlflow are its two entries; logger=none
opens none. To add one (W&B, say): a class here, its entry in LOGGERS, and conf/logger/<name>.yaml (docs/code.md)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from normsweep import files

log = logging.getLogger(__name__)

HPARAM_METRICS = ("best_test_acc", "best_test_loss", "final_test_acc", "test_acc_at_best_val")  # in the HParams view


def settings_of(resolved: dict) -> dict[str, object]:
    """What a run records as its settings (TensorBoard's HParams, MLflow's parameters): the flattened resolved config
    minus the runtime keys, the rule the collector uses for its columns; plain str, int, float or bool values."""
    return {key: value if isinstance(value, (str, int, float, bool)) else str(value)
            for key, value in files.flatten(resolved).items() if not files.is_runtime_key(key)}


class TensorBoardLogger:
    """A SummaryWriter into <job>/tensorboard/<row label, seed>/: `tensorboard --logdir <sweep dir>` names each run
    by its path ("bn-l1-bs64-s1/tensorboard/BatchNorm with L1, seed 1")."""

    def __init__(self, job_dir: Path, settings: dict, **_: object):
        from torch.utils.tensorboard import SummaryWriter  # here: only logger=tensorboard needs it

        self.writer_class, self.job_dir, self.settings = SummaryWriter, job_dir, settings
        self.log_dir = tensorboard_dir(job_dir, settings)
        self.writer = None

    def open(self, history: list[dict]) -> None:
        # A resumed job writes its whole history again over a purge of every step from 1 on: each epoch then shows
        # once, whatever an interrupted writer logged or missed (a kill between a checkpoint and its scalars).
        self.writer = self.writer_class(str(self.log_dir), purge_step=1 if history else None)
        for row in history:
            self._scalars(row)
        self.writer.flush()

    def _scalars(self, row: dict) -> None:
        for key, value in row.items():
            if key not in files.ROW_FACTS:
                self.writer.add_scalar(key, value, row["epoch"])

    def log_epoch(self, row: dict) -> None:
        self._scalars(row)
        self.writer.flush()  # on disk with the epoch's metrics line, not minutes later

    def finish(self, status: str, history: Iterable[dict]) -> None:
        """A completed job's settings and final metrics for the HParams dashboard, written by its own writer (torch's
        add_hparams would open a timestamped subfolder: a second run per job); then the writer closes."""
        from torch.utils.tensorboard.summary import hparams

        history = list(history)
        if self.writer is None:  # ended before its training started
            return
        if status == files.STATUS_COMPLETED:
            summary = files.summarize(history)
            metrics = {f"hparams/{name}": summary[name] for name in HPARAM_METRICS if summary[name] is not None}
            for event in hparams(self.settings, metrics):
                self.writer.file_writer.add_summary(event)
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, len(history))
        self.writer.close()


def tensorboard_dir(job_dir: Path, settings: dict) -> Path:
    label = files.run_label(str(settings["norm.name"]), str(settings["reg.name"]))
    return job_dir / files.TENSORBOARD_DIR / f"{label}, seed {settings['seed']}"


class MlflowLogger:
    """A run per job under a run per sweep (tracking.py): created at the job's first start, continued on resume."""

    def __init__(self, job_dir: Path, settings: dict, tracking_uri: str, sweep_dir: Path, tags: dict):
        from normsweep import tracking

        self.tracker = tracking.JobTracker(tracking_uri, job_dir, sweep_dir, job_dir.name, settings, tags)

    def open(self, history: list[dict]) -> None:
        pass  # the run exists from the constructor on; epochs a kill kept out of it are logged at finish

    def log_epoch(self, row: dict) -> None:
        self.tracker.log_epoch(row)

    def finish(self, status: str, history: Iterable[dict]) -> None:
        self.tracker.finish(status, history)


LOGGERS = {"tensorboard": TensorBoardLogger, "mlflow": MlflowLogger}


def open_logger(name: str, job_dir: Path, resolved: dict, tracking_uri: str | None, sweep_dir: Path,
                tags: dict) -> "TensorBoardLogger | MlflowLogger | None":
    """The job's logger of this name (None for logger=none)."""
    if name not in LOGGERS:
        return None
    return LOGGERS[name](job_dir=job_dir, settings=settings_of(resolved), tracking_uri=tracking_uri,
                         sweep_dir=sweep_dir, tags=tags)
