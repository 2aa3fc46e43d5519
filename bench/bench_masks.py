"""A label map's CPU cost per record at the paper's size (480x480x256 at
1x1x1.5 mm), before and after, side by side: the class mapping (np.unique,
done twice per record before; a lookup table once now) and the latent
occupancy (int64 keys on the CPU before; int32 keys counted on the model's
device now). The output keeps apart what stays on the host whatever the
device (the mapping, and the hand-over of the uint8 index: a pageable
host-to-device copy stages it through a pinned buffer, one memcpy, timed
here as one) from the occupancy count, which runs on the model's device:
`--device cpu` (the default here) counts it on the CPU standing in for the
device, `--device cuda` on an accelerator (timed with a synchronise; not
CPU). The phantom drawing itself is timed apart.

    .venv/bin/python bench/bench_masks.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from phantom.legend import LABELS
from phantom.world import make_mask
from report2ct.config import ControlConfig
from report2ct.control import MaskError, class_occupancy, legend_lookup, to_class_index

SHAPE, SPACING = (480, 480, 256), (1.0, 1.0, 1.5)


def unique_index(mask, control):
    """The mapping as it was: np.unique(return_inverse=True)."""
    lookup = legend_lookup(control)
    values, inverse = np.unique(mask, return_inverse=True)
    if any(int(v) not in lookup for v in values):
        raise MaskError("unknown")
    channels = np.array([lookup[int(v)] for v in values], dtype=np.uint8)
    return channels[inverse].reshape(mask.shape)


def int64_occupancy(index, num_classes, factor):
    """The occupancy as it was: int64 keys built on the CPU."""
    index = torch.as_tensor(np.asarray(index), dtype=torch.long)
    X, Y, Z = index.shape
    x, y, z = X // factor, Y // factor, Z // factor
    block = (
        torch.arange(X).div(factor, rounding_mode="floor")[:, None, None] * (y * z)
        + torch.arange(Y).div(factor, rounding_mode="floor")[None, :, None] * z
        + torch.arange(Z).div(factor, rounding_mode="floor")[None, None, :]
    )
    counts = torch.bincount(
        (index * (x * y * z) + block).reshape(-1), minlength=(num_classes + 1) * x * y * z
    )
    return counts.view(num_classes + 1, x, y, z)[1:].float() / factor**3


def core_seconds(fn):
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    control = ControlConfig(
        legend=tuple((label.value, label.name) for label in LABELS if label.value)
    )
    K = control.num_classes
    draw_s, (mask, _) = core_seconds(
        lambda: make_mask(
            args.seed,
            shape=SHAPE,
            spacing_mm=SPACING,
            prevalence=0.0,
            requested={"Pleural effusion": 1, "Cardiomegaly": 1},
        )
    )
    print(f"phantom label map {SHAPE} drawn in {draw_s:.2f} core-s (separate from the mapping)")
    as_int16 = mask.astype(np.int16)  # a NIfTI mask's usual dtype: the table path, no identity
    mapping = {int(v): name for v, name in control.legend} | {0: "background"}

    old_map_s, old_index = core_seconds(lambda: unique_index(mask, control))
    old_occ_s, old_occ = core_seconds(lambda: int64_occupancy(old_index, K, 4))
    new_map_s, new_index = core_seconds(lambda: to_class_index(mask, control))
    table_s, table_index = core_seconds(lambda: to_class_index(as_int16, control, mapping))
    new_occ_s, new_occ = core_seconds(lambda: class_occupancy(new_index, K, 4, device="cpu"))
    assert np.array_equal(old_index, new_index) and np.array_equal(old_index, table_index)
    assert torch.equal(old_occ, new_occ)

    device = torch.device(args.device)
    staging = np.empty_like(new_index)  # the driver's pinned staging buffer, stood in
    handover_s, _ = core_seconds(lambda: np.copyto(staging, new_index))
    if device.type == "cuda":
        class_occupancy(new_index, K, 4, device=device)  # warm-up
        torch.cuda.synchronize(device)
        wall = time.perf_counter()
        cpu_s, device_occ = core_seconds(lambda: class_occupancy(new_index, K, 4, device=device))
        torch.cuda.synchronize(device)
        device_s = time.perf_counter() - wall
        assert torch.equal(device_occ.cpu(), new_occ)
        device_line = f"{device_s:.3f} s on {device} ({cpu_s:.3f} core-s to launch it)"
    else:
        device_s = new_occ_s
        device_line = f"{new_occ_s:.2f} core-s on the CPU standing in for the device"

    old_total = 2 * old_map_s + old_occ_s
    host_phantom = new_map_s + handover_s
    host_table = table_s + handover_s
    print(
        f"before (all on the host): np.unique mapping {old_map_s:.2f} core-s x 2 per record, "
        f"occupancy {old_occ_s:.2f} core-s: {old_total:.2f} core-s"
    )
    print("now, per record:")
    print(
        f"  host   mapping (lookup table, once)  {new_map_s:6.3f} core-s phantom map "
        f"(identity table), {table_s:.3f} core-s int16 map through a declared mapping"
    )
    print(
        f"  host   hand-over of the uint8 index  {handover_s:6.3f} core-s "
        f"({new_index.nbytes / 1e6:.0f} MB, one staging memcpy)"
    )
    print(
        f"  host   total                         {host_phantom:6.3f} core-s phantom, "
        f"{host_table:.3f} core-s declared mapping (goal <= 0.5)"
    )
    print(f"  device occupancy (int32 keys, bincount) {device_line}")
    print(f"{'':22s}{'host core-s':>12s}{'device':>10s}{'before':>10s}")
    print(f"{'declared mapping':22s}{host_table:12.3f}{device_s:10.3f}{old_total:10.2f}")
    print(f"RATIO masks_host {host_table / old_total:.3f}")


if __name__ == "__main__":
    main()
