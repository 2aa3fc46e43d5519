"""Does a bundle draw what its reports say? Paired generations on the
phantom world: for each seed, a normal phantom report and the same seed's
report with one finding requested, sampled from the same noise, so the
difference is the report's doing.

Measured on the generated HU volumes only (no network). Regions come from the
normal volume of each pair and are applied to both: the body is each axial
slice's filled outline above -500 HU, the lungs the air inside it.

    pleural effusion : fluid-density voxels (-20..60 HU) in the pleural region
                       (the dependent half of the lungs' bounding box), mL
    cardiomegaly     : soft tissue (0..100 HU) between the lungs, mL
    lung nodule      : soft-tissue voxels (> -300 HU) inside the lungs, mL
    emphysema        : lung voxels below -930 HU, mL
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from phantom.legend import RENDERED_FINDINGS
from phantom.world import make_phantom

NONE = dict.fromkeys(RENDERED_FINDINGS, 0)
FINDINGS = ("Pleural effusion", "Cardiomegaly", "Lung nodule", "Emphysema")


def regions(normal: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean regions of an (X, Y, Z) HU volume (RAS+: y grows anterior)."""
    body = np.stack(
        [ndimage.binary_fill_holes(normal[:, :, z] > -500) for z in range(normal.shape[2])],
        axis=2,
    )
    lungs = body & (normal < -500)
    box = np.zeros_like(body)
    between = np.zeros_like(body)
    if lungs.any():
        (x0, x1), (y0, y1), (z0, z1) = (
            (idx.min(), idx.max() + 1)
            for idx in (np.flatnonzero(lungs.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
        )
        box[x0:x1, y0 : (y0 + y1) // 2, z0:z1] = True  # the dependent (posterior) half
        between[x0:x1, :, z0:z1] = True
    inside = ndimage.binary_closing(lungs, iterations=2)  # lungs with their small holes
    return {
        "body": body,
        "lungs": lungs,
        "pleural": body & box,
        "between": body & between,
        "inside": inside,
    }


def metric(name: str, volume: np.ndarray, region: dict[str, np.ndarray], voxel_ml: float) -> float:
    """`name`'s image signature in `volume` (mL), inside regions of its pair's normal volume."""
    if name == "Pleural effusion":
        hit = region["pleural"] & (volume >= -20) & (volume <= 60)
    elif name == "Cardiomegaly":
        hit = region["between"] & (volume >= 0) & (volume <= 100)
    elif name == "Lung nodule":
        hit = region["inside"] & (volume > -300)
    elif name == "Emphysema":
        hit = region["lungs"] & (volume < -930)
    else:
        raise ValueError(f"no image response metric for {name!r}; measured: {', '.join(FINDINGS)}")
    return float(hit.sum()) * voxel_ml


def phantom_report(seed: int, requested: dict[str, int]) -> tuple[str, str]:
    """(FINDINGS, IMPRESSION) of phantom `seed` with `requested` findings
    (drawn on a small grid: only the text is used)."""
    p = make_phantom(seed, shape=(24, 24, 16), spacing_mm=(16.0, 16.0, 20.0), requested=requested)
    return p.findings, p.impression


ASKED_BY = ("text", "labels", "both")
# The finding stated in one text field only, the other field the normal
# report's: which of the two context tokens carries a finding's response.
TEXT_PARTS = ("findings", "impression")
WAYS = ASKED_BY + TEXT_PARTS


def response_request(seed: int, requested: dict[str, int], *, by: str, spacing_mm):
    """The request of phantom `seed` with `requested` findings, asked `by`
    one of WAYS: "text" with the phantom's report; "labels" with the labels
    alone (the rendered findings all given); "both" with the report and its
    labels, as a CT-RATE record asks; "findings" / "impression" with that
    field of the report and the other field of the normal report."""
    from report2ct.pipeline import VolumeRequest

    if by not in WAYS:
        raise ValueError(f"by must be one of {WAYS}, got {by!r}")
    if by == "labels":
        return VolumeRequest(seed=seed, labels=requested, spacing_mm=spacing_mm)
    findings, impression = phantom_report(seed, requested)
    if by in TEXT_PARTS:
        normal_findings, normal_impression = phantom_report(seed, NONE)
        if by == "findings":
            impression = normal_impression
        else:
            findings = normal_findings
    return VolumeRequest(
        seed=seed,
        findings=findings,
        impression=impression,
        labels=requested if by == "both" else None,
        spacing_mm=spacing_mm,
    )


def paired_response(
    model,
    finding: str,
    seeds: Sequence[int],
    *,
    num_steps: int | None = None,
    normal: np.ndarray | None = None,
    by: str = "text",
) -> tuple[np.ndarray, np.ndarray]:
    """(per-seed change of `finding`'s metric in mL, the normal volumes):
    the same seed's request with `finding` minus without it, asked `by` one
    of WAYS (see `response_request`)."""
    from report2ct.pipeline import generate

    spacing = model.config.default_spacing_mm
    voxel_ml = float(np.prod(spacing)) / 1000

    def volumes(requested: dict[str, int]):
        requests = [response_request(s, requested, by=by, spacing_mm=spacing) for s in seeds]
        return generate(model, requests, num_steps=num_steps).volumes_hu

    if normal is None:
        normal = volumes(NONE)
    with_finding = volumes({**NONE, finding: 1})
    diffs = []
    for a, b in zip(with_finding, normal, strict=True):
        region = regions(b)
        diffs.append(metric(finding, a, region, voxel_ml) - metric(finding, b, region, voxel_ml))
    return np.array(diffs), normal


def phantom_response(
    finding: str, seeds: Sequence[int], *, shape, spacing_mm
) -> tuple[float, float]:
    """The phantom world's own effect of `finding` on its metric, the size a
    bundle's response should approach (more is not better): (mean over the
    phantoms of `seeds` drawn with the finding minus the mean over the same
    seeds' normal phantoms, its standard error), each volume measured in its
    own regions. Not paired: requesting a finding redraws a phantom's
    anatomy, so the same seed's two phantoms differ beyond the finding."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000

    def measured(requested: dict[str, int]) -> np.ndarray:
        volumes = (
            make_phantom(s, shape=shape, spacing_mm=spacing_mm, requested=requested).volume_hu
            for s in seeds
        )
        return np.array([metric(finding, v, regions(v), voxel_ml) for v in volumes])

    sick, normal = measured({**NONE, finding: 1}), measured(NONE)
    sem = np.sqrt(sick.var(ddof=1) / len(sick) + normal.var(ddof=1) / len(normal))
    return float(sick.mean() - normal.mean()), float(sem)
