"""The mask condition's input: a label map -> per-class occupancy at latent
resolution.

    index = to_class_index(mask, config.control)           # (X, Y, Z) 0..K
    occupancy = class_occupancy(index, K, factor=4)        # (K, x, y, z) in [0, 1]

A label map is in some legend (value -> class). The model knows its own
legend (`ControlConfig.legend`); a mask in another legend (e.g. a
TotalSegmentator organ map) comes with a declared mapping from its values to
the model's class names (`LegendMapping`), and every value must be mapped:
an unknown value is an error, never silently treated as background.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from report2ct.config import ControlConfig


class MaskError(ValueError):
    """A mask the model cannot take; the message says why."""


def legend_lookup(
    control: ControlConfig, mapping: Mapping[int, str] | None = None
) -> dict[int, int]:
    """{mask value: channel index 1..K} (0: background). Without `mapping`
    the mask is in the model's own legend; with it, each mask value names a
    model class ("background" allowed)."""
    channel = {name: k for k, (_, name) in enumerate(control.legend, start=1)}
    if mapping is None:
        return {0: 0, **{value: k for k, (value, _) in enumerate(control.legend, start=1)}}
    lookup = {}
    for value, name in mapping.items():
        if name == "background":
            lookup[int(value)] = 0
        elif name in channel:
            lookup[int(value)] = channel[name]
        else:
            raise MaskError(
                f"mapping sends value {value} to {name!r}, which is not a class of the model "
                f"(its classes: background, {', '.join(channel)})"
            )
    lookup.setdefault(0, 0)
    return lookup


def to_class_index(
    mask: np.ndarray, control: ControlConfig, mapping: Mapping[int, str] | None = None
) -> np.ndarray:
    """An integer label map -> channel indices 0..K (uint8). Raises MaskError
    naming any value the legend (or the mapping) does not know."""
    if mask.dtype.kind not in "iub":
        if not np.all(np.isfinite(mask)) or not np.all(mask == np.round(mask)):
            raise MaskError(f"label values must be integers, got dtype {mask.dtype} with fractions")
        mask = mask.astype(np.int64)
    lookup = legend_lookup(control, mapping)
    values, inverse = np.unique(mask, return_inverse=True)
    unknown = [int(v) for v in values if int(v) not in lookup]
    if unknown:
        raise MaskError(f"unknown label values {unknown[:10]} (the legend has {sorted(lookup)})")
    channels = np.array([lookup[int(v)] for v in values], dtype=np.uint8)
    return channels[inverse].reshape(mask.shape)


def class_occupancy(
    index: np.ndarray | torch.Tensor, num_classes: int, factor: int
) -> torch.Tensor:
    """(X, Y, Z) channel indices -> (K, X/f, Y/f, Z/f) float32: the fraction of
    each f^3 block in classes 1..K (background is what is left). Counted with
    one bincount, never materialising a full-resolution one-hot."""
    index = torch.as_tensor(np.asarray(index), dtype=torch.long)
    X, Y, Z = index.shape
    if X % factor or Y % factor or Z % factor:
        raise MaskError(f"mask shape {tuple(index.shape)} is not a multiple of {factor}")
    x, y, z = X // factor, Y // factor, Z // factor
    block = (
        torch.arange(X).div(factor, rounding_mode="floor")[:, None, None] * (y * z)
        + torch.arange(Y).div(factor, rounding_mode="floor")[None, :, None] * z
        + torch.arange(Z).div(factor, rounding_mode="floor")[None, None, :]
    )
    counts = torch.bincount(
        (index * (x * y * z) + block).reshape(-1), minlength=(num_classes + 1) * x * y * z
    )
    occupancy = counts.view(num_classes + 1, x, y, z)[1:].float() / factor**3
    return occupancy
