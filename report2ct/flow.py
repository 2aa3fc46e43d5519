"""Rectified-flow schedules and samplers: pure functions, no hidden state.

A schedule is a value: a 1-D tensor of flow times from 1 (noise) down to 0
(data). A sampler is a function of (denoiser, noise, condition, times,
guidance) -> latents, so one loaded model can serve concurrent requests
(diffusers' stateful schedulers cannot; issues #3672, #5749). Classifier-free
guidance evaluates the conditional and unconditional halves in one batched
forward:
    v = v_uncond + s * (v_cond - v_uncond)          (Ho & Salimans 2022, eq. 6)
The unconditional half drops the report and the labels; a mask, when given,
conditions both halves (as in MAISI): guidance sharpens what the report
says, the mask fixes where things are.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers.rectified_flow import timestep_transform

from report2ct.condition import Condition, VelocityModel


def linear_times(num_steps: int) -> torch.Tensor:
    """(num_steps + 1,) evenly spaced flow times 1 -> 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def shifted_times(
    num_steps: int, *, latent_numel: int, base_latent_numel: int, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """MAISI's resolution-dependent schedule: larger latents spend more steps
    at high noise. Same transform as MONAI's `RFlowScheduler` (continuous)."""
    times = linear_times(num_steps)[:-1] * num_train_timesteps
    shifted = timestep_transform(
        times,
        input_img_size_numel=torch.tensor(latent_numel),
        base_img_size_numel=base_latent_numel,
        num_train_timesteps=num_train_timesteps,
        spatial_dim=3,
    )
    return torch.cat(
        [shifted.to(torch.float64) / num_train_timesteps, torch.zeros(1, dtype=torch.float64)]
    )


def guided_velocity(
    denoiser: VelocityModel, x: torch.Tensor, t: float, cond: Condition, guidance_scale: float
) -> torch.Tensor:
    """Velocity at (x, t), guided; one forward of batch 2B when guided."""
    batch = x.shape[0]
    if guidance_scale == 1.0:  # plain conditional: no unconditional half needed
        t_vec = torch.full((batch,), t, device=x.device, dtype=x.dtype)
        return denoiser(x, t_vec, **cond.inputs(guided=False))
    t_vec = torch.full((2 * batch,), t, device=x.device, dtype=x.dtype)
    v = denoiser(torch.cat([x, x]), t_vec, **cond.inputs(guided=True)).float()
    v_cond, v_uncond = v[:batch], v[batch:]
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def euler_sample(
    denoiser: VelocityModel,
    noise: torch.Tensor,
    cond: Condition,
    times: torch.Tensor,
    *,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """First-order integration of dx/d(-t) = v from times[0]=1 to times[-1]=0."""
    x = noise.float()
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
        x = x + guided_velocity(denoiser, x, t, cond, guidance_scale) * (t - t_next)
    return x


def heun_sample(
    denoiser: VelocityModel,
    noise: torch.Tensor,
    cond: Condition,
    times: torch.Tensor,
    *,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Second-order (Heun) integration as in EDM's sampler: an Euler step,
    then the trapezoid correction. Unlike EDM's sigma=0, the flow's velocity is
    defined at t=0, so every step is corrected. Two forwards per step; far
    fewer steps for the same error."""
    x = noise.float()
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
        v = guided_velocity(denoiser, x, t, cond, guidance_scale)
        x_euler = x + v * (t - t_next)
        v_next = guided_velocity(denoiser, x_euler, t_next, cond, guidance_scale)
        x = x + 0.5 * (v + v_next) * (t - t_next)
    return x


SAMPLERS = {"euler": euler_sample, "heun": heun_sample}
