"""The one training step (what CUDA graphs capture), run eagerly on CPU: its schedule is torch's OneCycleLR, its
update is torch's SGD, an epoch of it trains what a plain eager loop trains, and a fused group of lanes trains what
its jobs train alone."""
import math

import pytest
import torch
import torch.nn.functional as F

from normsweep.config import Config, DataConfig, NormConfig, OptimConfig, RegConfig
from normsweep.data import load_data
from normsweep.model import Net, build_model, lane_state, stack_states
from normsweep.step import (Lane, Step, add_l1_grad, batch_sizes, make_optimizer, make_scheduler, momentum_buffers,
                            schedule_table, sgd_update)
from normsweep.train import DeviceData, drain, split_batches, steps_per_epoch

CPU = torch.device("cpu")


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


def eager_epoch(model: Net, optimizer, scheduler, data: DeviceData, cfg: Config, generator: torch.Generator) -> dict:
    """The reference the one training step is checked against: a plain eager loop with torch's SGD and OneCycleLR,
    drawing its shuffle, augmentation and dropout from generator in the order the step draws them."""
    model.train()
    n = len(data.train_labels)
    loss_sum, correct = 0.0, 0
    for idx in split_batches(torch.randperm(n, generator=generator), cfg.batch_size):
        x, y = data.train_batch(idx, cfg.data.augment, generator)
        optimizer.zero_grad(set_to_none=True)
        out = model(x, [generator])
        loss = F.nll_loss(out, y)
        loss.backward()
        if cfg.reg.l1 > 0:
            add_l1_grad(list(model.parameters()), cfg.reg.l1)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * len(idx)
        correct += (out.argmax(1) == y).sum().item()
    return {"train_loss": loss_sum / n, "train_acc": 100.0 * correct / n}


def job(cfg: Config, train_limit: int) -> tuple:
    """A job's model, optimizer, scheduler and generator as train.py sets them up: seeded, then the generator takes
    over where the weights' draws left torch's."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.norm, cfg.dropout, CPU, torch.get_num_threads())
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch(train_limit, cfg.batch_size))
    generator = torch.Generator()
    generator.set_state(torch.get_rng_state())
    return model, optimizer, scheduler, generator


def fake_data(train_limit: int) -> DeviceData:
    return DeviceData.from_dataset(load_data("fake", ".", train_limit=train_limit, test_limit=50), CPU)


def close(ours, theirs, slack: float = 0.0) -> None:
    """Float rounding differs between two ways of one computation (the order of a sum, another kernel): by far less
    than 1e-3 of a tensor's largest entry, plus `slack` where L1's sign can flip (see below)."""
    for a, b in zip(ours, theirs):
        assert (a.double() - b.double()).abs().max() <= 1e-3 * b.double().abs().max() + 1e-7 + slack


def l1_slack(cfg: Config, steps: int) -> tuple[float, float]:
    """L1 adds more: a weight within rounding of zero can take sign(w) = +1 in one and -1 in the other, so each step
    can part an element's gradient by 2 * l1; the momentum buffer (buf = m * buf + g) adds those up to 2 * l1 *
    steps, and the weights move by at most max_lr times that per step. -> (weights' slack, buffers' slack): bounds
    from the arithmetic, not from one machine's thread count or CPU."""
    in_buffer = 2 * cfg.reg.l1 * steps
    return cfg.optim.max_lr * in_buffer * steps, in_buffer


@pytest.mark.parametrize("norm, batch_size, l1, l2, train_limit", [
    ("bn", 32, 0.0, 0.0, 200),  # a shorter last batch of 8
    ("gn", 32, 0.001, 0.0, 129),  # a lone last sample joins the batch before it: 32 x 3 + 33
    ("ln", 50, 0.001, 0.002, 100),  # full batches only
])
def test_the_step_trains_what_the_eager_reference_loop_trains(norm, batch_size, l1, l2, train_limit):
    """Same shuffle, same augmentation and dropout draws (the same generator calls in the same order), same update:
    after an epoch the metrics, weights, BatchNorm statistics and momentum agree up to float rounding, and the
    generators are where the same draws leave them."""
    cfg = Config(norm=NormConfig(name=norm), batch_size=batch_size, epochs=2, reg=RegConfig(l1=l1, l2=l2),
                 data=DataConfig(name="fake", train_limit=train_limit))
    data = fake_data(train_limit)
    eager_model, eager_opt, eager_sched, eager_gen = job(cfg, train_limit)
    model, optimizer, _, generator = job(cfg, train_limit)
    steps = steps_per_epoch(train_limit, batch_size)
    step = Step(model, [Lane(cfg, generator, 0, momentum_buffers(optimizer))], data, steps, capture=False)
    expected = eager_epoch(eager_model, eager_opt, eager_sched, data, cfg, eager_gen)
    (got,) = drain(step.epoch())
    assert got["train_acc"] == expected["train_acc"]
    assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)
    assert int(step.step_count) == steps and int(step.position) == steps - (step.last > 0)
    assert torch.equal(generator.get_state(), eager_gen.get_state())
    weights_slack, buffers_slack = l1_slack(cfg, steps)
    close(model.state_dict().values(), eager_model.state_dict().values(), weights_slack)
    close(momentum_buffers(optimizer), momentum_buffers(eager_opt), buffers_slack)


