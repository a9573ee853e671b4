"""The reference CNN: size, output, and the dropout that replaces nn.Dropout."""
import pytest
import torch

from normsweep.model import MaxPool2x2, Net, NormDropout, count_params, keep_mask


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_parameter_count_and_output(norm):
    model = Net(norm)
    assert count_params(model) == 7704  # 7528 conv weights + 176 norm affine parameters
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)  # log-probabilities


def test_keep_mask_drop_rate():
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([400, 1000]), 0.03, torch.float32, torch.device("cpu"))
    assert keep.dtype == torch.float32 and keep.shape == (400, 1000)
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    assert abs(1 - keep.mean().item() - 0.03) < 0.002  # 4e5 draws: std of the mean ~ 2.7e-4


def test_max_pool_matches_torch_including_gradients():
    x = torch.randn(4, 16, 24, 24).relu().requires_grad_()  # relu: many ties, as in the model
    grad = torch.randn(4, 16, 12, 12)
    expected = torch.nn.functional.max_pool2d(x, 2)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    out = MaxPool2x2()(x)
    (out_grad,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(out, expected) and torch.equal(out_grad, expected_grad)


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
    keep = keep_mask(x.shape, 0.2, x.dtype, x.device)
    layer.train()
    reference = layer.norm(x) * keep / 0.8
    assert torch.allclose(out, reference, atol=1e-5)
    assert torch.equal(layer.eval()(x), layer.norm(x))
