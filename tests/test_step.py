"""The device-side step (what CUDA graphs capture), run eagerly on CPU: its schedule is torch's OneCycleLR, its
update is torch's SGD, and an epoch of it trains what the eager loop trains."""
import copy

import pytest
import torch

from normsweep.config import Config, DataConfig, NormConfig, OptimConfig, RegConfig
from normsweep.data import load_data
from normsweep.model import Net
from normsweep.step import (DeviceStep, JobContext, batch_sizes, make_optimizer, make_scheduler, momentum_buffers,
                            schedule_table, sgd_update)
from normsweep.train import DeviceData, drain, split_batches, train_one_epoch


@pytest.mark.parametrize("n, batch_size", [(200, 64), (129, 64), (130, 64), (64, 64), (50, 64), (3, 2), (1000, 7)])
def test_batch_sizes_cut_an_epoch_as_split_batches_does(n, batch_size):
    full, last = batch_sizes(n, batch_size)
    expected = [len(b) for b in split_batches(torch.arange(n), batch_size)]
    assert [batch_size] * full + ([last] if last else []) == expected


@pytest.mark.parametrize("cycle_momentum", [True, False])
def test_schedule_table_is_what_one_cycle_sets_step_by_step(cycle_momentum):
    cfg = Config(epochs=3, optim=OptimConfig(cycle_momentum=cycle_momentum))
    lrs, momenta = schedule_table(cfg, steps_per_epoch=5)
    optimizer = make_optimizer([torch.zeros(2, requires_grad=True)], cfg)
    scheduler = make_scheduler(optimizer, cfg, 5)
    seen_lr, seen_momentum = [], []
    for _ in range(15):
        seen_lr.append(optimizer.param_groups[0]["lr"])
        seen_momentum.append(optimizer.param_groups[0]["momentum"])
        optimizer.step()
        scheduler.step()
    assert lrs == seen_lr and momenta == seen_momentum
    assert lrs[0] == pytest.approx(cfg.optim.max_lr / 25) and max(lrs) == pytest.approx(cfg.optim.max_lr, rel=0.01)
    assert len(set(momenta)) > 1 if cycle_momentum else set(momenta) == {cfg.optim.momentum}


