"""Model-core speed on this machine, `demo` preset, measured side by side.

Prints: one denoiser step (a guided pair) and one decode, fp32 vs bf16; and
our sampler (one batched forward for both guidance halves, bf16 autocast) vs
the loop MAISI-style scripts write over MONAI's `RFlowScheduler` (two forwards
per step, fp32), at the same steps, with the difference of their outputs.

    .venv/bin/python bench/bench_model.py [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from monai.networks.schedulers import RFlowScheduler

from report2ct.codec import LatentCodec
from report2ct.config import preset
from report2ct.denoiser import Denoiser, perturb_zero_init
from report2ct.flow import Condition, euler_sample, linear_times
from report2ct.pipeline import autocast


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def monai_loop(denoiser, noise, cond, num_steps, guidance_scale):
    """What a MAISI-style script does: scheduler state, two forwards a step."""
    scheduler = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False)
    scheduler.set_timesteps(num_inference_steps=num_steps)
    timesteps = torch.cat([scheduler.timesteps.float(), torch.zeros(1)])
    x = noise.clone()
    for t, t_next in itertools.pairwise(timesteps):
        tv = (t / 1000).expand(x.shape[0])
        v_c = denoiser(x, tv, cond.context, cond.spacing_mm)
        v_u = denoiser(x, tv, cond.null_context, cond.spacing_mm)
        x, _ = scheduler.step(v_u + guidance_scale * (v_c - v_u), t, x, t_next)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = preset("demo")
    torch.manual_seed(0)
    denoiser = Denoiser(config.unet, latent_channels=4, context_dim=config.context_dim)
    denoiser = perturb_zero_init(denoiser).eval()  # a fresh MONAI UNet predicts exactly 0
    codec = LatentCodec(config.vae).eval()
    latent_shape = config.latent_shape(config.default_shape)
    noise = torch.randn(1, *latent_shape, generator=torch.Generator().manual_seed(1))
    cond = Condition(
        torch.randn(1, 2, config.context_dim) * 0.1,
        torch.zeros(1, 2, config.context_dim),
        torch.tensor([config.default_spacing_mm]),
    )
    guidance = 5.0
    device = torch.device("cpu")
    print(
        f"demo preset, latent {latent_shape}, volume {config.default_shape}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}"
    )

    rows = []
    with torch.inference_mode():
        x2 = torch.cat([noise, noise])
        t2 = torch.full((2,), 0.5)
        ctx2 = torch.cat([cond.context, cond.null_context])
        sp2 = torch.cat([cond.spacing_mm, cond.spacing_mm])
        for precision in ("fp32", "bf16"):
            with autocast(device, precision):
                step = best_of(args.repeats, lambda: denoiser(x2, t2, ctx2, sp2))
                decode = best_of(args.repeats, lambda: codec.decode(noise))
            rows.append((precision, step, decode))
    print(f"{'precision':>9} | {'denoiser step (guided pair)':>28} | {'decode':>8}")
    for precision, step, decode in rows:
        print(f"{precision:>9} | {step:27.3f}s | {decode:7.3f}s")
    print(
        f"bf16 speed-up: step {rows[0][1] / rows[1][1]:.2f}x, decode {rows[0][2] / rows[1][2]:.2f}x"
    )

    times = linear_times(args.steps)
    results = {}

    def ours():
        with torch.inference_mode(), autocast(device, "bf16"):
            results["ours"] = euler_sample(denoiser, noise, cond, times, guidance_scale=guidance)

    def ours_fp32():
        with torch.inference_mode():
            results["ours_fp32"] = euler_sample(
                denoiser, noise, cond, times, guidance_scale=guidance
            )

    def theirs():
        results["monai"] = monai_loop(denoiser, noise, cond, args.steps, guidance)

    t_ours, t_ours32, t_monai = (best_of(args.repeats, fn) for fn in (ours, ours_fp32, theirs))
    diff_bf16 = (results["ours"] - results["monai"]).abs().max().item()
    diff_fp32 = (results["ours_fp32"] - results["monai"]).abs().max().item()
    scale = results["monai"].abs().max().item()
    print(f"\nsampling, {args.steps} guided Euler steps (scale {guidance}):")
    print(f"  MONAI RFlowScheduler loop, 2 forwards/step, fp32 : {t_monai:.3f}s")
    print(
        f"  ours, batched guidance, fp32                     : {t_ours32:.3f}s "
        f"({t_monai / t_ours32:.2f}x)  max |diff| {diff_fp32:.2e}"
    )
    print(
        f"  ours, batched guidance, bf16 autocast            : {t_ours:.3f}s "
        f"({t_monai / t_ours:.2f}x)  max |diff| {diff_bf16:.2e} (output max {scale:.2f})"
    )
    print(f"RATIO ours_bf16_vs_monai_loop {t_monai / t_ours:.2f} (target >= 1.5)")


if __name__ == "__main__":
    main()
