"""The paper model on one CUDA device: seconds per volume against the counted
floor, with torch.compile off and on.

The `paper` preset with random weights (the compute does not depend on them),
480x480x256 at 1x1x1.5 mm (latent 4x120x120x64), 30 guided Euler steps (one
forward of batch 2 each), bf16 autocast, fused attention (automatic on CUDA),
cudnn benchmark on. Per setting it prints seconds per volume for sampling and
for decoding (synchronised), the peak device memory of each, the fraction of
the counted floor reached, and the CPU write of the volume (OME-Zarr, one
shard, to a local directory) that the factory overlaps with the next volume.

The floor: FLOPs counted with torch.utils.flop_counter.FlopCounterMode on
the meta device (no memory, no accelerator needed): one guided forward at
the paper latent times the steps, plus one whole decode, at the dense bf16
peak (989 TFLOP/s for an H100 or H200 SXM; --peak-tflops for others).

On a machine without CUDA it prints the counted floor, says so and exits 0.

    .venv/bin/python bench/bench_device.py [--compile both|on|off] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from report2ct.codec import LatentCodec
from report2ct.condition import Condition
from report2ct.config import preset
from report2ct.denoiser import Denoiser

SHAPE, SPACING = (480, 480, 256), (1.0, 1.0, 1.5)


def count_flops(config) -> tuple[float, float]:
    """(FLOPs of one guided step, FLOPs of one whole decode), counted on the
    meta device."""
    latent_shape = config.latent_shape(SHAPE)  # (C, x, y, z)
    with torch.device("meta"):
        denoiser = Denoiser.for_model(config).eval()
        codec = LatentCodec(config.vae, latent_scale=config.latent_scale).eval()
        x = torch.empty(2, *latent_shape)  # the guided pair in one forward
        t = torch.empty(2)
        context = torch.empty(2, 2, config.context_dim)
        spacing = torch.empty(2, 3)
        latent = torch.empty(1, *latent_shape)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as step:
            denoiser(x, t, context, spacing)
        with FlopCounterMode(display=False) as decode:
            codec.decode(latent)
    return float(step.get_total_flops()), float(decode.get_total_flops())


def build(config, device: torch.device, torch_compile: bool):
    from report2ct.bundle import apply_speed_options
    from report2ct.denoiser import perturb_zero_init
    from report2ct.pipeline import Report2CT

    torch.manual_seed(0)
    model = Report2CT(config, device="cpu", with_text=False)
    perturb_zero_init(model.denoiser, seed=0)  # a non-zero velocity, as a trained UNet's
    model = model.to(device).eval()
    return apply_speed_options(model, torch_compile=torch_compile, cudnn_benchmark=True)


@torch.inference_mode()
def one_volume(model, config, device, num_steps: int, guidance: float, seed: int) -> dict:
    """Sample, decode and write one volume; seconds and peak memory of each."""
    from factory.storage import open_storage
    from factory.writer import put_ome_zarr
    from report2ct.flow import euler_sample
    from report2ct.pipeline import schedule

    latent_shape = config.latent_shape(SHAPE)
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(1, *latent_shape, device=device, generator=generator)
    cond = Condition(
        context=torch.randn(1, 2, config.context_dim, device=device, generator=generator),
        spacing_mm=torch.tensor([SPACING], device=device),
    )
    times = schedule(config, num_steps, latent_shape)
    out = {}

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        latent = euler_sample(model.denoiser, noise, cond, times, guidance_scale=guidance)
    torch.cuda.synchronize(device)
    out["sample_s"] = time.perf_counter() - start
    out["sample_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plan = model.codec.plan(latent)  # what decode_volume does, with the plan kept to print
        if plan.num_tiles == 1:
            hu = model.codec.decode(latent)[0, 0].float()
        else:
            hu = model.codec.decode_plan(latent, plan)[0, 0].float()
        volume = hu.round().clamp(-32768, 32767).to(torch.int16).cpu().numpy()
    torch.cuda.synchronize(device)
    out["decode_s"] = time.perf_counter() - start
    out["decode_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    out["decode_tiles"] = f"{plan.num_tiles} x {plan.tile} (work {plan.work_ratio:.2f}x)"

    with tempfile.TemporaryDirectory() as scratch:
        cpu, start = time.process_time(), time.perf_counter()
        put_ome_zarr(open_storage(scratch), "v.ome.zarr", volume, SPACING, attributes={})
        out["write_s"] = time.perf_counter() - start
        out["write_core_s"] = time.process_time() - cpu
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", choices=["both", "off", "on"], default="both")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2, help="timed volumes per setting")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak")
    args = parser.parse_args()

    config = preset("paper")
    step_flops, decode_flops = count_flops(config)
    total = args.steps * step_flops + decode_flops
    floor_s = total / (args.peak_tflops * 1e12)
    print(
        f"paper preset, {SHAPE} @ {SPACING} mm, latent {config.latent_shape(SHAPE)}, "
        f"{args.steps} guided steps, bf16"
    )
    print(
        f"counted: {step_flops / 1e12:.1f} TFLOP per guided step, "
        f"{decode_flops / 1e12:.1f} TFLOP per whole decode, {total / 1e12:.0f} TFLOP per "
        f"volume: floor {floor_s:.2f} s at {args.peak_tflops:.0f} TFLOP/s"
    )
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to time (run this on a GPU machine)")
        return 0

    device = torch.device("cuda", 0)
    print(f"device: {torch.cuda.get_device_name(device)}")
    settings = {"both": [False, True], "off": [False], "on": [True]}[args.compile]
    for torch_compile in settings:
        model = build(config, device, torch_compile)
        start = time.perf_counter()
        one_volume(model, config, device, args.steps, args.guidance, seed=0)  # warm-up
        warmup_s = time.perf_counter() - start
        runs = [
            one_volume(model, config, device, args.steps, args.guidance, seed=1 + i)
            for i in range(args.repeats)
        ]
        best = min(runs, key=lambda r: r["sample_s"] + r["decode_s"])
        device_s = best["sample_s"] + best["decode_s"]
        print(
            f"compile {'on ' if torch_compile else 'off'}: {device_s:.2f} s per volume on the "
            f"device (sample {best['sample_s']:.2f} s = {best['sample_s'] / args.steps:.3f} s "
            f"a step, decode {best['decode_s']:.2f} s: {best['decode_tiles']}), "
            f"{floor_s / device_s:.0%} of the floor"
        )
        print(
            f"  peak memory: sample {best['sample_peak_gib']:.1f} GiB, decode "
            f"{best['decode_peak_gib']:.1f} GiB; write (CPU, overlapped in the factory) "
            f"{best['write_s']:.2f} s, {best['write_core_s']:.2f} core-s; warm-up "
            f"(compiles) {warmup_s:.0f} s"
        )
        print(
            f"  split: sample {best['sample_s'] / (device_s + best['write_s']):.0%}, decode "
            f"{best['decode_s'] / (device_s + best['write_s']):.0%}, write "
            f"{best['write_s'] / (device_s + best['write_s']):.0%} of the serial total "
            f"{device_s + best['write_s']:.2f} s"
        )
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
