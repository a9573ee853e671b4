"""Batched training augmentation on tensors: one composed affine per sample and one grid_sample per batch,
brightness/contrast jitter as per-sample scalars. Replaces the reference's per-image PIL transforms."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The reference stacks RandomRotation(±6°) and RandomAffine(±7°, shear ±7°, translate 10 %, scale 0.8-1.2),
# then ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1). What differs here, on purpose:
# - one rotation of ±7° instead of ±6° followed by ±7° (one affine per image; the stack spreads up to ±13°);
# - bilinear instead of nearest-neighbour sampling (smoother digits, no aliasing);
# - saturation and hue are no-ops on grayscale images, so only brightness and contrast are drawn,
#   always brightness first (torchvision shuffles the order per image).
ROTATE_DEG = 7.0
SHEAR_DEG = 7.0
TRANSLATE = 0.1  # fraction of the image size, per axis
SCALE = (0.8, 1.2)
BRIGHTNESS = 0.4
CONTRAST = 0.4


def _uniform(n: int, low: float, high: float, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator) * (high - low) + low


def random_affine(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x: [B, 1, H, W] floats in [0, 1], H == W -> same shape, each image rotated, sheared, scaled and
    shifted by its own random parameters; the background fills with 0 (black), as in torchvision."""
    b, device = x.shape[0], x.device
    angle = torch.deg2rad(_uniform(b, -ROTATE_DEG, ROTATE_DEG, device, generator))
    shear = torch.tan(torch.deg2rad(_uniform(b, -SHEAR_DEG, SHEAR_DEG, device, generator)))
    scale = _uniform(b, *SCALE, device, generator)
    shift = _uniform(2 * b, -2 * TRANSLATE, 2 * TRANSLATE, device, generator).view(b, 2)  # normalized coords span 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    # forward map A = scale * R(angle) @ [[1, shear], [0, 1]]: [B, 2, 2]
    a = torch.stack([cos, cos * shear - sin, sin, sin * shear + cos], dim=1).view(b, 2, 2) * scale.view(b, 1, 1)
    # affine_grid wants output -> input coordinates, i.e. the inverse: A^-1 (p - shift)
    det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
    inv = torch.stack([a[:, 1, 1], -a[:, 0, 1], -a[:, 1, 0], a[:, 0, 0]], dim=1).view(b, 2, 2) / det.view(b, 1, 1)
    theta = torch.cat([inv, -(inv @ shift.unsqueeze(2))], dim=2)  # [B, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def color_jitter(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Brightness then contrast, each factor uniform in [1 - 0.4, 1 + 0.4] per image, clamped to [0, 1]
    (torchvision's adjust_brightness / adjust_contrast for one-channel images)."""
    b = x.shape[0]
    brightness = _uniform(b, 1 - BRIGHTNESS, 1 + BRIGHTNESS, x.device, generator).view(b, 1, 1, 1)
    x = (x * brightness).clamp_(0, 1)
    contrast = _uniform(b, 1 - CONTRAST, 1 + CONTRAST, x.device, generator).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (contrast * x + (1 - contrast) * mean).clamp_(0, 1)


def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Every draw from generator (default: torch's default generator)."""
    return color_jitter(random_affine(x, generator), generator)

