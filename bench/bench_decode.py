"""Decoding a large latent in memory-sized slabs vs whole, side by side.

A realistic latent (a chest phantom at 256x256x128, 1.5x1.5x2.5 mm, encoded
by the bundle's VAE) is decoded whole and by `LatentCodec.decode_volume`
under a budget of `--budget-fraction` of the whole decode's estimated
memory, each in its own process so each peak memory is its own (resident
memory on the CPU; `--device cuda`: the allocator's peak). Prints the plan
(slabs, decoded/needed work), both peaks above the loaded model, and side
by side the slab output's relative difference from the whole one, the peak
ratio (slabs/whole) and the work ratio; then the plans at the paper's latent
(4x120x120x64) for a few device budgets, counted without running the paper
VAE.

    .venv/bin/python bench/bench_decode.py [--bundle report2ct/bundles/demo]
"""

from __future__ import annotations

import argparse
import json
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


def run_child(args, how: str, scratch: Path, budget: int) -> tuple[dict, np.ndarray]:
    out = scratch / f"{how}.npy"
    command = [sys.executable, __file__, "--child", how, "--latent", str(scratch / "latent.pt")]
    command += ["--bundle", str(args.bundle), "--out", str(out), "--budget", str(budget)]
    command += ["--threads", str(args.threads), "--device", args.device]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
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
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        torch.save(latent, scratch / "latent.pt")
        whole_stats, whole = run_child(args, "whole", scratch, budget)
        tiled_stats, tiled = run_child(args, "tiled", scratch, budget)
    diff = tiled.astype(np.float64) - whole.astype(np.float64)
    relative = np.linalg.norm(diff) / np.linalg.norm(whole.astype(np.float64))
    for name, stats in (("whole", whole_stats), ("slabs", tiled_stats)):
        print(
            f"{name} decode: peak {stats['peak_bytes'] / 2**30:.2f} GiB above the model, "
            f"{stats['cpu_s']:.1f} core-s, {stats['wall_s']:.1f} s"
        )
    print(
        f"measured activations per output voxel (whole): "
        f"{whole_stats['peak_bytes'] / (codec.config.num_channels[0] * np.prod(SHAPE) * 4):.2f} "
        f"x channels x 4 bytes; (slabs): "
        f"{tiled_stats['peak_bytes'] / (codec.config.num_channels[0] * np.prod(SHAPE) * 4):.2f}"
    )
    peak_ratio = tiled_stats["peak_bytes"] / whole_stats["peak_bytes"]
    print(f"{'':14s}{'rel error':>12s}{'peak ratio':>12s}{'work ratio':>12s}")
    print(f"{'slabs/whole':14s}{relative:12.2e}{peak_ratio:12.3f}{plan.work_ratio:12.3f}")
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
    print(f"RATIO decode_peak {peak_ratio:.3f}")


if __name__ == "__main__":
    main()
