"""The norms, torch-free: each entry owns what the rest of the code needs to know about it. The schema's choices,
validate()'s checks, the collector's labels and row order read this table; model.NORM_LAYERS maps the same names to
layers (and refuses to load if the two disagree). To add a norm: an entry here, a layer in model.NORM_LAYERS, and
conf/norm/<name>.yaml (docs/code.md)."""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

NARROW, WIDE = 8, 16  # the net's conv widths (model.py builds with them)
NORM_WIDTHS = (NARROW, WIDE)  # channel counts of the layers a norm normalizes: norm.groups must divide each


@dataclass(frozen=True)
class Norm:
    label: str  # its name in the table's rows ("BatchNorm"), before the regularizer's suffix
    min_batch: int = 1  # training samples it needs in every batch (BatchNorm: 2, or the batch's variance is 0)
    grouped: bool = False  # its groups come from norm.groups, which must divide every normalized width
    # it normalizes each channel group over its own pixels, so it needs more than one pixel per group: after the
    # net's global average pool (a 1x1 map) such a norm has nothing to normalize, and the net leaves that norm out
    needs_pixels: bool = False


# dict order is the table's row order
NORMS = MappingProxyType({
    "bn": Norm("BatchNorm", min_batch=2),
    "gn": Norm("GroupNorm", grouped=True),
    "ln": Norm("LayerNorm"),
})
