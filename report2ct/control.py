"""The mask condition's input: a label map -> per-class occupancy at latent
resolution.

    index = to_class_index(mask, config.control)           # (X, Y, Z) 0..K
    occupancy = class_occupancy(index, K, factor=4, device=model_device)  # (K, x, y, z)

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


# The lookup table spans every value of 8- and 16-bit masks (at most 64 KiB);
# wider masks are narrowed first when their values fit, else mapped through
# np.unique.
_UNKNOWN = 255  # a lookup entry for values the legend does not know


def to_class_index(
    mask: np.ndarray, control: ControlConfig, mapping: Mapping[int, str] | None = None
) -> np.ndarray:
    """An integer label map -> channel indices 0..K (uint8). Raises MaskError
    naming any value the legend (or the mapping) does not know.

    One pass through a lookup table (value -> channel), none when the table
    is the identity over the mask's values (a mask in the model's own legend
    with values 1..K in order, such as the phantom world's)."""
    if mask.dtype.kind not in "iub":
        if not np.all(np.isfinite(mask)) or not np.all(mask == np.round(mask)):
            raise MaskError(f"label values must be integers, got dtype {mask.dtype} with fractions")
        mask = mask.astype(np.int64)
    lookup = legend_lookup(control, mapping)
    if max(lookup.values(), default=0) >= _UNKNOWN:
        raise MaskError(f"{control.num_classes} classes: at most {_UNKNOWN - 1} fit a uint8 index")
    mask = _narrow(mask)
    if mask.dtype.itemsize > 2:
        return _by_unique(mask, lookup)
    unsigned = mask.view(np.uint8 if mask.dtype.itemsize == 1 else np.uint16)
    span = 1 << (8 * mask.dtype.itemsize)
    table = np.full(span, _UNKNOWN, dtype=np.uint8)
    low = 0 if mask.dtype.kind == "u" else -span // 2
    for value, channel in lookup.items():
        if low <= value < low + span:
            table[value % span] = channel  # a signed value's two's-complement bit pattern
    top = int(unsigned.max()) if unsigned.size else 0
    if np.array_equal(table[: top + 1], np.arange(top + 1)):
        return unsigned.astype(np.uint8, copy=True)  # identity over the values present
    index = table[unsigned]
    if index.size and int(index.max()) == _UNKNOWN:
        unknown = [int(v) for v in np.unique(mask[index == _UNKNOWN])]
        raise MaskError(f"unknown label values {unknown[:10]} (the legend has {sorted(lookup)})")
    return index


def _narrow(mask: np.ndarray) -> np.ndarray:
    """A 32/64-bit mask whose values fit 8 or 16 bits, as that (one pass for
    the range, one for the cast); other masks unchanged."""
    if mask.dtype.itemsize <= 2 or mask.size == 0:
        return mask.view(np.uint8) if mask.dtype == np.bool_ else mask
    low, high = int(mask.min()), int(mask.max())
    for dtype in (np.uint8, np.int8, np.uint16, np.int16):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return mask.astype(dtype)
    return mask


def _by_unique(mask: np.ndarray, lookup: dict[int, int]) -> np.ndarray:
    values, inverse = np.unique(mask, return_inverse=True)
    unknown = [int(v) for v in values if int(v) not in lookup]
    if unknown:
        raise MaskError(f"unknown label values {unknown[:10]} (the legend has {sorted(lookup)})")
    channels = np.array([lookup[int(v)] for v in values], dtype=np.uint8)
    return channels[inverse].reshape(mask.shape)


def class_occupancy(
    index: np.ndarray | torch.Tensor,
    num_classes: int,
    factor: int,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(X, Y, Z) channel indices -> (K, X/f, Y/f, Z/f) float32 on `device`
    (default: the index's own): the fraction of each f^3 block in classes
    1..K (background is what is left). Counted with one bincount over
    (class, block) keys on the device, never materialising a
    full-resolution one-hot; a uint8 index moves to the device as is (one
    byte a voxel), so on an accelerator the CPU only hands it over."""
    index = torch.as_tensor(np.asarray(index) if not isinstance(index, torch.Tensor) else index)
    if device is not None:
        index = index.to(device, non_blocking=True)
    X, Y, Z = index.shape
    if X % factor or Y % factor or Z % factor:
        raise MaskError(f"mask shape {tuple(index.shape)} is not a multiple of {factor}")
    x, y, z = X // factor, Y // factor, Z // factor
    blocks = x * y * z
    if (num_classes + 1) * blocks >= 2**31:
        raise MaskError(f"mask shape {tuple(index.shape)} is too large to count in int32 keys")
    on = index.device

    def block_of(n: int, stride: int) -> torch.Tensor:
        return (
            torch.arange(n, device=on, dtype=torch.int32).div(factor, rounding_mode="floor")
            * stride
        )

    key = index.to(torch.int32) * blocks  # (class, block) -> class * blocks + block
    key += block_of(X, y * z)[:, None, None]
    key += block_of(Y, z)[None, :, None]
    key += block_of(Z, 1)[None, None, :]
    counts = torch.bincount(key.reshape(-1), minlength=(num_classes + 1) * blocks)
    occupancy = counts.view(num_classes + 1, x, y, z)[1:].float() / factor**3
    return occupancy
