"""The phantom world: determinism, findings that change their region the way
they should, and reports that say exactly what is drawn."""

import numpy as np
import pytest

from phantom.legend import BY_NAME, FINDING_CLASSES, NOT_RENDERED, RENDERED_FINDINGS
from phantom.world import draw, make_mask, make_phantom
from report2ct.labels import CTRATE_LABELS

V = {name: label.value for name, label in BY_NAME.items()}
NONE = dict.fromkeys(RENDERED_FINDINGS, 0)


def test_same_seed_same_bytes_and_varied_anatomy():
    a, b, c = make_phantom(5), make_phantom(5), make_phantom(6)
    assert a.volume_hu.tobytes() == b.volume_hu.tobytes()
    assert a.mask.tobytes() == b.mask.tobytes()
    assert (a.findings, a.impression) == (b.findings, b.impression)
    assert a.mask.tobytes() != c.mask.tobytes()
    lungs = [int((make_mask(s, requested=NONE)[0] == V["lung"]).sum()) for s in range(4)]
    assert len(set(lungs)) == 4  # natural variation between phantoms


def test_anatomy_has_realistic_values():
    from scipy.ndimage import binary_erosion

    p = make_phantom(1, requested=NONE)

    def mean(name):  # over the class's interior: edges mix with neighbours (partial volume)
        core = binary_erosion(p.mask == V[name])
        return float(p.volume_hu[core if core.any() else p.mask == V[name]].mean())

    assert -900 < mean("lung") < -780
    assert -130 < mean("subcutaneous_fat") < -70
    assert 20 < mean("muscle") < 80 and 20 < mean("heart") < 70 and 40 < mean("liver") < 90
    assert mean("spine") > 250 and mean("rib") > 150  # thin ribs lose contrast to partial volume
    assert mean("airway") < -850
    assert float(p.volume_hu[p.mask == 0].mean()) < -950
    for name in (
        "subcutaneous_fat",
        "muscle",
        "lung",
        "heart",
        "aorta",
        "airway",
        "spine",
        "rib",
        "liver",
        "pulmonary_vessel",
    ):
        assert (p.mask == V[name]).sum() > 0, name


@pytest.mark.parametrize("side", ["right", "left"])
def test_pleural_effusion_fills_the_named_side(side):
    for seed in range(12):  # find a seed whose effusion lands on `side`
        anatomy, findings = draw(seed, requested={**NONE, "Pleural effusion": 1})
        (effusion,) = [f for f in findings if f.label == "Pleural effusion"]
        if effusion.side == side:
            break
    fluid = anatomy.labels == V["pleural_effusion"]
    x = np.arange(fluid.shape[0])[:, None, None] - fluid.shape[0] / 2
    right, left = int((fluid & (x < 0)).sum()), int((fluid & (x > 0)).sum())
    named, other = (right, left) if side == "right" else (left, right)
    assert named > 200 and other == 0
    p = make_phantom(seed, requested={**NONE, "Pleural effusion": 1})
    assert -20 < float(p.volume_hu[p.mask == V["pleural_effusion"]].mean()) < 40  # fluid density


def test_cardiomegaly_enlarges_the_heart_by_a_clear_margin():
    normal = [(make_mask(s, requested=NONE)[0] == V["heart"]).sum() for s in range(6)]
    enlarged = [
        (make_mask(s, requested={**NONE, "Cardiomegaly": 1})[0] == V["heart"]).sum()
        for s in range(6)
    ]
    assert min(enlarged) > max(normal)
    assert np.mean(enlarged) > 1.6 * np.mean(normal)


def test_nodule_at_the_reported_lobe_with_the_reported_size():
    for seed in range(8):
        anatomy, (nodule,) = draw(seed, requested={**NONE, "Lung nodule": 1})
        voxels = anatomy.labels == V["lung_nodule"]
        spacing = np.array([4.0, 4.0, 5.0])
        diameter = 2 * (3 * voxels.sum() * spacing.prod() / (4 * np.pi)) ** (1 / 3)
        assert abs(diameter - nodule.size_mm) <= 5.0, (seed, diameter, nodule.size_mm)
        centre = np.round(np.argwhere(voxels).mean(axis=0)).astype(int)
        from phantom.anatomy import LOBE_IDS

        assert anatomy.lobe[tuple(centre)] == LOBE_IDS[(nodule.side, nodule.lobe)], (seed, nodule)


def test_emphysema_lowers_lung_hu_and_calcifications_are_bright_on_the_wall():
    p = make_phantom(
        3,
        requested={
            **NONE,
            "Emphysema": 1,
            "Arterial wall calcification": 1,
            "Coronary artery wall calcification": 1,
        },
    )
    lung_like = np.isin(p.mask, [V["lung"], V["emphysema"]])
    q = make_phantom(3, requested=NONE)
    assert p.volume_hu[lung_like].mean() < q.volume_hu[q.mask == V["lung"]].mean() - 10
    assert (
        p.volume_hu[p.mask == V["emphysema"]].mean() < q.volume_hu[q.mask == V["lung"]].mean() - 20
    )
    from scipy.ndimage import binary_dilation

    calc = p.mask == V["arterial_calcification"]
    assert calc.sum() > 0 and p.volume_hu[calc].mean() > 300
    near_aorta = binary_dilation(p.mask == V["aorta"], iterations=2)
    assert (calc & near_aorta).sum() / calc.sum() > 0.9
    coronary = p.mask == V["coronary_calcification"]
    assert coronary.sum() > 0 and p.volume_hu[coronary].mean() > 250


