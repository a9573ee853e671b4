"""The training step with every per-step value on the device (batch position, OneCycle schedule, momentum SGD,
summed metrics), so that on CUDA it is captured once as a CUDA graph and replayed; on CPU the same step runs
eagerly, which is how the tests check it. Also each job's device context: its CUDA stream and its RNG."""
from __future__ import annotations

import warnings
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from normsweep.config import Config

WARMUP_STEPS = 3  # eager steps before capture, so that cuBLAS/cuDNN set up outside the graph (PyTorch's CUDA-graph notes)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.optim.max_lr, epochs=cfg.epochs,
                                               steps_per_epoch=steps_per_epoch, cycle_momentum=cfg.optim.cycle_momentum)


def make_optimizer(params, cfg: Config) -> torch.optim.SGD:
    # lr: OneCycleLR sets every step's rate from optim.max_lr, starting before the first step
    return torch.optim.SGD(params, lr=cfg.optim.max_lr, momentum=cfg.optim.momentum, weight_decay=cfg.reg.l2)


def schedule_table(cfg: Config, steps_per_epoch: int) -> tuple[list[float], list[float]]:
    """The learning rate and momentum of every step of the run, as torch's OneCycleLR sets them for SGD."""
    probe = make_optimizer([torch.zeros(1, requires_grad=True)], cfg)
    scheduler = make_scheduler(probe, cfg, steps_per_epoch)
    group = probe.param_groups[0]
    lrs, momenta = [], []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(group["lr"])
        momenta.append(group["momentum"])
        probe.step()  # no gradients: changes nothing, but keeps the scheduler's step-order check quiet
        scheduler.step()
    return lrs, momenta


def advance_scheduler(scheduler, steps: int) -> None:
    """Moves the host-side scheduler along with steps the device took, so that its state (checkpoint, last lr)
    matches; its optimizer's step is never called on this path, which torch would warn about each epoch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        for _ in range(steps):
            scheduler.step()


def momentum_buffers(optimizer: torch.optim.SGD) -> list[torch.Tensor]:
    """SGD's momentum buffers, created as zeros where it has none yet: with dampening 0, torch's first step sets
    the buffer to the gradient, which is what 0 * momentum + gradient gives, so the update is the same."""
    buffers = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"])
    return buffers


@torch.no_grad()
def sgd_update(params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor],
               lr: torch.Tensor, momentum: torch.Tensor, weight_decay: float) -> None:
    """torch.optim.SGD's update (momentum, dampening 0, no Nesterov) with the learning rate and momentum as 0-dim
    device tensors, which torch's SGD does not take inside a CUDA graph: buf = m * buf + (g + wd * p); p -= lr * buf."""
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(buffers, momentum)
    torch._foreach_add_(buffers, grads)
    torch._foreach_sub_(params, torch._foreach_mul(buffers, lr))


def add_l1_grad(params: list[torch.Tensor], l1: float) -> None:
    """Adds the gradient of l1 * sum|w| to each parameter's gradient, the same as adding the penalty to the
    loss (d|w|/dw = sign(w), 0 at 0, as autograd's abs), without building it into the graph each step."""
    torch._foreach_add_([p.grad for p in params], torch._foreach_sign(params), alpha=l1)


def batch_sizes(n: int, batch_size: int) -> tuple[int, int]:
    """-> (full batches of batch_size, size of the last batch or 0), as train.split_batches cuts an epoch: the last
    batch is shorter, or batch_size + 1 when a lone sample joined it."""
    full, rest = divmod(n, batch_size)
    if rest == 1 and full > 0:
        return full - 1, batch_size + 1
    return full, rest


