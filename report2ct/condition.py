"""What a denoiser is conditioned on, and the one rule for "no condition".

The empty condition is zeros, everywhere: a missing report section (None, or
text that is empty or only whitespace, as a CSV's blank cell reads: the same
in training and in generation, `section`) is a zero token, labels not given are 0 (the label token of the zero vector is zero,
its map has no bias), the unconditional half of classifier-free guidance is
zeros, and condition dropout in training replaces a sample's condition with
zeros. `empty`, `empty_like`, `drop` and `section` are that rule; nothing
else writes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# (x_t (B,C,x,y,z), t (B,), context (B,2,D), spacing_mm (B,3), labels=, control=)
# -> velocity (B,C,x,y,z): what samplers and the loss call (report2ct.denoiser
# builds one from MONAI's networks; tests pass plain functions).
VelocityModel = Callable[..., torch.Tensor]


def empty(*shape: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The empty condition of `shape` (float32)."""
    return torch.zeros(*shape, device=device)


def empty_like(like: torch.Tensor) -> torch.Tensor:
    """The empty condition with the shape, dtype and device of `like`."""
    return torch.zeros_like(like)


def section(text: str | None) -> str | None:
    """A report section as the conditioner encodes it: None (the empty
    condition's token) when it is missing - None, "" or only whitespace -
    else the text as given."""
    if text is None or not text.strip():
        return None
    return text


def drop(condition: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-sample condition dropout: sample i keeps its condition where
    keep[i] is True and gets the empty condition otherwise. keep: (B,) bool."""
    shape = (-1, *([1] * (condition.ndim - 1)))
    return torch.where(keep.view(shape), condition, empty_like(condition))


@dataclass(frozen=True)
class Condition:
    context: torch.Tensor  # (B, 2, D) report tokens; a missing section is empty
    spacing_mm: torch.Tensor  # (B, 3)
    labels: torch.Tensor | None = None  # (B, 18) +1 / -1 / 0 (not given = empty)
    control: torch.Tensor | None = None  # (B, K, x, y, z) mask-class occupancy

    def inputs(self, *, guided: bool) -> dict[str, torch.Tensor]:
        """The denoiser's condition inputs for one half (B) or, guided, for
        the conditional and the unconditional half together (2B). The
        unconditional half drops the report and the labels; a mask and the
        spacing condition both halves (as in MAISI)."""
        inputs = {"context": self.context, "spacing_mm": self.spacing_mm}
        if self.labels is not None:
            inputs["labels"] = self.labels
        if self.control is not None:
            inputs["control"] = self.control
        if not guided:
            return inputs
        dropped = {"context", "labels"}
        return {
            name: torch.cat([value, empty_like(value) if name in dropped else value])
            for name, value in inputs.items()
        }
