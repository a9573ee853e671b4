"""The one training step, for one job or a group of jobs fused into one Net of lanes (model.py): every per-step value
on the device (batch position, each lane's OneCycle schedule, momentum SGD, summed metrics), so that on CUDA it is
captured once as a CUDA graph and replayed; on CPU the same step runs eagerly. Each lane draws its shuffle,
augmentation and dropout from its own job's generator, so a job trains on what it would draw alone."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from normsweep.config import Config
from normsweep.model import Net

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


@torch.no_grad()
def add_l1_grad_lanes(params: list[torch.Tensor], l1: torch.Tensor) -> None:
    """add_l1_grad with each lane's own factor (l1: [lanes]; 0 adds nothing to that lane)."""
    lanes = len(l1)
    for p in params:
        p.grad.unflatten(0, (lanes, -1)).add_(p.unflatten(0, (lanes, -1)).sign() * l1.view((lanes,) + (1,) * p.dim()))


@torch.no_grad()
def sgd_update_lanes(params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor],
                     lr: torch.Tensor, momentum: torch.Tensor, weight_decay: Optional[torch.Tensor]) -> None:
    """sgd_update for a Net of lanes: lr, momentum and weight_decay are [lanes] vectors, each applied to its lane's
    rows of every tensor (dim 0 is lanes x rows), in the same order of operations as one job's update."""
    lanes = len(lr)
    for p, g, buf in zip(params, grads, buffers):
        shape = (lanes,) + (1,) * p.dim()
        p_lanes, g_lanes, buf_lanes = (t.unflatten(0, (lanes, -1)) for t in (p, g, buf))
        if weight_decay is not None:
            g_lanes = g_lanes + p_lanes * weight_decay.view(shape)
        buf_lanes.mul_(momentum.view(shape)).add_(g_lanes)
        p_lanes.sub_(buf_lanes * lr.view(shape))


def batch_sizes(n: int, batch_size: int) -> tuple[int, int]:
    """-> (full batches of batch_size, size of the last batch or 0), as train.split_batches cuts an epoch: the last
    batch is shorter, or batch_size + 1 when a lone sample joined it."""
    full, rest = divmod(n, batch_size)
    if rest == 1 and full > 0:
        return full - 1, batch_size + 1
    return full, rest


@dataclass
class Lane:
    """One job's part of a step: its settings (l1, l2, schedule, dropout), its generator, where its schedule is (steps
    taken) and its momentum buffers (its optimizer's, in the order of the model's parameters)."""

    cfg: Config
    generator: torch.Generator
    steps_done: int
    buffers: list[torch.Tensor]