IMPRESSION_TERMS = {
    "Pleural effusion": "pleural effusion",
    "Lung nodule": "nodule",
    "Consolidation": "consolidation",
    "Lung opacity": "ground-glass",
    "Atelectasis": "atelectasis",
    "Emphysema": "emphysema",
    "Cardiomegaly": "cardiomegaly",
    "Pericardial effusion": "pericardial effusion",
    "Lymphadenopathy": "lymphadenopathy",
    "Arterial wall calcification": "thoracic aorta",
    "Coronary artery wall calcification": "coronary",
    "Hiatal hernia": "hiatal hernia",
    "Medical material": "in place",
}


def test_reports_say_exactly_what_is_drawn():
    for seed in range(30):
        p = make_phantom(seed, prevalence=0.4)
        impression = p.impression.lower()
        for label, term in IMPRESSION_TERMS.items():
            assert (term in impression) == bool(p.labels[label]), (seed, label, p.impression)
        for label in NOT_RENDERED:
            assert p.labels[label] == 0
        for label, classes in FINDING_CLASSES.items():  # the mask agrees with the labels
            if label != "Cardiomegaly":  # its class is the heart itself
                drawn = bool(np.isin(p.mask, [V[c] for c in classes]).any())
                assert drawn == bool(p.labels[label]), (seed, label)
        assert set(p.labels) == set(CTRATE_LABELS)
        text = p.findings.lower()
        if not p.labels["Pleural effusion"]:
            assert (
                "pleural effusion" not in text
                or "no pleural effusion" in text
                or "effusion-thickening was not" in text
            )
        for f in p.findings_list:
            if f.label == "Lung nodule":
                assert (
                    f"{f.size_mm:.0f} mm" in p.findings
                    and f"{f.lobe} lobe of the {f.side} lung" in p.findings
                )
        assert 80 <= len(p.findings.split()) <= 400


def test_wording_varies_between_phantoms():
    openings = {make_phantom(seed, requested=NONE).findings.split(".")[0] for seed in range(12)}
    assert len(openings) >= 2


def test_a_large_effusion_brings_compressive_atelectasis_that_is_labelled_and_reported():
    free = {k: v for k, v in NONE.items() if k != "Atelectasis"}  # atelectasis left to the world
    for seed in range(40):
        p = make_phantom(seed, requested={**free, "Pleural effusion": 1})
        (effusion,) = [f for f in p.findings_list if f.label == "Pleural effusion"]
        other = [
            f
            for f in p.findings_list
            if f.label == "Atelectasis" and f.detail.get("kind") != "compressive"
        ]
        if effusion.amount != "small" and not other:  # no atelectasis of its own
            break
    assert p.labels["Atelectasis"] == 1
    assert "compressive atelectasis" in p.impression.lower()
    collapsed = p.mask == V["atelectasis"]
    fluid = p.mask == V["pleural_effusion"]
    y = np.arange(p.mask.shape[1])[None, :, None]
    # the collapsed band lies above (anterior to) the dependent fluid
    assert (
        collapsed.sum() > 0
        and np.broadcast_to(y, p.mask.shape)[collapsed].mean()
        > np.broadcast_to(y, p.mask.shape)[fluid].mean()
    )
    # requested off, it is neither drawn nor labelled
    q = make_phantom(seed, requested={**NONE, "Pleural effusion": 1})  # NONE has it off
    assert q.labels["Atelectasis"] == 0 and not (q.mask == V["atelectasis"]).any()


def test_requesting_a_label_the_phantom_cannot_draw_fails_clearly():
    with pytest.raises(ValueError, match="never rendered"):
        make_mask(0, requested={"Bronchiectasis": 1})
    with pytest.raises(ValueError, match="not a CT-RATE label"):
        make_mask(0, requested={"Pneumothorax": 1})
    mask, findings = make_mask(0, requested={**NONE, "Bronchiectasis": 0, "Lung nodule": 1})
    assert [f.label for f in findings] == ["Lung nodule"]
    assert (mask == V["lung_nodule"]).any()


def test_the_world_is_physical_not_voxel_sized():
    """The same seed on a finer grid over the same field of view draws the
    same anatomy (volumes in mL agree), and writes 256 x 256 x 128."""
    coarse, _ = make_mask(4, requested={**NONE, "Lung nodule": 1})
    fine, (nodule,) = make_mask(
        4, shape=(256, 256, 128), spacing_mm=(1.5, 1.5, 2.5), requested={**NONE, "Lung nodule": 1}
    )
    assert fine.shape == (256, 256, 128)
    for name in ("lung", "heart", "liver"):
        ml_coarse = (coarse == V[name]).sum() * 4 * 4 * 5 / 1000
        ml_fine = (fine == V[name]).sum() * 1.5 * 1.5 * 2.5 / 1000
        # same field of view in z (64 x 5 mm vs 128 x 2.5 mm); x/y differ (384 vs 384 mm)
        assert abs(ml_fine - ml_coarse) / ml_coarse < 0.1, (name, ml_coarse, ml_fine)
    diameter = 2 * (3 * (fine == V["lung_nodule"]).sum() * 1.5 * 1.5 * 2.5 / (4 * np.pi)) ** (1 / 3)
    assert abs(diameter - nodule.size_mm) <= 2.5
