"""The training loop: data resident on the device, per-batch augmentation, SGD + OneCycleLR, L1 as a gradient
term, one checkpoint per epoch so an interrupted job resumes exactly where it stopped."""
from __future__ import annotations

import ctypes
import io
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from normsweep import files
from normsweep.augment import augment
from normsweep.config import Config
from normsweep.data import Dataset
from normsweep.model import Net, build_model, count_params
from normsweep.step import DeviceStep, add_l1_grad, advance_scheduler, make_optimizer, make_scheduler

log = logging.getLogger(__name__)

EVAL_BATCH = 1000  # test images per forward pass; no gradients, so large batches are cheap
DIVERGENCE_CHECK_STEPS = 50  # look for a non-finite loss this often (each look is a host sync on GPU)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt() parameters, from glibc's malloc.h


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """The job's checkpoint cannot be resumed from; one line naming the file and the fix."""


@dataclass
class DeviceData:
    """The dataset on the training device: uint8 training images (augmented and normalized per batch),
    normalized float test images (fixed, so prepared once)."""

    train_images: torch.Tensor  # uint8 [N, 28, 28]
    train_labels: torch.Tensor  # int64 [N]
    test_inputs: torch.Tensor  # float [M, 1, 28, 28], normalized
    test_labels: torch.Tensor  # int64 [M]
    mean: float
    std: float
    class_names: tuple[str, ...]

    @classmethod
    def from_dataset(cls, data: Dataset, device: torch.device) -> "DeviceData":
        test = (data.test_images.to(device).unsqueeze(1).float() / 255 - data.mean) / data.std
        return cls(data.train_images.to(device), data.train_labels.to(device), test, data.test_labels.to(device),
                   data.mean, data.std, data.class_names)

    def train_batch(self, idx: torch.Tensor, use_augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.train_images.index_select(0, idx).unsqueeze(1).float().div_(255)  # [B, 1, 28, 28] in [0, 1]
        if use_augment:
            x = augment(x)
        return (x - self.mean) / self.std, self.train_labels.index_select(0, idx)


def resolve_device(name: str) -> torch.device:
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
    Speed). The process then holds on to its peak memory, which for this model is tens of MB. Nothing happens without glibc (macOS, Windows, musl's stub).
    """
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_TRIM_THRESHOLD, 2**30)  # trim the heap only when 1 GiB of it is free
        mallopt(M_MMAP_THRESHOLD, 2**28)  # blocks below 256 MiB come from the heap, not from mmap


def split_batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Index batches of one epoch; a lone last sample joins the batch before it (BatchNorm cannot train on one)."""
    batches = list(torch.split(order, batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def train_one_epoch(model: Net, optimizer: torch.optim.Optimizer, scheduler, data: DeviceData, cfg: Config,
                    progress: Optional[Callable] = None) -> Generator[None, None, dict]:
    """The eager step: yields after every step (so that jobs can take turns), returns the epoch's train metrics."""
    model.train()
    n = len(data.train_labels)
    order = torch.randperm(n, device=data.train_labels.device)
    params = list(model.parameters())
    loss_sum = torch.zeros((), device=order.device)  # summed on the device: no host sync per batch
    correct = torch.zeros((), dtype=torch.int64, device=order.device)
    batches = split_batches(order, cfg.batch_size)
    for step, idx in enumerate(progress(batches) if progress else batches):
        x, y = data.train_batch(idx, cfg.data.augment)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = model(x)
        loss = F.nll_loss(out.float(), y)
        loss.backward()
        if cfg.reg.l1 > 0:
            add_l1_grad(params, cfg.reg.l1)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(idx)
        correct += (out.detach().argmax(1) == y).sum()
        if step % DIVERGENCE_CHECK_STEPS == 0 and not torch.isfinite(loss_sum):
            raise Diverged(f"training loss became {loss_sum.item()} at batch {step + 1}")
        yield
    return check_finite({"train_loss": loss_sum.item() / n, "train_acc": 100.0 * correct.item() / n})


def check_finite(metrics: dict) -> dict:
    if not math.isfinite(metrics["train_loss"]):
        raise Diverged(f"training loss became {metrics['train_loss']}")
    return metrics


@torch.inference_mode()
def evaluate(model: Net, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """-> mean NLL per image, accuracy in percent, predictions [M]."""
    model.eval()
    loss_sum, preds = torch.zeros((), device=inputs.device), []
    for x, y in zip(torch.split(inputs, EVAL_BATCH), torch.split(labels, EVAL_BATCH)):
        out = model(x)
        preds.append(out.argmax(1))
        loss_sum += F.nll_loss(out, y, reduction="sum")
    pred = torch.cat(preds)
    return loss_sum.item() / len(labels), 100.0 * (pred == labels).sum().item() / len(labels), pred


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model, optimizer, scheduler, history: list[dict]) -> None:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "history": history}, buffer)
    files.write_atomic(path, buffer.getvalue())


def fit(cfg: Config, job_dir: Path, dataset: Dataset, device: torch.device) -> dict:
    """Train (or resume) the job in job_dir to its end; see training()."""
    return drain(training(cfg, job_dir, dataset, device))


def drain(steps: Generator) -> object:
    """Runs a step generator (training, an epoch) to its end; -> what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


@dataclass
class Run:
    """What one job trains with, built once per process and job."""

    data: DeviceData
    model: Net
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    steps_per_epoch: int


def set_up_process(cfg: Config) -> None:
    torch.set_num_threads(cfg.threads or cores_given())
    keep_freed_memory()
    torch.manual_seed(cfg.seed)


def build_run(cfg: Config, dataset: Dataset, device: torch.device) -> Run:
    data = DeviceData.from_dataset(dataset, device)
    model = build_model(cfg.norm, cfg.dropout, device, torch.get_num_threads())
    log.info("model: %s norm, %d parameters; device %s, %d threads; %d train / %d test images", cfg.norm.name,
             count_params(model), device, torch.get_num_threads(), len(data.train_labels), len(data.test_labels))
    optimizer = make_optimizer(model.parameters(), cfg)
    steps_per_epoch = len(split_batches(torch.arange(len(data.train_labels)), cfg.batch_size))
    return Run(data, model, optimizer, make_scheduler(optimizer, cfg, steps_per_epoch), steps_per_epoch)


def training(cfg: Config, job_dir: Path, dataset: Dataset, device: torch.device,
             on_epoch: Optional[Callable[[dict], None]] = None) -> Generator[None, None, dict]:
    """Train (or resume) the job in job_dir, yielding after every training step so that several jobs can take turns
    in one process (launcher.py). Writes metrics.jsonl and the checkpoint after every epoch (then calls on_epoch
    with the epoch's row) and misclassified.json at the end; returns facts for the summary. Raises on failure
    (Diverged included)."""
    set_up_process(cfg)
    run = build_run(cfg, dataset, device)
    checkpoint = job_dir / files.CHECKPOINT
    history = resume(checkpoint, run.model, run.optimizer, run.scheduler)
    if history:
        files.write_jsonl(job_dir / files.METRICS, history)  # drop any epoch logged after the checkpoint
        log.info("resuming from the checkpoint after epoch %d of %d", len(history), cfg.epochs)
    graphed = None
    if cfg.cuda_graphs and device.type == "cuda":
        graphed = DeviceStep(run.model, run.optimizer, run.data, cfg, run.steps_per_epoch,
                             steps_done=len(history) * run.steps_per_epoch, capture=True)
        log.info("training step captured as %d CUDA graph(s)", len(graphed.graphs))

    board = open_tensorboard(cfg, job_dir, first_epoch=len(history) + 1)  # None unless logger=tensorboard
    pred = None  # the last epoch's test predictions, for the misclassified grid
    try:
        for epoch in range(len(history) + 1, cfg.epochs + 1):
            row, pred = yield from train_and_test(run, cfg, graphed, epoch, job_dir.name)
            history.append(row)
            record_epoch(job_dir, run, history, board)
            if on_epoch is not None:
                on_epoch(row)
        if board is not None:
            record_hparams(board, cfg, history)
    finally:
        if board is not None:
            board.close()

    if pred is None:  # resumed after its last epoch, killed before the summary
        _, _, pred = evaluate(run.model, run.data.test_inputs, run.data.test_labels)
    write_misclassified(job_dir, run.data, pred.cpu())
    return {"threads": torch.get_num_threads(), "params": count_params(run.model)}


def train_and_test(run: Run, cfg: Config, graphed: Optional[DeviceStep], epoch: int,
                   job: str) -> Generator[None, None, tuple[dict, torch.Tensor]]:
    """One epoch, eager or replayed as CUDA graphs, then the test set; -> its metrics row and test predictions."""
    progress = None
    if sys.stderr.isatty():  # a bar for eyes only; the log line below is the record
        progress = lambda it: tqdm(it, desc=f"epoch {epoch}", leave=False, file=sys.stderr)  # noqa: E731
    started = time.perf_counter()
    if graphed is None:
        metrics = yield from train_one_epoch(run.model, run.optimizer, run.scheduler, run.data, cfg, progress)
    else:
        metrics = check_finite((yield from graphed.epoch(progress)))
        advance_scheduler(run.scheduler, run.steps_per_epoch)
    # threads: oneDNN's reductions depend on the count, so an epoch's numbers are bit-identical only at the same one
    row = {"epoch": epoch, **metrics, "lr": run.scheduler.get_last_lr()[0], "threads": torch.get_num_threads()}
    row["train_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    row["test_loss"], row["test_acc"], pred = evaluate(run.model, run.data.test_inputs, run.data.test_labels)
    row["test_seconds"] = time.perf_counter() - started
    # the job's name on its line: jobs side by side (joblib, the gpu launcher) share one console
    log.info("%s: epoch %d/%d train_loss %.4f train_acc %.2f test_loss %.4f test_acc %.2f lr %.5f (%.1fs + %.1fs)",
             job, epoch, cfg.epochs, row["train_loss"], row["train_acc"], row["test_loss"], row["test_acc"], row["lr"],
             row["train_seconds"], row["test_seconds"])
    return row, pred


def record_epoch(job_dir: Path, run: Run, history: list[dict], board) -> None:
    """The epoch on disk: its metrics line, TensorBoard scalars, then the checkpoint that makes it resumable."""
    files.write_jsonl(job_dir / files.METRICS, history)
    if board is not None:
        row = history[-1]
        for key, value in row.items():
            if key not in files.ROW_FACTS:
                board.add_scalar(key, value, row["epoch"])
        board.flush()  # on disk with the epoch's metrics line, not minutes later
    save_checkpoint(job_dir / files.CHECKPOINT, run.model, run.optimizer, run.scheduler, history)


def resume(checkpoint: Path, model: Net, optimizer, scheduler) -> list[dict]:
    """Loads the checkpoint, if there is one, into the model, optimizer, scheduler and RNG; -> the epochs it holds."""
    if not checkpoint.exists():
        return []
    fix = "delete it to restart this job from epoch 1"
    try:
        # onto the CPU: torch.set_rng_state takes CPU tensors only, and load_state_dict moves the weights and the
        # momentum onto the model's device
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{checkpoint}: unreadable ({type(e).__name__}); {fix}") from None
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        history = [dict(row) for row in state["history"]]
    except Exception as e:  # loadable, but not a checkpoint of this job: wrong keys, shapes or types
        problem = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{checkpoint}: not a checkpoint of this job ({type(e).__name__}: {problem}); "
                              f"{fix}") from None
    return history


def tensorboard_dir(cfg: Config, job_dir: Path) -> Path:
    return job_dir / files.TENSORBOARD_DIR / f"{files.run_label(cfg.norm.name, cfg.reg.name)}, seed {cfg.seed}"


def open_tensorboard(cfg: Config, job_dir: Path, first_epoch: int):
    """A SummaryWriter into <job>/tensorboard/<run label>/ when logger=tensorboard, else None. `tensorboard --logdir
    <sweep dir>` names each run by its path: "bn-l1-bs64-s1/tensorboard/BatchNorm with L1, seed 1"."""
    if cfg.logger.name != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    log_dir = tensorboard_dir(cfg, job_dir)
    # A resumed job runs again from first_epoch: purge_step makes TensorBoard drop what an interrupted writer
    # logged from there on (epochs whose checkpoint was never saved), so every epoch shows once.
    return SummaryWriter(str(log_dir), purge_step=first_epoch if first_epoch > 1 else None)


HPARAM_METRICS = ("best_test_acc", "best_test_loss", "final_test_acc")  # what the HParams view shows per run


def hparams_of(cfg: Config) -> dict[str, object]:
    """The settings a sweep varies, as TensorBoard's HParams view shows them (plain str, int, float or bool)."""
    return {"norm": str(cfg.norm.name), "norm.groups": cfg.norm.groups, "reg": str(cfg.reg.name),
            "reg.l1": float(cfg.reg.l1), "reg.l2": float(cfg.reg.l2), "batch_size": cfg.batch_size, "seed": cfg.seed,
            "epochs": cfg.epochs, "optim.max_lr": float(cfg.optim.max_lr), "optim.momentum": float(cfg.optim.momentum),
            "optim.cycle_momentum": cfg.optim.cycle_momentum, "dropout": float(cfg.dropout),
            "data": str(cfg.data.name), "data.augment": cfg.data.augment, "precision": str(cfg.precision)}


def record_hparams(board, cfg: Config, history: list[dict]) -> None:
    """The job's settings and final metrics for TensorBoard's HParams dashboard, written by the job's own writer
    (torch's add_hparams would open a timestamped subfolder: a second run per job), so that `tensorboard --logdir
    <sweep>` shows the sweep as one table and as parallel coordinates. A resumed job writes them again: the last
    ones count."""
    from torch.utils.tensorboard.summary import hparams

    summary = files.summarize(history)
    metrics = {f"hparams/{name}": summary[name] for name in HPARAM_METRICS if summary[name] is not None}
    for event in hparams(hparams_of(cfg), metrics):
        board.file_writer.add_summary(event)
    for tag, value in metrics.items():
        board.add_scalar(tag, value, len(history))
    board.flush()


def write_misclassified(job_dir: Path, data: DeviceData, pred: torch.Tensor) -> None:
    """What the collector needs to draw the misclassified grid, so that it never imports torch."""
    labels = data.test_labels.cpu()
    wrong = (pred != labels).nonzero().flatten()[:files.MISCLASSIFIED_SHOWN].tolist()
    images = ((data.test_inputs[wrong].cpu() * data.std + data.mean) * 255).round().clamp(0, 255).to(torch.uint8)
    items = [{"index": i, "actual": int(labels[i]), "predicted": int(pred[i]), "image": images[k, 0].tolist()}
             for k, i in enumerate(wrong)]
    files.write_json(job_dir / files.MISCLASSIFIED, {"class_names": list(data.class_names), "items": items})