class Step:
    """The training step of a Net of len(lanes) lanes (one lane: one job), with static shapes. Each lane's batches of
    an epoch are read from its row of `order` (a static buffer its shuffle is copied into) at a device-side
    position; a shorter last batch has its own step (and graph), so every sample of the epoch is trained on. The
    lanes share the batch size, data, augmentation and precision; with capture=True (CUDA) each step is a graph."""

    def __init__(self, model: Net, lanes: list[Lane], data, steps_per_epoch: int, capture: bool):
        device = data.train_labels.device
        n, k = len(data.train_labels), len(lanes)
        first = lanes[0].cfg
        self.model, self.data, self.lanes, self.n = model, data, lanes, n
        self.batch_size, self.augment, self.precision = first.batch_size, first.data.augment, first.precision
        self.params = list(model.parameters())
        # the lanes' momentum, stacked as the parameters are (lane-major rows)
        self.buffers = [torch.cat(list(bufs)) if k > 1 else bufs[0] for bufs in zip(*(lane.buffers for lane in lanes))]
        self.generators = [lane.generator for lane in lanes]
        tables = [schedule_table(lane.cfg, steps_per_epoch) for lane in lanes]
        self.total = len(tables[0][0])
        self.lrs = torch.tensor([lr for lrs, _ in tables for lr in lrs], dtype=torch.float32, device=device)
        self.momenta = torch.tensor([m for _, ms in tables for m in ms], dtype=torch.float32, device=device)
        self.lane_start = torch.arange(k, device=device) * self.total  # lane i's schedule starts here in lrs
        self.step_count = torch.tensor([lane.steps_done for lane in lanes], device=device)  # per lane: its schedule
        self.weight_decay = torch.tensor([lane.cfg.reg.l2 for lane in lanes], device=device)
        self.l1 = torch.tensor([lane.cfg.reg.l1 for lane in lanes], device=device)
        self.any_l1 = any(lane.cfg.reg.l1 > 0 for lane in lanes)
        self.any_wd = any(lane.cfg.reg.l2 for lane in lanes)
        self.position = torch.zeros((), dtype=torch.int64, device=device)  # full batches done this epoch
        self.order = torch.arange(n, device=device).repeat(k, 1)  # [lanes, n]: each lane's shuffle of the epoch
        self.loss_sum = torch.zeros(k, device=device)
        self.correct = torch.zeros(k, dtype=torch.int64, device=device)
        self.full, self.last = batch_sizes(n, self.batch_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture()

    def _batch(self, size: int) -> torch.Tensor:
        """[lanes, size] sample indices: the full batch at the device-side position (index_select: no host sync),
        or the epoch's last, shorter one."""
        if size != self.batch_size:
            return self.order[:, self.full * self.batch_size:]
        rows = self.order[:, : self.full * self.batch_size].view(len(self.lanes), self.full, self.batch_size)
        idx = rows.index_select(1, self.position.view(1)).squeeze(1)
        self.position.add_(1)
        return idx

    def _step(self, size: int) -> None:
        idx = self._batch(size)
        batches = [self.data.train_batch(row, self.augment, g) for row, g in zip(idx, self.generators)]
        single = len(self.lanes) == 1
        x = batches[0][0] if single else torch.cat([b[0] for b in batches], dim=1)  # [B, lanes, 28, 28]
        y = batches[0][1] if single else torch.stack([b[1] for b in batches])  # [B] or [lanes, B]
        for p in self.params:
            p.grad = None
        # no autocast cache: a graph must not keep casts from its capture
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16",
                            cache_enabled=False):
            out = self.model(x, self.generators)
        out = out.float()
        if single:
            loss = lane_losses = F.nll_loss(out, y)
            right = (out.detach().argmax(1) == y).sum()
        else:  # the sum of the lanes' mean losses: each lane's gradient is its own loss's
            lane_losses = -out.gather(2, y.t().unsqueeze(2)).squeeze(2).mean(0)  # [lanes]
            loss = lane_losses.sum()
            right = (out.detach().argmax(2) == y.t()).sum(0)
        loss.backward()
        self._update()
        self.loss_sum.add_(lane_losses.detach() * size)
        self.correct.add_(right)

    def _update(self) -> None:
        grads = [p.grad for p in self.params]
        index = self.lane_start + self.step_count
        lr, momentum = self.lrs.index_select(0, index), self.momenta.index_select(0, index)
        if len(self.lanes) == 1:  # one job: torch's SGD arithmetic with scalars, as the tests check against
            if self.any_l1:
                add_l1_grad(self.params, self.lanes[0].cfg.reg.l1)
            sgd_update(self.params, grads, self.buffers, lr.squeeze(0), momentum.squeeze(0),
                       self.lanes[0].cfg.reg.l2)
        else:
            if self.any_l1:
                add_l1_grad_lanes(self.params, self.l1)
            sgd_update_lanes(self.params, grads, self.buffers, lr, momentum,
                             self.weight_decay if self.any_wd else None)
        self.step_count.add_(1)

    def lane_buffers(self, lane: int) -> list[torch.Tensor]:
        """Lane's momentum buffers, one per parameter (views into the stacked ones)."""
        k = len(self.lanes)
        return [buf.unflatten(0, (k, -1))[lane] for buf in self.buffers]

    def sizes_once(self) -> list[int]:
        """The distinct batch sizes of an epoch: one step (and one graph) each."""
        return ([self.batch_size] if self.full else []) + ([self.last] if self.last else [])

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
        """Warm up each step eagerly, capture it, then put back every tensor and generator as they were: neither
        the warm-up nor the capture trains. Both happen on a side stream, as PyTorch's CUDA-graph notes require;
        each lane's generator is registered with every graph, which then draws from it at each replay."""
        saved = self.snapshot()
        states = [g.get_state() for g in self.generators]
        current, side = torch.cuda.current_stream(), torch.cuda.Stream(self.order.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for size in self.sizes_once():
                for _ in range(WARMUP_STEPS):
                    self.position.zero_()
                    self._step(size)
                graph = torch.cuda.CUDAGraph()
                for generator in self.generators:
                    graph.register_generator_state(generator)
                self.position.zero_()
                with torch.cuda.graph(graph, stream=side):
                    self._step(size)
                self.graphs[size] = graph
            self.restore(saved)
        current.wait_stream(side)
        for generator, state in zip(self.generators, states):
            generator.set_state(state)

    def _run(self, size: int) -> None:
        graph = self.graphs.get(size)
        if graph is None:
            self._step(size)
        else:
            graph.replay()

    def epoch(self, progress: Optional[Callable] = None) -> Iterator[None]:
        """Train one epoch, yielding after every step; returns each lane's {'train_loss', 'train_acc'} (one host
        sync, at the end). Divergence is told at the end: a graph cannot stop mid-epoch."""
        self.model.train()
        for row, generator in zip(self.order, self.generators):
            row.copy_(torch.randperm(self.n, device=self.order.device, generator=generator))
        self.position.zero_()
        self.loss_sum.zero_()
        self.correct.zero_()
        sizes = [self.batch_size] * self.full + ([self.last] if self.last else [])
        for size in progress(sizes) if progress else sizes:
            self._run(size)
            yield
        losses, correct = self.loss_sum.tolist(), self.correct.tolist()
        return [{"train_loss": loss / self.n, "train_acc": 100.0 * right / self.n} for loss, right in zip(losses, correct)]
