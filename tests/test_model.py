"""The reference CNN: size, output, and the dropout that replaces nn.Dropout."""
import pytest
import torch

from normsweep.model import Net, NormDropout, count_params, drop_mask


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_parameter_count_and_output(norm):
    model = Net(norm)
    assert count_params(model) == 7704  # 7528 conv weights + 176 norm affine parameters
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)  # log-probabilities


def test_drop_mask_rate():
    torch.manual_seed(0)
    mask = drop_mask(torch.Size([400, 1000]), 0.03, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (400, 1000)
    assert abs(mask.float().mean().item() - 0.03) < 0.002  # 4e5 draws: std of the mean ~ 2.7e-4


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
    mask = drop_mask(x.shape, 0.2, x.device)
    layer.train()
    reference = layer.norm(x) * (~mask) / 0.8
    assert torch.allclose(out, reference, atol=1e-5)
    assert torch.equal(layer.eval()(x), layer.norm(x))
