"""The reference CNN (~7.7k parameters): conv blocks (conv -> ReLU -> norm -> dropout), max-pool, global average pool.
One Net can hold several models of the same shape side by side, as lanes (horizontal fusion, HFTA): every conv is one
grouped conv over the lanes' channels, every norm keeps each lane's own statistics and groups, each lane has its own
dropout rate and random draws. One lane is the plain network; its state_dict is one job's."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from normsweep.norms import NARROW, NORMS, WIDE

if TYPE_CHECKING:
    from normsweep.config import NormConfig

# The norms' layers: name -> layer factory(channels, groups, lanes) over lanes x channels, each lane normalized on
# its own. The names and what they need are norms.NORMS (torch-free: the schema and the collector read it).
NORM_LAYERS = {
    "bn": lambda channels, groups, lanes: nn.BatchNorm2d(lanes * channels),  # per-channel statistics
    "gn": lambda channels, groups, lanes: nn.GroupNorm(lanes * groups, lanes * channels),  # groups never span lanes
    "ln": lambda channels, groups, lanes: nn.GroupNorm(lanes, lanes * channels),  # one group per lane: a sample's all
}
if set(NORM_LAYERS) != set(NORMS):
    raise ImportError(f"model.NORM_LAYERS {sorted(NORM_LAYERS)} and norms.NORMS {sorted(NORMS)} must name the same "
                      "norms")


def keep_mask(like: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A float tensor shaped and laid out like `like`: 1.0 where an element is kept, 0.0 where it is dropped, each
    dropped with probability p (rounded to a multiple of 2**-16: 0.03 -> 0.0299988).

    Why not nn.Dropout: its float Bernoulli draw is a large part of a CPU step. One 64-bit draw gives four int16
    uniforms on [-32768, 32767], and the comparison writes the float mask directly, so applying it is one multiply.
    `like` must be dense (contiguous in some layout), as every norm output is.
    """
    n = like.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_(-(2**63), 2**63 - 1,
                                                                                     generator=generator)
    # compared as flat vectors, then viewed in like's memory order (the k-th uniform decides the element at memory
    # position k): the same compare on 4-d channels-last views was ~10x slower on CPU (1.25 against 0.09 ms for a
    # [64, 16, 24, 24] mask, one thread), ~6 % of a step
    keep = torch.ge(words.view(torch.int16)[:n], round(p * 65536) - 32768,
                    out=torch.empty(n, dtype=like.dtype, device=like.device))
    return keep.as_strided(like.shape, like.stride())


class Draws:
    """The random generators of a Net's lanes for its next forward pass (None: torch's default generator), shared by
    its dropout layers: each lane draws its masks from its own job's generator, as the job would alone."""

    def __init__(self) -> None:
        self.generators: list[torch.Generator | None] | None = None


