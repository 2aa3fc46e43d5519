"""Mask adherence: does a volume generated from a label map put the right
tissue where the map says? For every voxel, the tissue class its mask value
belongs to (the phantom world's legend: air, lung, fat, soft tissue, fluid,
bone, calcification, metal) and whether the generated HU lies in that
tissue's range.

    result = mask_adherence([(volume_hu, mask, classes)])   # classes: value -> name
    result["overall"], result["per_tissue"]["fluid"]["fraction"]
    ceiling = mask_adherence((v, mask, classes) for v in through_vae(codec, [volume_hu]))

Counted over every voxel and over *interior* voxels (each class's region
eroded by one voxel), which leaves out the partial-volume rim where even a
real scan mixes two tissues. The ranges are wide enough for real CT texture
and noise (the phantoms themselves score ~0.99 interior) and narrow enough to
tell the tissues apart (fluid is not fat, lung is not soft tissue).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from scipy import ndimage

from phantom.legend import BY_NAME

TISSUE_HU: dict[str, tuple[float, float]] = {
    "air": (-1100.0, -900.0),
    "lung": (-1000.0, -300.0),
    "fat": (-250.0, -20.0),
    "soft_tissue": (-20.0, 150.0),
    "fluid": (-30.0, 50.0),
    "bone": (150.0, 2000.0),
    "calcification": (150.0, 3100.0),
    "metal": (500.0, 4000.0),  # the model's HU window ends at 1000
}


def through_vae(codec, volumes_hu) -> np.ndarray:
    """The volumes encoded and decoded by a bundle's VAE: what its decoder
    makes of the truth itself, the reference for volumes the same decoder
    draws from generated latents (a bundle's practical ceiling)."""
    import torch

    with torch.no_grad():
        return np.stack(
            [
                codec.decode(codec.encode(torch.from_numpy(v).float()[None, None]))[0, 0].numpy()
                for v in volumes_hu
            ]
        )


OUTSIDE = "outside_body"  # value 0: air around the patient, scored apart (it is most voxels)


def tissue_of(classes: Mapping[int, str]) -> dict[int, str]:
    """Mask value -> tissue, for the classes whose name the phantom legend knows."""
    tissues = {value: BY_NAME[name].tissue for value, name in classes.items() if name in BY_NAME}
    return {**tissues, 0: OUTSIDE}


def _count(volume_hu, mask, classes, *, interior: bool) -> dict[str, list[int]]:
    counts: dict[str, list[int]] = {}
    for value, tissue in tissue_of(classes).items():
        region = mask == value
        if interior:
            region = ndimage.binary_erosion(region)
        if not region.any():
            continue
        low, high = TISSUE_HU["air" if tissue == OUTSIDE else tissue]
        values = volume_hu[region]
        hit = int(((values >= low) & (values <= high)).sum())
        total = counts.setdefault(tissue, [0, 0])
        total[0] += hit
        total[1] += int(region.sum())
    return counts


def mask_adherence(
    cases: Iterable[tuple[np.ndarray, np.ndarray, Mapping[int, str]]],
) -> dict[str, object]:
    """Adherence over (volume_hu, mask, classes) triples, pooled over voxels:
    {"overall", "overall_interior", "in_body", "in_body_interior",
    "per_tissue": {tissue: {"fraction", "fraction_interior", "voxels"}},
    "volumes"}; `in_body` leaves out the air around the patient."""
    pooled = {True: {}, False: {}}
    n = 0
    for volume_hu, mask, classes in cases:
        if volume_hu.shape != mask.shape:
            raise ValueError(f"volume {volume_hu.shape} and mask {mask.shape} are not one grid")
        n += 1
        for interior in (False, True):
            for tissue, (hit, total) in _count(volume_hu, mask, classes, interior=interior).items():
                acc = pooled[interior].setdefault(tissue, [0, 0])
                acc[0] += hit
                acc[1] += total

    def fraction(acc):
        return acc[0] / acc[1] if acc[1] else None  # None: no such voxels (JSON has no NaN)

    def overall(table, *, body_only=False):
        kept = [a for tissue, a in table.items() if not (body_only and tissue == OUTSIDE)]
        hit, total = sum(a[0] for a in kept), sum(a[1] for a in kept)
        return hit / total if total else None

    return {
        "volumes": n,
        "overall": overall(pooled[False]),
        "overall_interior": overall(pooled[True]),
        "in_body": overall(pooled[False], body_only=True),
        "in_body_interior": overall(pooled[True], body_only=True),
        "per_tissue": {
            tissue: {
                "fraction": fraction(acc),
                "fraction_interior": fraction(pooled[True].get(tissue, [0, 0])),
                "voxels": acc[1],
            }
            for tissue, acc in sorted(pooled[False].items())
        },
        "ranges_hu": TISSUE_HU,
    }
