"""Decoding a large latent in memory-sized slabs vs whole, side by side.

A realistic latent (a chest phantom at 256x256x128, 1.5x1.5x2.5 mm, encoded
by the bundle's VAE) is decoded whole and by `LatentCodec.decode_volume`
under a budget of `--budget-fraction` of the whole decode's estimated
memory, each in its own process so each peak memory is its own (resident
memory on the CPU, `--device cuda`: the allocator's peak). Prints the plan
(slabs, decoded/needed work), both peaks above the loaded model, and side
by side the slab output's relative difference from the whole one, the peak
ratio (slabs/whole) and the work ratio. On the CPU each decode runs twice:
with glibc's large blocks returned to the system when freed (what the
decode holds, as CUDA's allocator counts it: `RATIO decode_peak`) and with
glibc's default, which keeps some freed slabs on its heap
(`RATIO decode_peak_glibc_default`); then the plans at the paper's latent
(4x120x120x64) for a few device budgets, counted without running the paper
VAE.

    .venv/bin/python bench/bench_decode.py [--bundle report2ct/bundles/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from report2ct.codec import LatentCodec, decode_bytes_per_latent_voxel, plan_decode
from report2ct.config import preset

SHAPE, SPACING = (256, 256, 128), (1.5, 1.5, 2.5)


def load_codec(bundle: Path) -> LatentCodec:
    from safetensors.torch import load_file

    from report2ct.bundle import read_config, verify_bundle

    verify_bundle(bundle)
    config = read_config(bundle)
    codec = LatentCodec(config.vae, latent_scale=config.latent_scale)
    codec.vae.load_state_dict(load_file(bundle / "vae.safetensors"))
    return codec.eval()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the peak resident memory to the current one (Linux clear_refs
    5); returns the current resident bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


@torch.inference_mode()
def child(args) -> None:
    """Decode one way in this process; print the peak above the baseline."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    codec = load_codec(args.bundle).to(device)
    latent = torch.load(args.latent, weights_only=True).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = reset_peak_rss()
    start, wall = time.process_time(), time.perf_counter()
    if args.child == "whole":
        out = codec.decode(latent)
    else:
        out = codec.decode_volume(latent, budget_bytes=args.budget)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = peak_rss_bytes() - base
    cpu_s, wall_s = time.process_time() - start, time.perf_counter() - wall
    np.save(args.out, out[0, 0].float().cpu().numpy())
    print(json.dumps({"peak_bytes": peak, "cpu_s": cpu_s, "wall_s": wall_s}))


def run_child(
    args, how: str, scratch: Path, budget: int, *, malloc_env: dict[str, str] | None = None
) -> tuple[dict, np.ndarray]:
    out = scratch / f"{how}.npy"
    command = [sys.executable, __file__, "--child", how, "--latent", str(scratch / "latent.pt")]
    command += ["--bundle", str(args.bundle), "--out", str(out), "--budget", str(budget)]
    command += ["--threads", str(args.threads), "--device", args.device]
    env = {**os.environ, **(malloc_env or {})}
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1]), np.load(out)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("report2ct/bundles/demo"))
    parser.add_argument("--budget-fraction", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=["whole", "tiled"])
    parser.add_argument("--latent", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--budget", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from phantom.world import make_phantom

    torch.set_num_threads(args.threads)
    codec = load_codec(args.bundle)
    hu = make_phantom(0, shape=SHAPE, spacing_mm=SPACING).volume_hu
    latent = codec.encode(torch.from_numpy(hu.astype(np.float32))[None, None])
    shape = tuple(latent.shape[2:])
    whole_estimate = codec.decode_bytes_per_latent_voxel() * int(np.prod(shape))
    budget = int(whole_estimate * args.budget_fraction)
    plan = codec.plan(latent, budget_bytes=budget)
    print(
        f"output {SHAPE}, latent {tuple(latent.shape[1:])}, VAE channels {codec.config.num_channels}"
        f", on {args.device}"
    )
    print(
        f"budget {budget / 2**30:.2f} GiB ({args.budget_fraction:.0%} of the whole decode's "
        f"estimate {whole_estimate / 2**30:.2f} GiB): {plan.num_tiles} slabs of {plan.tile}, "
        f"activations on the {'host' if plan.offload else 'device'}"
    )
    # On the CPU the peak is resident memory, which also counts what glibc
    # keeps of freed blocks: its mmap threshold grows with the blocks freed,
    # so the slabs freed early come back as heap it never returns. Fixed at
    # 1 MiB, every large tensor is returned when freed: the peak is then what
    # the decode holds, as CUDA's allocator counts it. Both are printed.
    settings = {"held": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}, "glibc default": {}}
    if args.device != "cpu":
        settings = {"held": {}}
    stats: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        torch.save(latent, scratch / "latent.pt")
        for setting, env in settings.items():
            whole_stats, whole = run_child(args, "whole", scratch, budget, malloc_env=env)
            tiled_stats, tiled = run_child(args, "tiled", scratch, budget, malloc_env=env)
            stats[setting] = {"whole": whole_stats, "slabs": tiled_stats}
    diff = tiled.astype(np.float64) - whole.astype(np.float64)
    relative = np.linalg.norm(diff) / np.linalg.norm(whole.astype(np.float64))
    per_activation = codec.config.num_channels[0] * np.prod(SHAPE) * 4
    for setting, pair in stats.items():
        for name, row in pair.items():
            print(
                f"{name} decode ({setting}): peak {row['peak_bytes'] / 2**30:.2f} GiB above the "
                f"model ({row['peak_bytes'] / per_activation:.2f} x channels x 4 bytes per "
                f"output voxel), {row['cpu_s']:.1f} core-s, {row['wall_s']:.1f} s"
            )
    ratios = {k: v["slabs"]["peak_bytes"] / v["whole"]["peak_bytes"] for k, v in stats.items()}
    print(f"{'':14s}{'rel error':>12s}{'peak ratio':>12s}{'work ratio':>12s}")
    print(f"{'slabs/whole':14s}{relative:12.2e}{ratios['held']:12.3f}{plan.work_ratio:12.3f}")
    print(f"max |diff| {np.abs(diff).max():.3f} HU, mean |diff| {np.abs(diff).mean():.4f} HU")

    paper = preset("paper").vae  # counted: no VAE built
    print(
        "paper latent 4x120x120x64 (whole decode estimate "
        f"{decode_bytes_per_latent_voxel(paper) * 120 * 120 * 64 / 2**30:.0f} GiB):"
    )
    for gib in (12, 16, 24, 48, 80, 160):
        p = plan_decode((120, 120, 64), gib << 30, paper)
        where = "host" if p.offload else "device"
        print(
            f"  budget {gib:3d} GiB: {p.num_tiles:3d} slabs of {p.tile}, activations on the "
            f"{where}, work ratio {p.work_ratio:.3f}"
        )
    print(
        f"  before: 32^3 tiles, overlap 0.25 (MONAI sliding window): 75 tiles, work ratio "
        f"{75 * 32**3 / (120 * 120 * 64):.3f}, each tile with its own GroupNorm statistics"
    )
    if "glibc default" in ratios:
        print(f"RATIO decode_peak_glibc_default {ratios['glibc default']:.3f}")
    print(f"RATIO decode_peak {ratios['held']:.3f}")


if __name__ == "__main__":
    main()
