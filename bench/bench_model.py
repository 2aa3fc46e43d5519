"""Model-core speed on this machine, `demo` preset, measured side by side.

Prints: one denoiser step (a guided pair) and one decode, fp32 vs bf16; and
our sampler (one batched forward for both guidance halves) vs the loop
MAISI-style scripts write over MONAI's `RFlowScheduler` (two forwards per
step), at the same steps and the same precision (fp32 against fp32, bf16
against bf16), with the difference of their outputs. What bf16 autocast buys
is printed apart, per sampler, so it never inflates the sampler headline.

    .venv/bin/python bench/bench_model.py [--steps 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from monai.networks.schedulers import RFlowScheduler

from report2ct.codec import LatentCodec
from report2ct.condition import Condition, empty_like
from report2ct.config import preset
from report2ct.denoiser import Denoiser, perturb_zero_init
from report2ct.flow import euler_sample, linear_times
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
    # The unconditional half: the report dropped (the empty condition), the spacing kept.
    uncond = Condition(empty_like(cond.context), cond.spacing_mm)
    scheduler = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False)
    scheduler.set_timesteps(num_inference_steps=num_steps)
    timesteps = torch.cat([scheduler.timesteps.float(), torch.zeros(1)])
    x = noise.clone()
    for t, t_next in itertools.pairwise(timesteps):
        tv = (t / 1000).expand(x.shape[0])
        v_c = denoiser(x, tv, **cond.inputs(guided=False))
        v_u = denoiser(x, tv, **uncond.inputs(guided=False))
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
        torch.randn(1, 2, config.context_dim) * 0.1, torch.tensor([config.default_spacing_mm])
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
        guided = cond.inputs(guided=True)  # the conditional and unconditional halves
        for precision in ("fp32", "bf16"):
            with autocast(device, precision):
                step = best_of(args.repeats, lambda: denoiser(x2, t2, **guided))
                decode = best_of(args.repeats, lambda: codec.decode(noise))
            rows.append((precision, step, decode))
    print(f"{'precision':>9} | {'denoiser step (guided pair)':>28} | {'decode':>8}")
    for precision, step, decode in rows:
        print(f"{precision:>9} | {step:27.3f}s | {decode:7.3f}s")
    print(
        f"bf16 speed-up: step {rows[0][1] / rows[1][1]:.2f}x, decode {rows[0][2] / rows[1][2]:.2f}x"
    )

    times = linear_times(args.steps)
    results, seconds = {}, {}
    samplers = {
        "ours": lambda: euler_sample(denoiser, noise, cond, times, guidance_scale=guidance),
        "monai": lambda: monai_loop(denoiser, noise, cond, args.steps, guidance),
    }
    # Every sampler at every precision: a headline compares like with like.
    for (name, sample), precision in itertools.product(samplers.items(), ("fp32", "bf16")):

        def run(name=name, sample=sample, precision=precision):
            with torch.inference_mode(), autocast(device, precision):
                results[name, precision] = sample()

        seconds[name, precision] = best_of(args.repeats, run)

    scale = results["monai", "fp32"].abs().max().item()
    print(
        f"\nsampling, {args.steps} guided Euler steps (scale {guidance}), output max {scale:.2f}:"
    )
    for precision in ("fp32", "bf16"):
        t_monai, t_ours = seconds["monai", precision], seconds["ours", precision]
        diff = (results["ours", precision] - results["monai", precision]).abs().max().item()
        print(f"  {precision}: MONAI RFlowScheduler loop, 2 forwards/step : {t_monai:.3f}s")
        print(
            f"  {precision}: ours, batched guidance, 1 forward/step    : {t_ours:.3f}s "
            f"({t_monai / t_ours:.2f}x)  max |diff| vs the loop {diff:.2e}"
        )
    bf16_vs_fp32 = (results["ours", "bf16"] - results["ours", "fp32"]).abs().max().item()
    # Headlines: batched guidance against the loop at the same precision...
    for precision in ("fp32", "bf16"):
        ratio = seconds["monai", precision] / seconds["ours", precision]
        print(f"RATIO ours_vs_monai_loop_{precision} {ratio:.2f}")
    # ...and, apart, what bf16 autocast buys each sampler (and costs: max |diff|).
    for name in samplers:
        gain = seconds[name, "fp32"] / seconds[name, "bf16"]
        print(f"RATIO {name}_bf16_vs_fp32_speed {gain:.2f}")
    print(f"  ours bf16 vs ours fp32: max |diff| {bf16_vs_fp32:.2e}")


if __name__ == "__main__":
    main()