LANES = [  # what may differ between the jobs of one fused group
    dict(seed=1, reg=RegConfig(l1=0.001), dropout=0.03),
    dict(seed=2, reg=RegConfig(l2=0.01), dropout=0.1, optim=OptimConfig(max_lr=0.05, momentum=0.8)),
    dict(seed=3, reg=RegConfig(l1=0.002, l2=0.002), dropout=0.0),
]


def fused(cfgs: list[Config], data: DeviceData, train_limit: int, poison: int | None = None) -> tuple:
    """The jobs of cfgs as one Net of lanes, trained one epoch; poison: a lane whose weights start as NaN."""
    jobs = [job(cfg, train_limit) for cfg in cfgs]
    model = build_model(cfgs[0].norm, [c.dropout for c in cfgs], CPU, torch.get_num_threads(), lanes=len(cfgs))
    model.load_state_dict(stack_states([m.state_dict() for m, *_ in jobs]))
    if poison is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.unflatten(0, (len(cfgs), -1))[poison].fill_(float("nan"))
    lanes = [Lane(c, g, 0, momentum_buffers(o)) for c, (m, o, s, g) in zip(cfgs, jobs)]
    step = Step(model, lanes, data, steps_per_epoch(train_limit, cfgs[0].batch_size), capture=False)
    return step, drain(step.epoch()), [g for *_, g in jobs]


@pytest.fixture
def one_thread():
    """One torch thread, whatever the machine or an earlier test set: with two, oneDNN's BatchNorm kernels split their
    sums by thread, and over ReLU -> BatchNorm's ill-conditioned gradients that rounding grows past any tolerance
    that would still catch a wrong lane."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_a_fused_group_trains_what_its_jobs_train_alone(norm, one_thread):
    """Three jobs with other seeds, L1, L2, learning rates, momenta and dropout, as one Net of three lanes: each
    lane's weights, statistics, momentum and metrics are its job's alone, up to float rounding, and each lane drew
    exactly what its job draws (its generator ends where the job's does). Three steps: GroupNorm's groups of four
    channels on the fake digits' blank borders are ill-conditioned, so rounding grows fast with more (two layouts of
    one job part as much)."""
    train_limit = 96
    cfgs = [Config(norm=NormConfig(name=norm), batch_size=32, epochs=2, data=DataConfig(name="fake", augment=True),
                   **lane) for lane in LANES]
    data = fake_data(train_limit)
    step, metrics, generators = fused(cfgs, data, train_limit)
    steps = steps_per_epoch(train_limit, 32)
    for lane, cfg in enumerate(cfgs):
        model, optimizer, _, generator = job(cfg, train_limit)
        alone = Step(model, [Lane(cfg, generator, 0, momentum_buffers(optimizer))], data, steps, capture=False)
        (expected,) = drain(alone.epoch())
        assert torch.equal(generators[lane].get_state(), generator.get_state())
        assert metrics[lane]["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-4)
        assert abs(metrics[lane]["train_acc"] - expected["train_acc"]) <= 100 / train_limit  # one image at most
        weights_slack, buffers_slack = l1_slack(cfg, steps)
        close(lane_state(step.model, lane).values(), model.state_dict().values(), weights_slack)
        close(step.lane_buffers(lane), momentum_buffers(optimizer), buffers_slack)


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_a_nan_in_one_lane_leaves_the_others_bit_identical(norm):
    """A lane whose weights are NaN (a job that diverged) changes nothing in the other lanes: the grouped convs,
    per-lane norms and summed losses never mix lanes."""
    train_limit = 100
    cfgs = [Config(norm=NormConfig(name=norm), batch_size=25, epochs=2, data=DataConfig(name="fake"), **lane)
            for lane in LANES]
    data = fake_data(train_limit)
    clean, clean_metrics, _ = fused(cfgs, data, train_limit)
    poisoned, poisoned_metrics, _ = fused(cfgs, data, train_limit, poison=1)
    assert math.isnan(poisoned_metrics[1]["train_loss"])
    for lane in (0, 2):
        assert poisoned_metrics[lane] == clean_metrics[lane]
        for a, b in zip(lane_state(poisoned.model, lane).values(), lane_state(clean.model, lane).values()):
            assert torch.equal(a, b)


def test_restore_undoes_the_steps_taken_since_the_snapshot():
    """What the capture does after its warm-up steps, on any device: every weight, buffer, momentum, counter and
    sum is back where it was."""
    cfg = Config(batch_size=32, epochs=2, reg=RegConfig(l1=0.001, l2=0.002), data=DataConfig(name="fake"))
    model, optimizer, _, generator = job(cfg, 100)
    step = Step(model, [Lane(cfg, generator, 0, momentum_buffers(optimizer))], fake_data(100), 4, capture=False)
    saved = step.snapshot()
    epoch = step.epoch()
    next(epoch), next(epoch)
    assert not all(torch.equal(a, b) for a, b in zip(step.snapshot(), saved))
    step.restore(saved)
    assert all(torch.equal(a, b) for a, b in zip(step.snapshot(), saved))