class NormDropout(nn.Module):
    """norm, then dropout, as one module so that dropout's 1/(1-p) rescale folds into the norm's affine
    weight and bias (16 numbers) instead of a pass over the activations; the result equals norm -> Dropout(p).
    With lanes, each lane's channels have its own p and draw their mask from its own generator."""

    def __init__(self, norm: str, channels: int, groups: int, p: float | list[float], draws: Draws | None = None):
        super().__init__()
        if norm not in NORM_LAYERS:
            raise ValueError(f"norm={norm!r} is not one of {', '.join(NORM_LAYERS)}")
        self.ps = [float(p)] if isinstance(p, (int, float)) else [float(v) for v in p]
        self.channels = channels
        self.norm = NORM_LAYERS[norm](channels, groups, len(self.ps))
        self.draws = draws or Draws()
        # 1/(1-p) for every channel (a buffer, so it moves with the model; not in state_dict: a job's checkpoint
        # holds the norm's own tensors only)
        scale = torch.tensor([1.0 / (1.0 - p) for p in self.ps]).repeat_interleave(channels)
        self.register_buffer("scale", scale, persistent=False)

    @property
    def p(self) -> float:
        return self.ps[0]

    def _mask(self, y: torch.Tensor) -> torch.Tensor:
        generators = self.draws.generators or [None] * len(self.ps)
        if len(self.ps) == 1:
            return keep_mask(y, self.ps[0], generators[0])
        # each lane's mask drawn as that job's alone would be: its shape, its layout, its generator
        layout = torch.channels_last if not y.is_contiguous() and y.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format
        like = torch.empty(y.shape[0], self.channels, *y.shape[2:], device=y.device, dtype=y.dtype,
                           memory_format=layout)
        # a lane without dropout draws nothing, as its job alone draws nothing
        return torch.cat([keep_mask(like, p, g) if p else torch.ones_like(like) for p, g in zip(self.ps, generators)],
                         dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not any(self.ps):
            return self.norm(x)
        norm = self.norm
        weight = bias = None
        if type(norm) in (nn.BatchNorm2d, nn.GroupNorm):  # the fold: the rescale inside the affine
            if len(self.ps) == 1:  # a 0-dim scale: one job's arithmetic exactly as before lanes came in
                weight, bias = norm.weight * (1.0 / (1.0 - self.ps[0])), norm.bias * (1.0 / (1.0 - self.ps[0]))
            else:
                weight, bias = norm.weight * self.scale, norm.bias * self.scale
        if type(norm) is nn.BatchNorm2d:
            # training-mode batch norm updating the running statistics, exactly as nn.BatchNorm2d does
            norm.num_batches_tracked.add_(1)
            y = F.batch_norm(x, norm.running_mean, norm.running_var, weight, bias, True, norm.momentum, norm.eps)
        elif type(norm) is nn.GroupNorm:
            y = F.group_norm(x, norm.num_groups, weight, bias, norm.eps)
        else:  # a layer this fold does not know: the layer itself, then the rescale as a pass of its own
            scale = self.scale.view(1, -1, *([1] * (x.dim() - 2))) if len(self.ps) > 1 else 1.0 / (1.0 - self.ps[0])
            y = norm(x) * scale
        return y * self._mask(y)


class Net(nn.Module):
    """lanes models in one: input [B, lanes * channels, H, W] (each lane its own images), output [B, lanes, classes];
    with one lane (the default) [B, channels, H, W] -> [B, classes]. dropout: one rate, or one per lane. channels and
    classes come from the dataset (data.Dataset describes its images)."""

    def __init__(self, norm: NormConfig, dropout: float | list[float] = 0.03, lanes: int = 1, channels: int = 1,
                 classes: int = 10):
        super().__init__()
        self.lanes = lanes
        dropouts = [dropout] * lanes if isinstance(dropout, (int, float)) else list(dropout)
        if len(dropouts) != lanes:
            raise ValueError(f"{len(dropouts)} dropout rates for {lanes} lanes")
        self.draws = Draws()

        def conv(c_in: int, c_out: int, k: int) -> nn.Conv2d:
            return nn.Conv2d(lanes * c_in, lanes * c_out, k, bias=False, groups=lanes)

        def block(c_in: int, c_out: int, k: int) -> nn.Sequential:
            return nn.Sequential(conv(c_in, c_out, k), nn.ReLU(),
                                 NormDropout(norm.name, c_out, norm.groups, dropouts, self.draws))

        n, w = NARROW, WIDE
        self.features = nn.Sequential(
            block(channels, n, 3),  # [B, 8, 26, 26] (on 28x28 images; any size from 16 on works)
            block(n, w, 3),  # [B, 16, 24, 24]
            nn.MaxPool2d(2),  # [B, 16, 12, 12]
            conv(w, n, 1),  # transition, no block: [B, 8, 12, 12]
            block(n, w, 3),  # [B, 16, 10, 10]
            block(w, w, 3),  # [B, 16, 8, 8]
            block(w, w, 3),  # [B, 16, 6, 6]
            nn.AdaptiveAvgPool2d(1),  # global average pool: [B, 16, 1, 1]
            # a norm of each sample's own pixels has nothing to normalize on a 1x1 map: that block has none
            block(w, w, 1) if norm.after_pool and not NORMS[str(norm.name)].needs_pixels else
            nn.Sequential(conv(w, w, 1), nn.ReLU()),
            conv(w, classes, 1),  # [B, classes, 1, 1]
        )

    def forward(self, x: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """x: [B, lanes, 28, 28] normalized images -> log-probabilities, [B, 10] for one lane, else [B, lanes, 10].
        generators: each lane's, for its dropout draws (default: torch's default generator)."""
        self.draws.generators = generators
        try:
            out = self.features(x).flatten(1)
        finally:
            self.draws.generators = None
        if self.lanes == 1:
            return F.log_softmax(out, dim=1)
        return F.log_softmax(out.view(len(out), self.lanes, -1), dim=2)


def lane_state(model: Net, lane: int) -> dict[str, torch.Tensor]:
    """One lane's tensors as a one-lane Net's state_dict (what a job's checkpoint holds): every tensor's rows of that
    lane; a shared counter (BatchNorm's num_batches_tracked) as it is."""
    return {name: t if t.dim() == 0 else t.unflatten(0, (model.lanes, -1))[lane]
            for name, t in model.state_dict().items()}


def stack_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One-lane state_dicts -> the state_dict of a Net with a lane each (lane_state undone)."""
    return {name: first if first.dim() == 0 else torch.cat([s[name] for s in states])
            for name, first in states[0].items()}


def memory_format(norm: NormConfig, device: torch.device, threads: int) -> torch.memory_format:
    return torch.channels_last if device.type == "cpu" and (norm.name != "bn" or threads == 1) else \
        torch.contiguous_format


def build_model(norm: NormConfig, dropout: float | list[float], device: torch.device, threads: int,
                lanes: int = 1, channels: int = 1, classes: int = 10) -> Net:
    """Net on device, laid out for speed. Channels-last (NHWC) conv weights make every activation channels-last:
    with a one-channel input, the weights' layout decides the first convolution's output layout. Where it was
    faster in CPU timings (README, Speed): group and layer norm always, batch norm only with one thread (its
    channels-last backward scales badly). On GPU the default layout."""
    return Net(norm, dropout, lanes, channels, classes).to(device, memory_format=memory_format(norm, device, threads))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
