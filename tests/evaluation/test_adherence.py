"""Mask adherence against references: phantoms score near 1 against their
own label maps, a tissue swapped for another scores 0 for that tissue, and a
volume against someone else's map scores far lower."""

import pytest

from evaluation.adherence import mask_adherence
from phantom.legend import BY_NAME, LABELS
from phantom.world import make_phantom

CLASSES = {label.value: label.name for label in LABELS if label.value}
SHAPE, SPACING = (48, 48, 32), (8.0, 8.0, 10.0)


@pytest.fixture(scope="module")
def phantoms():
    requested = {"Pleural effusion": 1, "Cardiomegaly": 1}
    return [
        make_phantom(seed, shape=SHAPE, spacing_mm=SPACING, requested=requested)
        for seed in range(4)
    ]


def test_phantoms_adhere_to_their_own_masks(phantoms):
    result = mask_adherence((p.volume_hu, p.mask, CLASSES) for p in phantoms)
    assert result["volumes"] == 4
    assert result["overall"] > 0.9 and result["in_body_interior"] > 0.97, result
    assert result["per_tissue"]["lung"]["fraction_interior"] > 0.99
    assert result["per_tissue"]["fluid"]["voxels"] > 0


def test_fluid_drawn_as_fat_fails_exactly_the_fluid_voxels(phantoms):
    fluid = BY_NAME["pleural_effusion"].value
    cases = []
    for p in phantoms:
        volume = p.volume_hu.copy()
        volume[p.mask == fluid] = -100  # fat where the map asks for fluid
        cases.append((volume, p.mask, CLASSES))
    result = mask_adherence(cases)
    assert result["per_tissue"]["fluid"]["fraction"] == 0.0
    honest = mask_adherence((p.volume_hu, p.mask, CLASSES) for p in phantoms)
    lost = honest["per_tissue"]["fluid"]["fraction"] * honest["per_tissue"]["fluid"]["voxels"]
    total = sum(t["voxels"] for t in honest["per_tissue"].values())
    assert result["overall"] == pytest.approx(honest["overall"] - lost / total, abs=1e-9)


def test_someone_elses_mask_scores_far_lower(phantoms):
    own = mask_adherence((p.volume_hu, p.mask, CLASSES) for p in phantoms)
    shifted = phantoms[1:] + phantoms[:1]
    other = mask_adherence(
        (p.volume_hu, q.mask, CLASSES) for p, q in zip(phantoms, shifted, strict=True)
    )
    assert other["in_body"] < own["in_body"] - 0.05, (own["in_body"], other["in_body"])
    with pytest.raises(ValueError, match="not one grid"):
        mask_adherence([(phantoms[0].volume_hu, phantoms[0].mask[:-1], CLASSES)])