class DeviceStep:
    """One job's training step with static shapes. Batches of an epoch are read from `order` (a static buffer the
    epoch's shuffle is copied into) at a device-side position; a shorter last batch has its own step (and graph),
    so every sample of the epoch is trained on. With capture=True (CUDA) each step becomes a CUDA graph."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.SGD, data, cfg: Config, steps_per_epoch: int,
                 steps_done: int, capture: bool):
        device = data.train_labels.device
        n = len(data.train_labels)
        self.model, self.data, self.cfg, self.n = model, data, cfg, n
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.buffers = momentum_buffers(optimizer)
        self.weight_decay = optimizer.param_groups[0]["weight_decay"]
        lrs, momenta = schedule_table(cfg, steps_per_epoch)
        self.lrs = torch.tensor(lrs, dtype=torch.float32, device=device)  # [epochs * steps_per_epoch]
        self.momenta = torch.tensor(momenta, dtype=torch.float32, device=device)
        self.step_count = torch.tensor(steps_done, device=device)  # global step: indexes the schedule
        self.position = torch.zeros((), dtype=torch.int64, device=device)  # full batches done this epoch
        self.order = torch.arange(n, device=device)  # the epoch's shuffle, copied in each epoch
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.full, self.last = batch_sizes(n, cfg.batch_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture()

    def _full_batch(self) -> torch.Tensor:
        """[batch_size] sample indices at the device-side position (index_select: no host sync)."""
        rows = self.order[: self.full * self.cfg.batch_size].view(self.full, self.cfg.batch_size)
        idx = rows.index_select(0, self.position.view(1)).view(-1)
        self.position.add_(1)
        return idx

    def _step(self, size: int) -> None:
        cfg = self.cfg
        idx = self._full_batch() if size == cfg.batch_size else self.order[self.full * cfg.batch_size:]
        x, y = self.data.train_batch(idx, cfg.data.augment)
        for p in self.params:
            p.grad = None
        # no autocast cache: a graph must not keep casts from its capture
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16", cache_enabled=False):
            out = self.model(x)
        loss = F.nll_loss(out.float(), y)
        loss.backward()
        grads = [p.grad for p in self.params]
        if cfg.reg.l1 > 0:
            add_l1_grad(self.params, cfg.reg.l1)
        step = self.step_count.view(1)
        sgd_update(self.params, grads, self.buffers, self.lrs.index_select(0, step).squeeze(0),
                   self.momenta.index_select(0, step).squeeze(0), self.weight_decay)
        self.step_count.add_(1)
        self.loss_sum.add_(loss.detach() * size)
        self.correct.add_((out.detach().argmax(1) == y).sum())

    def sizes_once(self) -> list[int]:
        """The distinct batch sizes of an epoch: one step (and one graph) each."""
        return ([self.cfg.batch_size] if self.full else []) + ([self.last] if self.last else [])

    def _state(self) -> list[torch.Tensor]:
        return [*self.params, *self.model.buffers(), *self.buffers, self.step_count, self.position,
                self.loss_sum, self.correct]

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of every tensor a step changes: weights, buffers, momentum, counters and sums."""
        return [t.detach().clone() for t in self._state()]

    @torch.no_grad()  # the weights are leaves that require grad: copying into them must not be recorded
    def restore(self, saved: list[torch.Tensor]) -> None:
        for tensor, value in zip(self._state(), saved):
            tensor.copy_(value)

    def _capture(self) -> None:
        """Warm up each step eagerly, capture it, then put back every tensor and the RNG as they were: neither the
        warm-up nor the capture trains. Both happen on a side stream, as PyTorch's CUDA-graph notes require."""
        saved = self.snapshot()
        rng = torch.cuda.get_rng_state(self.order.device)
        current, side = torch.cuda.current_stream(), torch.cuda.Stream(self.order.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for size in self.sizes_once():
                for _ in range(WARMUP_STEPS):
                    self.position.zero_()
                    self._step(size)
                graph = torch.cuda.CUDAGraph()
                self.position.zero_()
                with torch.cuda.graph(graph, stream=side):
                    self._step(size)
                self.graphs[size] = graph
            self.restore(saved)
        current.wait_stream(side)
        torch.cuda.set_rng_state(rng, self.order.device)

    def _run(self, size: int) -> None:
        graph = self.graphs.get(size)
        if graph is None:
            self._step(size)
        else:
            graph.replay()

    def epoch(self, progress: Optional[Callable] = None) -> Iterator[None]:
        """Train one epoch, yielding after every step; returns {'train_loss', 'train_acc'} (one host sync, at the end).
        Divergence is checked once, at the end: a graph cannot stop mid-epoch."""
        self.model.train()
        self.order.copy_(torch.randperm(self.n, device=self.order.device))
        self.position.zero_()
        self.loss_sum.zero_()
        self.correct.zero_()
        sizes = [self.cfg.batch_size] * self.full + ([self.last] if self.last else [])
        for size in progress(sizes) if progress else sizes:
            self._run(size)
            yield
        return {"train_loss": self.loss_sum.item() / self.n, "train_acc": 100.0 * self.correct.item() / self.n}


class JobContext:
    """What one job owns on its device while several jobs share a process: on CUDA its own stream and its own
    generator state (graphs record the generator state they were captured with, and two graphs sharing one would
    race on it from two streams); on CPU its own copy of torch's global RNG. `with context:` around each of the
    job's turns makes every random draw the one the job would make alone."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.cuda_generator = None
        if self.stream is not None:
            self.cuda_generator = self._default_generator().clone_state()  # a state of its own; torch.manual_seed in the job seeds it
        self.cpu_rng: Optional[torch.Tensor] = None
        self._stream_context = None

    def _default_generator(self) -> torch.Generator:
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]

    def __enter__(self) -> "JobContext":
        if self.cpu_rng is not None:
            torch.set_rng_state(self.cpu_rng)
        if self.stream is not None:
            self._default_generator().graphsafe_set_state(self.cuda_generator)
            self._stream_context = torch.cuda.stream(self.stream)
            self._stream_context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu_rng = torch.get_rng_state()
        if self._stream_context is not None:
            self._stream_context.__exit__(*exc)
            self._stream_context = None
