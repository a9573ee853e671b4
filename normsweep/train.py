"""The training loop, for one job or a group of jobs fused into one Net of lanes (hydra/launcher=gpu): data
resident on the device, per-batch augmentation, SGD + OneCycleLR, L1 as a gradient term, and for every job one
checkpoint per epoch in its own one-job format, so that an interrupted job resumes exactly where it stopped, under
any launcher. A job that fails or diverges ends alone; the others of its group train on."""
from __future__ import annotations

import base64
import io
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from normsweep import files
from normsweep.augment import augment
from normsweep.config import Config
from normsweep.data import Dataset
from normsweep.model import Net, build_model, count_params, lane_state, stack_states
from normsweep.runtime import job_scope, set_up_process
from normsweep.step import Lane, Step, advance_scheduler, batch_sizes, make_optimizer, make_scheduler, momentum_buffers

log = logging.getLogger(__name__)

EVAL_BATCH = 1000  # test images per forward pass; no gradients, so large batches are cheap


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """The job's checkpoint cannot be resumed from; one line naming the file and the fix."""


@dataclass
class DeviceData:
    """The dataset on the training device: uint8 training images (augmented and normalized per batch),
    normalized float test and validation images (fixed, so prepared once). Shapes as the dataset describes them."""

    train_images: torch.Tensor  # uint8 [N, C, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_inputs: torch.Tensor  # float [M, C, H, W], normalized
    test_labels: torch.Tensor  # int64 [M]
    mean: torch.Tensor  # [1, C, 1, 1]: per channel, or one value for every channel
    std: torch.Tensor
    class_names: tuple[str, ...]
    val_inputs: Optional[torch.Tensor] = None  # float [V, C, H, W], normalized: the held-out training images
    val_labels: Optional[torch.Tensor] = None

    @classmethod
    def from_dataset(cls, data: Dataset, device: torch.device) -> "DeviceData":
        mean = torch.tensor(data.mean, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
        std = torch.tensor(data.std, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)

        def inputs(images: torch.Tensor) -> torch.Tensor:
            return (nchw(images.to(device)).float() / 255 - mean) / std

        val = data.val_labels is not None and len(data.val_labels) > 0
        return cls(nchw(data.train_images.to(device)), data.train_labels.to(device), inputs(data.test_images),
                   data.test_labels.to(device), mean, std, data.class_names,
                   inputs(data.val_images) if val else None, data.val_labels.to(device) if val else None)

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    def train_batch(self, idx: torch.Tensor, use_augment: bool,
                    generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.train_images.index_select(0, idx).float().div_(255)  # [B, C, H, W] in [0, 1]
        if use_augment:
            x = augment(x, generator)
        return (x - self.mean) / self.std, self.train_labels.index_select(0, idx)


def nchw(images: torch.Tensor) -> torch.Tensor:
    """[N, H, W] (one channel, as MNIST's files hold them) -> [N, 1, H, W], a view; [N, C, H, W] as it is."""
    return images.unsqueeze(1) if images.dim() == 3 else images


def split_batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Index batches of one epoch; a lone last sample joins the batch before it (BatchNorm cannot train on one)."""
    batches = list(torch.split(order, batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def steps_per_epoch(n: int, batch_size: int) -> int:
    full, last = batch_sizes(n, batch_size)
    return full + (last > 0)


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


def save_checkpoint(path: Path, model, optimizer, scheduler, history: list[dict], rng: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng, "history": history}, buffer)
    files.write_atomic(path, buffer.getvalue())


def drain(steps: Generator) -> object:
    """Runs a step generator (training, an epoch) to its end; -> what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


@dataclass
class Member:
    """One job of a group, as job.JobRun hands it over: what it trains, where, and whom its end is told."""

    cfg: Config
    job_dir: Path
    end: Callable[[str, Optional[str], dict], None]  # (status, error, facts for its summary): called once
    logger: object = None  # loggers.py: open(history) at the start, log_epoch(row) after each epoch's checkpoint
    prune: Optional[Callable[[dict], bool]] = None  # a search's trial: told each epoch's row; True stops the job
    epoch_bar: bool = True  # a bar per epoch on a terminal; off in a sweep of ours, which draws one bar for all


def fit(cfg: Config, job_dir: Path, dataset: Dataset, device: torch.device) -> dict:
    """Train (or resume) one job in job_dir to its end; -> the facts for its summary. Raises what ended it when it
    did not complete (Diverged, CheckpointError, or the failure as a RuntimeError)."""
    ended = {}
    drain(training([Member(cfg, job_dir, lambda *how: ended.setdefault("how", how))], dataset, device))
    status, error, facts = ended["how"]
    if status != files.STATUS_COMPLETED:
        raise (Diverged if status == files.STATUS_DIVERGED else RuntimeError)(error)
    return facts


@dataclass
class Trainee:
    """A member while it trains: its own one-lane Net, optimizer and scheduler (what its checkpoint holds, and what
    its lane of a fused Net is copied back into after every epoch), its history, its generator."""

    member: Member
    model: Net
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    history: list[dict]
    generator: torch.Generator  # every random draw of its training: shuffle, augmentation, dropout
    cpu_state: torch.Tensor  # the CPU generator as its set-up left it (its checkpoint's "cpu" for a CUDA job)
    pred: Optional[torch.Tensor] = None  # the last epoch's test predictions, for the misclassified grid
    ended: bool = field(default=False)

    @property
    def cfg(self) -> Config:
        return self.member.cfg

    @property
    def job_dir(self) -> Path:
        return self.member.job_dir

    def rng(self) -> dict:
        """Its RNG state as a job's checkpoint holds it: torch.get_rng_state() and get_rng_state_all()."""
        device = self.generator.device
        state = {"cpu": self.generator.get_state() if device.type == "cpu" else self.cpu_state}
        if torch.cuda.is_available():
            cuda = torch.cuda.get_rng_state_all()
            if device.type == "cuda":
                cuda[device.index if device.index is not None else torch.cuda.current_device()] = self.generator.get_state()
            state["cuda"] = cuda
        return state

    def end(self, status: str, error: Optional[str], facts: Optional[dict] = None) -> None:
        if self.ended:
            return
        self.ended = True
        self.member.end(status, error, facts or {"threads": torch.get_num_threads(), "params": count_params(self.model)})


def _set_up(member: Member, data: DeviceData, device: torch.device) -> Trainee:
    """The member's model as its seed draws it, resumed from its checkpoint when it has one. Raises CheckpointError."""
    cfg, job_dir = member.cfg, member.job_dir
    torch.manual_seed(cfg.seed)  # the weights' draws, then every draw of training from the same stream
    model = build_model(cfg.norm, cfg.dropout, device, torch.get_num_threads(), channels=data.channels,
                        classes=len(data.class_names))
    log.info("model: %s norm, %d parameters; device %s, %d threads; %d train / %d test images", cfg.norm.name,
             count_params(model), device, torch.get_num_threads(), len(data.train_labels), len(data.test_labels))
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch(len(data.train_labels), cfg.batch_size))
    history = resume(job_dir / files.CHECKPOINT, model, optimizer, scheduler)
    if history:
        files.write_jsonl(job_dir / files.METRICS, history)  # drop any epoch logged after the checkpoint
        log.info("resuming from the checkpoint after epoch %d of %d", len(history), cfg.epochs)
    generator = torch.Generator(device)
    generator.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
    if member.logger is not None:
        member.logger.open(history)
    return Trainee(member, model, optimizer, scheduler, history, generator, torch.get_rng_state())


def training(members: list[Member], dataset: Dataset, device: torch.device,
             capture: Optional[bool] = None) -> Generator[None, None, None]:
    """Train (or resume) the members, jobs that share norm, batch size, epochs, data and precision, as one Net of a
    lane each, yielding after every training step so that groups can take turns in one process (launcher.py).
    Writes each job's metrics.jsonl and checkpoint after every epoch (then calls its on_epoch) and its
    misclassified.json at the end, and tells each member its end (status, error, facts) as it comes; a failure of
    the group's step ends every member still training as failed. capture: CUDA graphs (default: the first member's
    cuda_graphs, on CUDA)."""
    first = members[0].cfg
    set_up_process(first.threads)
    capture = (first.cuda_graphs if capture is None else capture) and device.type == "cuda"
    data = DeviceData.from_dataset(dataset, device)
    trainees = []
    for member in members:
        with job_scope(member.job_dir):
            try:
                trainees.append(_set_up(member, data, device))
            except Exception as e:  # this member fails; the others of its group train on
                member.end(*_failure(member.job_dir, e), {})
    steps = steps_per_epoch(len(data.train_labels), first.batch_size)
    try:
        while trainees:
            for trainee in [t for t in trainees if len(t.history) >= t.cfg.epochs]:  # resumed after its last epoch
                _complete(trainee, data)
            trainees = [t for t in trainees if not t.ended]
            if not trainees:
                break
            step = _fuse(trainees, data, device, steps, capture)
            while all(not t.ended for t in trainees):
                yield from _epoch(step, trainees, data, steps)
            trainees = [t for t in trainees if not t.ended]
    except Exception as e:  # the group's step failed (out of GPU memory, ...): each member says so
        for trainee in trainees:
            _end_failed(trainee, e)


def _fuse(trainees: list[Trainee], data: DeviceData, device: torch.device, steps: int, capture: bool) -> Step:
    """The step of the trainees: one job's own model, or a Net with a lane per job holding their current weights."""
    if len(trainees) == 1:
        model = trainees[0].model
    else:
        cfg = trainees[0].cfg
        model = build_model(cfg.norm, [t.cfg.dropout for t in trainees], device, torch.get_num_threads(),
                            lanes=len(trainees), channels=data.channels, classes=len(data.class_names))
        model.load_state_dict(stack_states([t.model.state_dict() for t in trainees]))
    lanes = [Lane(t.cfg, t.generator, len(t.history) * steps, momentum_buffers(t.optimizer)) for t in trainees]
    step = Step(model, lanes, data, steps, capture)
    for trainee in trainees:
        with job_scope(trainee.job_dir):
            if len(trainees) > 1:
                log.info("%s: trained fused with %d other job(s) of the same shapes, each in its own lane",
                         trainee.job_dir.name, len(trainees) - 1)
            if step.graphs:
                log.info("training step captured as %d CUDA graph(s)", len(step.graphs))
    return step


def _epoch(step: Step, trainees: list[Trainee], data: DeviceData, steps: int) -> Generator[None, None, None]:
    """One epoch of every lane, then each job's own epoch end: its weights back into its model, the test set, its
    metrics row, checkpoint and tracker; a lane whose loss is not finite ends its job as diverged."""
    progress = None
    if sys.stderr.isatty() and all(t.member.epoch_bar for t in trainees):  # eyes only; the log lines are the record
        what = trainees[0].job_dir.name if len(trainees) == 1 else f"{len(trainees)} jobs"
        epoch = len(trainees[0].history) + 1
        progress = lambda it: tqdm(it, desc=f"{what}: epoch {epoch}", leave=False, file=sys.stderr)
    started = time.perf_counter()
    lane_metrics = yield from step.epoch(progress)
    train_seconds = time.perf_counter() - started
    for lane, (trainee, metrics) in enumerate(zip(trainees, lane_metrics)):
        with job_scope(trainee.job_dir):
            _end_of_epoch(step, lane, trainee, metrics, train_seconds, data, steps)


def _end_of_epoch(step: Step, lane: int, trainee: Trainee, metrics: dict, train_seconds: float, data: DeviceData,
                  steps: int) -> None:
    epoch, cfg = len(trainee.history) + 1, trainee.cfg
    if len(step.lanes) > 1:
        with torch.no_grad():
            trainee.model.load_state_dict(lane_state(step.model, lane))
            for mine, fused in zip(momentum_buffers(trainee.optimizer), step.lane_buffers(lane)):
                mine.copy_(fused)
    advance_scheduler(trainee.scheduler, steps)
    if not math.isfinite(metrics["train_loss"]):
        _end_failed(trainee, Diverged(f"training loss became {metrics['train_loss']} in epoch {epoch}"))
        return
    # threads: oneDNN's reductions depend on the count, so an epoch's numbers are bit-identical only at the same one
    row = {"epoch": epoch, **metrics, "lr": trainee.scheduler.get_last_lr()[0], "threads": torch.get_num_threads(),
           "train_seconds": train_seconds}
    started = time.perf_counter()
    if data.val_inputs is not None:
        row["val_loss"], row["val_acc"], _ = evaluate(trainee.model, data.val_inputs, data.val_labels)
    row["test_loss"], row["test_acc"], trainee.pred = evaluate(trainee.model, data.test_inputs, data.test_labels)
    row["test_seconds"] = time.perf_counter() - started
    # the job's name on its line: jobs side by side (joblib, the gpu launcher) share one console
    val = f" val_acc {row['val_acc']:.2f}" if "val_acc" in row else ""
    log.info("%s: epoch %d/%d train_loss %.4f train_acc %.2f%s test_loss %.4f test_acc %.2f lr %.5f (%.1fs + %.1fs)",
             trainee.job_dir.name, epoch, cfg.epochs, row["train_loss"], row["train_acc"], val, row["test_loss"],
             row["test_acc"], row["lr"], row["train_seconds"], row["test_seconds"])
    try:
        trainee.history.append(row)
        record_epoch(trainee)
        if trainee.member.logger is not None:
            trainee.member.logger.log_epoch(row)
        if trainee.member.prune is not None and epoch < cfg.epochs and trainee.member.prune(row):
            log.info("%s: pruned by the search after epoch %d", trainee.job_dir.name, epoch)
            trainee.end(files.STATUS_PRUNED, f"pruned by the search after epoch {epoch}")
            return
        if epoch >= cfg.epochs:
            _complete(trainee, data)
    except Exception as e:  # this job's files or tracker failed: it ends, the others train on
        _end_failed(trainee, e)


def _complete(trainee: Trainee, data: DeviceData) -> None:
    with job_scope(trainee.job_dir):
        if trainee.pred is None:  # resumed after its last epoch, killed before the summary
            _, _, trainee.pred = evaluate(trainee.model, data.test_inputs, data.test_labels)
        write_misclassified(trainee.job_dir, data, trainee.pred.cpu())
        write_test_correct(trainee.job_dir, trainee.pred.cpu() == data.test_labels.cpu())
        trainee.end(files.STATUS_COMPLETED, None)


def _end_failed(trainee: Trainee, error: Exception) -> None:
    """Ends the trainee's job as diverged or failed (_failure)."""
    trainee.end(*_failure(trainee.job_dir, error))


def _failure(job_dir: Path, error: Exception) -> tuple[str, str]:
    """-> (diverged or failed, the message for its summary), logged into the job's own log with the line that says
    why (a traceback when unforeseen)."""
    with job_scope(job_dir):
        if isinstance(error, Diverged):
            log.error("%s diverged: %s", job_dir.name, error)
            return files.STATUS_DIVERGED, str(error)
        if isinstance(error, CheckpointError):  # its message is the whole story: no traceback
            log.error("%s failed: %s", job_dir.name, error)
            return files.STATUS_FAILED, str(error)
        log.error("%s failed", job_dir.name, exc_info=error)
        return files.STATUS_FAILED, f"{type(error).__name__}: {error}"


def record_epoch(trainee: Trainee) -> None:
    """The epoch on disk: its metrics line, then the checkpoint that makes it resumable."""
    files.write_jsonl(trainee.job_dir / files.METRICS, trainee.history)
    save_checkpoint(trainee.job_dir / files.CHECKPOINT, trainee.model, trainee.optimizer, trainee.scheduler,
                    trainee.history, trainee.rng())


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
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        history = [dict(row) for row in state["history"]]
    except Exception as e:  # loadable, but not a checkpoint of this job: wrong keys, shapes or types
        problem = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{checkpoint}: not a checkpoint of this job ({type(e).__name__}: {problem}); "
                              f"{fix}") from None
    return history


