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
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        batch, device = x0.shape[0], x0.device
        t = self.sample_times(batch, device=device, generator=generator)  # (B,)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        t_b = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        x_t = (1 - t_b) * x0 + t_b * noise
        keep = torch.rand(batch, generator=generator, device=device) >= self.cond_dropout
        context = drop(context, keep)
        optional = {} if control is None else {"control": control}
        if labels is not None:
            keep_labels = (
                torch.rand(batch, generator=generator, device=device) >= self.label_dropout
            )
            optional["labels"] = drop(labels, keep_labels)
        v = denoiser(x_t, t.to(x0.dtype), context, spacing_mm, **optional)
        return torch.mean((v.float() - (x0 - noise).float()) ** 2)
