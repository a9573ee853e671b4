"""The reference CNN (~7.7k parameters): conv blocks (conv -> ReLU -> norm -> dropout), max-pool, global average pool."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from normsweep import files

if TYPE_CHECKING:
    from normsweep.config import NormConfig

# The norms: name -> layer factory(channels, groups). The config's choices come from this table; each name needs a
# label in files.NORM_NAMES (the table's rows, read without torch) and a conf/norm/<name>.yaml.
NORM_LAYERS = {
    "bn": lambda channels, groups: nn.BatchNorm2d(channels),
    "gn": lambda channels, groups: nn.GroupNorm(groups, channels),
    "ln": lambda channels, groups: nn.GroupNorm(1, channels),  # one group: all channels and pixels of a sample
}
if set(NORM_LAYERS) != set(files.NORM_NAMES):
    raise ImportError(f"model.NORM_LAYERS {sorted(NORM_LAYERS)} and files.NORM_NAMES {sorted(files.NORM_NAMES)} "
                      "must name the same norms")
WIDE, NARROW = 16, 8  # channels of the conv blocks
NORM_WIDTHS = (NARROW, WIDE)  # channel counts of the layers a norm normalizes: norm.groups must divide each


def keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A float tensor shaped and laid out like `like`: 1.0 where an element is kept, 0.0 where it is dropped, each
    dropped with probability p (rounded to a multiple of 2**-16: 0.03 -> 0.0299988).

    Why not nn.Dropout: its float Bernoulli draw is a large part of a CPU step. One 64-bit draw gives four int16
    uniforms on [-32768, 32767], and the comparison writes the float mask directly, so applying it is one multiply.
    `like` must be dense (contiguous in some layout), as every norm output is.
    """
    n = like.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_(-(2**63), 2**63 - 1)
    # the uniforms in like's memory order, so that the compare and the multiply walk memory in one order
    uniform16 = words.view(torch.int16)[:n].as_strided(like.shape, like.stride())
    return torch.ge(uniform16, round(p * 65536) - 32768, out=torch.empty_like(like))


class NormDropout(nn.Module):
    """norm, then dropout, as one module so that dropout's 1/(1-p) rescale folds into the norm's affine
    weight and bias (16 numbers) instead of a pass over the activations; the result equals norm -> Dropout(p)."""

    def __init__(self, norm: str, channels: int, groups: int, p: float):
        super().__init__()
        if norm not in NORM_LAYERS:
            raise ValueError(f"norm={norm!r} is not one of {', '.join(NORM_LAYERS)}")
        self.norm = NORM_LAYERS[norm](channels, groups)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return self.norm(x)
        scale = 1.0 / (1.0 - self.p)
        norm = self.norm
        weight, bias = norm.weight * scale, norm.bias * scale
        if isinstance(norm, nn.BatchNorm2d):
            # training-mode batch norm updating the running statistics, exactly as nn.BatchNorm2d does
            norm.num_batches_tracked.add_(1)
            y = F.batch_norm(x, norm.running_mean, norm.running_var, weight, bias, True, norm.momentum, norm.eps)
        else:
            y = F.group_norm(x, norm.num_groups, weight, bias, norm.eps)
        return y * keep_mask(y, self.p)


class Net(nn.Module):
    def __init__(self, norm: NormConfig, dropout: float = 0.03):
        super().__init__()

        def block(c_in: int, c_out: int, k: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, k, bias=False), nn.ReLU(),
                                 NormDropout(norm.name, c_out, norm.groups, dropout))

        n, w = NARROW, WIDE
        self.features = nn.Sequential(
            block(1, n, 3),  # [B, 8, 26, 26]
            block(n, w, 3),  # [B, 16, 24, 24]
            nn.MaxPool2d(2),  # [B, 16, 12, 12]
            nn.Conv2d(w, n, 1, bias=False),  # transition, no block: [B, 8, 12, 12]
            block(n, w, 3),  # [B, 16, 10, 10]
            block(w, w, 3),  # [B, 16, 8, 8]
            block(w, w, 3),  # [B, 16, 6, 6]
            nn.AdaptiveAvgPool2d(1),  # global average pool: [B, 16, 1, 1]
            block(w, w, 1),
            nn.Conv2d(w, 10, 1, bias=False),  # [B, 10, 1, 1]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 1, 28, 28] normalized images -> [B, 10] log-probabilities."""
        return F.log_softmax(self.features(x).flatten(1), dim=1)


def build_model(norm: NormConfig, dropout: float, device: torch.device, threads: int) -> Net:
    """Net on device, laid out for speed. Channels-last (NHWC) conv weights make every activation channels-last:
    with a one-channel input, the weights' layout decides the first convolution's output layout. Where it was
    faster in CPU timings (README, Speed): group and layer norm always, batch norm only with one thread (its
    channels-last backward scales badly). On GPU the default layout."""
    faster = device.type == "cpu" and (norm.name != "bn" or threads == 1)
    return Net(norm, dropout).to(device, memory_format=torch.channels_last if faster else torch.contiguous_format)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
