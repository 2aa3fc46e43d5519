"""The phantom world: determinism, findings that change their region the way
they should, and reports that say exactly what is drawn."""

import numpy as np
import pytest

from phantom.legend import BY_NAME, NOT_RENDERED, RENDERED_FINDINGS
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
        (effusion,) = findings
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