@pytest.mark.parametrize("l2", [0.0, 0.01])
def test_sgd_update_matches_torch_sgd_with_one_cycle_step_for_step(l2):
    cfg = Config(epochs=2, reg=RegConfig(l2=l2))
    torch.manual_seed(0)
    ours = [torch.randn(5, 3), torch.randn(7)]
    theirs = [p.clone().requires_grad_() for p in ours]
    optimizer = make_optimizer(theirs, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=10)
    buffers = [torch.zeros_like(p) for p in ours]
    lrs, momenta = schedule_table(cfg, steps_per_epoch=10)
    for step in range(20):
        grads = [torch.randn_like(p) for p in ours]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        optimizer.step()
        scheduler.step()
        sgd_update(ours, grads, buffers, torch.tensor(lrs[step]), torch.tensor(momenta[step]), l2)
        for a, b in zip(ours, theirs):
            assert torch.allclose(a, b.detach(), rtol=1e-6, atol=1e-7), f"step {step}"
    for a, b in zip(buffers, momentum_buffers(optimizer)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def _setup(norm: str, batch_size: int, l1: float, l2: float, train_limit: int):
    cfg = Config(norm=NormConfig(name=norm), batch_size=batch_size, epochs=2, reg=RegConfig(l1=l1, l2=l2),
                 data=DataConfig(name="fake", train_limit=train_limit))
    data = DeviceData.from_dataset(load_data("fake", ".", train_limit=train_limit, test_limit=50), torch.device("cpu"))
    torch.manual_seed(3)
    model = Net(cfg.norm, cfg.dropout)
    steps_per_epoch = len(split_batches(torch.arange(train_limit), batch_size))
    optimizer = make_optimizer(model.parameters(), cfg)
    return cfg, data, model, optimizer, make_scheduler(optimizer, cfg, steps_per_epoch), steps_per_epoch


@pytest.mark.parametrize("norm, batch_size, l1, l2, train_limit", [
    ("bn", 32, 0.0, 0.0, 200),  # a shorter last batch of 8
    ("gn", 32, 0.001, 0.0, 129),  # a lone last sample joins the batch before it: 32 x 3 + 33
    ("ln", 50, 0.001, 0.002, 100),  # full batches only
])
def test_device_step_trains_what_the_eager_loop_trains(norm, batch_size, l1, l2, train_limit):
    """Same shuffle, same augmentation and dropout draws (the same RNG calls in the same order), same update: after
    an epoch the metrics, weights, BatchNorm statistics and momentum agree up to float rounding (which a second
    epoch amplifies, most for BatchNorm after ReLU: see test_model)."""
    cfg, data, eager_model, eager_opt, eager_sched, steps_per_epoch = _setup(norm, batch_size, l1, l2, train_limit)
    model = copy.deepcopy(eager_model)
    optimizer = make_optimizer(model.parameters(), cfg)
    step = DeviceStep(model, optimizer, data, cfg, steps_per_epoch, steps_done=0, capture=False)
    torch.manual_seed(10)
    expected = drain(train_one_epoch(eager_model, eager_opt, eager_sched, data, cfg))
    torch.manual_seed(10)
    got = drain(step.epoch())
    assert got["train_acc"] == expected["train_acc"]
    assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
    assert int(step.step_count) == steps_per_epoch and int(step.position) == steps_per_epoch - (step.last > 0)

    # Float rounding differs between the two (the order of a sum), by far less than 1e-3 of a tensor's largest
    # entry. L1 adds more: a weight within rounding of zero can take sign(w) = +1 in one and -1 in the other, so
    # each step can part an element's gradient by 2 * l1; the momentum buffer (buf = m * buf + g) adds those up
    # to 2 * l1 * steps, and the weights move by at most max_lr times that per step. Bounds from the arithmetic,
    # not from one machine's thread count or CPU.
    steps = steps_per_epoch
    flips_in_buffer = 2 * l1 * steps
    flips_in_weights = cfg.optim.max_lr * flips_in_buffer * steps

    def close(ours, theirs, slack):
        for a, b in zip(ours, theirs):
            assert (a.double() - b.double()).abs().max() <= 1e-3 * b.double().abs().max() + 1e-7 + slack

    close(model.state_dict().values(), eager_model.state_dict().values(), flips_in_weights)
    close(momentum_buffers(optimizer), momentum_buffers(eager_opt), flips_in_buffer)


def test_job_context_keeps_each_jobs_random_stream_its_own():
    """Two jobs taking turns draw what each draws alone: the context swaps torch's RNG per job."""
    def draws(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [torch.rand(3) for _ in range(4)]

    alone = {seed: draws(seed) for seed in (1, 2)}
    contexts = {seed: JobContext(torch.device("cpu")) for seed in (1, 2)}
    for seed, context in contexts.items():
        with context:
            torch.manual_seed(seed)
    taken = {1: [], 2: []}
    for _ in range(4):
        for seed, context in contexts.items():
            with context:
                taken[seed].append(torch.rand(3))
    for seed in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(taken[seed], alone[seed]))


def test_restore_undoes_the_steps_taken_since_the_snapshot():
    """What the capture does after its warm-up steps, on any device: every weight, buffer, momentum, counter and
    sum is back where it was."""
    cfg, data, model, optimizer, _, steps_per_epoch = _setup("bn", 32, 0.001, 0.002, 100)
    step = DeviceStep(model, optimizer, data, cfg, steps_per_epoch, steps_done=0, capture=False)
    saved = step.snapshot()
    epoch = step.epoch()
    next(epoch), next(epoch)
    assert not all(torch.equal(a, b) for a, b in zip(step.snapshot(), saved))
    step.restore(saved)
    assert all(torch.equal(a, b) for a, b in zip(step.snapshot(), saved))
