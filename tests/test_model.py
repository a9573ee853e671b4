"""The reference CNN: size, output, and the dropout that replaces nn.Dropout."""
import pytest
import torch

from normsweep.config import NormConfig
from normsweep.model import Net, NormDropout, build_model, count_params, keep_mask


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_parameter_count_and_output(norm):
    model = Net(NormConfig(name=norm))
    assert count_params(model) == 7704  # 7528 conv weights + 176 norm affine parameters
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)  # log-probabilities


def test_keep_mask_drop_rate():
    torch.manual_seed(0)
    keep = keep_mask(torch.empty(400, 1000), 0.03)
    assert keep.dtype == torch.float32 and keep.shape == (400, 1000)
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    assert abs(1 - keep.mean().item() - 0.03) < 0.002  # 4e5 draws: std of the mean ~ 2.7e-4


@pytest.mark.parametrize("norm, threads, channels_last", [("gn", 1, True), ("gn", 2, True), ("ln", 2, True),
                                                          ("bn", 1, True), ("bn", 2, False)])
def test_build_model_layout(norm, threads, channels_last):
    model = build_model(NormConfig(name=norm), 0.03, torch.device("cpu"), threads)
    hidden = model.features[:2](torch.randn(4, 1, 28, 28))
    assert hidden.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_keep_mask_follows_the_layout():
    like = torch.empty(8, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    keep = keep_mask(like, 0.5)
    assert keep.shape == like.shape and keep.stride() == like.stride()


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_channels_last_model_computes_what_the_default_layout_computes(norm):
    """Channels-last (what build_model may choose on CPU): the same outputs and gradients up to rounding."""
    torch.manual_seed(0)
    default = Net(NormConfig(name=norm), dropout=0.0)
    fast = Net(NormConfig(name=norm), dropout=0.0).to(memory_format=torch.channels_last)
    fast.load_state_dict(default.state_dict())
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    hidden = fast.features[:2](x)  # two conv blocks: [16, 16, 24, 24]
    assert hidden.is_contiguous(memory_format=torch.channels_last) and not hidden.is_contiguous()
    out_default, out_fast = default(x), fast(x)
    # float32 kernels of the two layouts round differently: BatchNorm's outputs differ by up to ~1.5e-4 with one
    # thread, half that with two (and earlier tests leave torch's thread count as they set it)
    assert torch.allclose(out_default, out_fast, atol=3e-4)
    if norm == "bn":
        # Not elementwise comparable: ReLU -> BatchNorm makes the gradient ill-conditioned on some batches (ReLU
        # zeroes most of a channel, ties in max-pool), and float32 rounding differences between kernels grow to
        # percent level there in either layout, even against a float64 run.
        return
    torch.nn.functional.nll_loss(out_default, y).backward()
    torch.nn.functional.nll_loss(out_fast, y).backward()
    for p_default, p_fast in zip(default.parameters(), fast.parameters()):
        assert torch.allclose(p_default.grad, p_fast.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_norm_dropout_equals_norm_then_dropout(norm):
    """Folding 1/(1-p) into the affine gives what norm -> Dropout(p) gives with the same mask."""
    torch.manual_seed(1)
    layer = NormDropout(norm, 16, 4, 0.2)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 2)
        layer.norm.bias.uniform_(-1, 1)
    x = torch.randn(8, 16, 6, 6)
    state = torch.get_rng_state()
    out = layer(x)
    torch.set_rng_state(state)
    keep = keep_mask(x, 0.2)
    layer.train()
    reference = layer.norm(x) * keep / 0.8
    assert torch.allclose(out, reference, atol=1e-5)
    assert torch.equal(layer.eval()(x), layer.norm(x))


def test_a_norm_added_through_the_tables_trains(monkeypatch):
    """InstanceNorm by the recipe in docs/code.md: an entry in norms.NORMS (it needs pixels: the block after the
    global pool goes without it) and a layer in model.NORM_LAYERS. The fold of dropout into the affine does not know
    the layer, so the fallback applies it and then the rescale; one lane and two fused lanes train a step."""
    from torch import nn

    from normsweep import model as model_module
    from normsweep import norms
    from normsweep.config import Config, DataConfig
    from normsweep.data import load_data
    from normsweep.step import Lane, Step, make_optimizer, momentum_buffers
    from normsweep.train import DeviceData, drain

    monkeypatch.setattr(norms, "NORMS", {**norms.NORMS, "in": norms.Norm("InstanceNorm", needs_pixels=True)})
    monkeypatch.setattr(model_module, "NORMS", norms.NORMS)
    monkeypatch.setitem(model_module.NORM_LAYERS, "in",
                        lambda channels, groups, lanes: nn.InstanceNorm2d(lanes * channels, affine=True))
    cfg = Config(norm=NormConfig(name="in"), batch_size=16, epochs=1, data=DataConfig(name="fake"))
    data = DeviceData.from_dataset(load_data("fake", ".", train_limit=32, test_limit=16), torch.device("cpu"))
    for lanes in (1, 2):
        torch.manual_seed(0)
        net = Net(cfg.norm, 0.1, lanes=lanes)
        assert not any(isinstance(m, nn.InstanceNorm2d) for m in net.features[8].modules())  # after the pool
        before = [p.detach().clone() for p in net.parameters()]
        optimizer = make_optimizer(net.parameters(), cfg)
        lane_list = [Lane(cfg, torch.Generator().manual_seed(k), 0, momentum_buffers(optimizer) if lanes == 1 else
                          [torch.zeros(p.shape[0] // lanes, *p.shape[1:]) for p in net.parameters()])
                     for k in range(lanes)]
        metrics = drain(Step(net, lane_list, data, 2, capture=False).epoch())
        assert len(metrics) == lanes and all(m["train_loss"] == m["train_loss"] for m in metrics)  # finite
        assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