def write_misclassified(job_dir: Path, data: DeviceData, pred: torch.Tensor) -> None:
    """What the collector needs to draw the misclassified grid, so that it never imports torch."""
    labels = data.test_labels.cpu()
    wrong = (pred != labels).nonzero().flatten()[:files.MISCLASSIFIED_SHOWN].tolist()
    pixels = data.test_inputs[wrong].cpu() * data.std.cpu() + data.mean.cpu()
    images = (pixels * 255).round().clamp(0, 255).to(torch.uint8)  # [k, C, H, W]
    # one channel: [H, W] (gray); several: [H, W, C], as an image viewer takes them
    images = images[:, 0] if images.shape[1] == 1 else images.permute(0, 2, 3, 1)
    items = [{"index": i, "actual": int(labels[i]), "predicted": int(pred[i]), "image": images[k].tolist()}
             for k, i in enumerate(wrong)]
    files.write_json(job_dir / files.MISCLASSIFIED, {"class_names": list(data.class_names), "items": items})


def write_test_correct(job_dir: Path, correct: torch.Tensor) -> None:
    """Which test images the final model gets right, one bit each (files.read_test_correct reads it back): what the
    collector's paired test over images compares between rows."""
    bits = np.packbits(correct.numpy().astype(np.uint8))
    files.write_json(job_dir / files.TEST_CORRECT, {"images": len(correct), "correct": int(correct.sum()),
                                                    "bits": base64.b64encode(bits.tobytes()).decode()})
