"""Putting an array onto an output grid: resample to a target spacing over
the same field of view, then crop or pad symmetrically to a target shape.
The training reader and the factory's masks use the same two steps, so a
mask lands on a generated volume exactly where a training mask lands on its
CT."""

from __future__ import annotations

import numpy as np
import torch


def resample(array: torch.Tensor, spacing_mm, target_mm, *, mode: str) -> torch.Tensor:
    """(1, X, Y, Z) -> the same field of view at `target_mm` spacing."""
    if target_mm is None or np.allclose(spacing_mm, target_mm):
        return array
    size = [
        max(1, round(n * s / t))
        for n, s, t in zip(array.shape[1:], spacing_mm, target_mm, strict=True)
    ]
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    out = torch.nn.functional.interpolate(array[None].float(), size=size, mode=mode, **kwargs)[0]
    return out


def crop_or_pad(array: torch.Tensor, shape, value: float) -> torch.Tensor:
    if shape is None:
        return array
    from monai.transforms import ResizeWithPadOrCrop

    return ResizeWithPadOrCrop(spatial_size=tuple(shape), mode="constant", value=value)(
        array
    ).as_tensor()
