"""Mask adherence against references: phantoms score near 1 against their
own label maps, a tissue swapped for another scores 0 for that tissue, and a
volume against someone else's map scores far lower."""

import pytest

from evaluation.adherence import mask_adherence, through_vae
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


@pytest.mark.slow
def test_demo_bundle_controlnet_follows_the_map():
    """Measured with bench/bench_mask_adherence.py over 16 phantoms: see
    docs/masks.md. Here two phantoms' maps: the ControlNet puts tissue where
    the map says far better than the same request without it, and about as
    well as the bundle's own VAE reproduces the phantoms themselves (every
    generated volume is decoded by it: the ceiling for this bundle)."""
    from report2ct.bundle import load_bundle
    from report2ct.pipeline import VolumeRequest, generate

    model = load_bundle("report2ct/bundles/demo")
    config = model.config
    classes = dict(config.control.legend)
    shape, spacing = config.default_shape, config.default_spacing_mm
    cases = [make_phantom(seed, shape=shape, spacing_mm=spacing) for seed in (9100, 9101)]

    def adherence(volumes):
        return mask_adherence((v, p.mask, classes) for v, p in zip(volumes, cases, strict=True))

    def generated(*, mask: bool):
        requests = [
            VolumeRequest(
                seed=p.seed,
                findings=p.findings,
                impression=p.impression,
                labels=p.labels,
                spacing_mm=spacing,
                mask=p.mask if mask else None,
            )
            for p in cases
        ]
        return generate(model, requests).volumes_hu

    with_map, without = adherence(generated(mask=True)), adherence(generated(mask=False))
    ceiling = adherence(through_vae(model.codec, [p.volume_hu for p in cases]))
    assert with_map["in_body"] > without["in_body"] + 0.03, (with_map, without)
    assert with_map["in_body"] > 0.9 * ceiling["in_body"], (with_map, ceiling)
    assert with_map["per_tissue"]["lung"]["fraction"] > 0.95, with_map
