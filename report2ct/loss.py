"""The rectified-flow training loss, as a small callable (minRF's `rf.py`):

    t ~ logit-normal(0, 1)  (SD3; uniform optional)
    x_t = (1 - t) x_0 + t eps,   target v = x_0 - eps,   loss = |v_theta - v|^2

with the report condition replaced by the empty one with probability
`cond_dropout` per sample, so classifier-free guidance works at sampling;
the label condition is dropped with probability `label_dropout`,
independently of the text, so the model learns labels alone, text alone,
both and neither. A mask (ControlNet input) is never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from report2ct.condition import VelocityModel, drop


@dataclass(frozen=True)
class RectifiedFlowLoss:
    cond_dropout: float = 0.15
    label_dropout: float = 0.5
    time_sampling: str = "logit-normal"  # or "uniform"

    def sample_times(
        self, batch: int, *, device, generator: torch.Generator | None
    ) -> torch.Tensor:
        if self.time_sampling == "uniform":
            return torch.rand(batch, generator=generator, device=device)
        return torch.sigmoid(torch.randn(batch, generator=generator, device=device))

    def __call__(
        self,
        denoiser: VelocityModel,
        x0: torch.Tensor,  # (B, C, x, y, z) clean scaled latents
        context: torch.Tensor,  # (B, 2, D)
        spacing_mm: torch.Tensor,  # (B, 3)
        *,
        labels: torch.Tensor | None = None,  # (B, 18) +1 / -1 / 0
        control: torch.Tensor | None = None,  # (B, K, x, y, z)
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        t, noise, u_text, u_labels = self.draws(x0, generator)
        t_b = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        x_t = (1 - t_b) * x0 + t_b * noise
        context = drop(context, u_text >= self.cond_dropout)
        optional = {} if control is None else {"control": control}
        if labels is not None:
            optional["labels"] = drop(labels, u_labels >= self.label_dropout)
        v = denoiser(x_t, t.to(x0.dtype), context, spacing_mm, **optional)
        return torch.mean((v.float() - (x0 - noise).float()) ** 2)

    def draws(self, x0: torch.Tensor, generator) -> tuple[torch.Tensor, ...]:
        """(B,) flow times, noise like x0, and (B,) uniforms for the text and
        the label dropout: from one generator for the whole batch, or from
        each sample's own (a sequence, one per sample), so that a sample's
        draws do not depend on how a global batch is split over ranks."""
        if generator is None or isinstance(generator, torch.Generator):
            batch, device = x0.shape[0], x0.device
            t = self.sample_times(batch, device=device, generator=generator)
            noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
            uniforms = torch.rand(2, batch, generator=generator, device=device)
            return t, noise, uniforms[0], uniforms[1]
        if len(generator) != x0.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x0.shape[0]}")
        per_sample = [self.draws(x0[i : i + 1], g) for i, g in enumerate(generator)]
        return tuple(torch.cat(parts) for parts in zip(*per_sample, strict=True))
