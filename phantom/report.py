"""Reports in CT-RATE's style, written from a phantom's findings.

FINDINGS walks the chest in the order CT-RATE reports do (airways,
mediastinum and heart, vessels, lymph nodes, lungs, pleura, upper abdomen,
bones), states every present finding with its laterality, lobe and size, and
negates the absent ones, each with several phrasings; IMPRESSION lists the
present findings or calls the examination normal. Deterministic per seed.

Each finding's sentences live in `WORDING`, keyed by the same names as
`phantom.findings.PAINTERS`. Every phrasing choice draws from the report's
own random stream, so the order of the statements is part of the data set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from phantom.findings import Finding

Phrasings = tuple[str, ...]  # ways to say one thing; the report picks one


@dataclass(frozen=True)
class Wording:
    present: Callable[[Finding], Phrasings]  # its FINDINGS sentence
    impression: Callable[[Finding], str]  # its IMPRESSION line
    absent: Phrasings = ()  # its negation, where reports state one


def _where(f: Finding) -> str:
    if f.side == "bilateral":
        return f"the {f.lobe} lobes of both lungs" if f.lobe else "both lungs"
    return f"the {f.lobe} lobe of the {f.side} lung" if f.lobe else f"the {f.side} lung"


def _lobe_short(f: Finding) -> str:
    """'the right lower lobe' / 'both lower lobes' (IMPRESSION style)."""
    return f"both {f.lobe} lobes" if f.side == "bilateral" else f"the {f.side} {f.lobe} lobe"


def _fixed(*phrasings: str) -> Callable[[Finding], Phrasings]:
    """A finding stated the same whatever its attributes."""
    return lambda f: phrasings


def _named(f: Finding) -> str:
    return f"{f.label}."


def _pleural_effusion(f: Finding) -> Phrasings:
    where = "bilateral" if f.side == "bilateral" else f"{f.side}-sided"
    thickness = f.detail.get("thickness_mm")
    return (
        f"A {f.amount} {where} pleural effusion is observed, reaching {thickness} mm in its thickest part.",
        f"{f.amount.capitalize()} pleural effusion on the {f.side} side"
        + (" of both hemithoraces." if f.side == "bilateral" else " is present."),
    )


def _lung_nodule(f: Finding) -> Phrasings:
    return (
        f"A solid nodule measuring {f.size_mm:.0f} mm is observed in {_where(f)}.",
        f"There is a {f.size_mm:.0f} mm nodule in {_where(f)}.",
        f"A {f.size_mm:.0f} mm solid pulmonary nodule is seen in {_where(f)}.",
    )


def _located(*templates: str) -> Callable[[Finding], Phrasings]:
    """A finding stated by where it is (`{where}`: its lobe and side)."""
    return lambda f: tuple(t.format(where=_where(f)) for t in templates)


_compressive_atelectasis = _located(
    "Compressive atelectasis is observed in {where} adjacent to the effusion.",
    "Passive atelectasis secondary to the effusion is seen in {where}.",
)
_subsegmental_atelectasis = _located(
    "Subsegmental atelectasis is observed in {where}.",
    "Atelectatic changes are present in {where}.",
)


def _atelectasis(f: Finding) -> Phrasings:
    if f.detail.get("kind") == "compressive":
        return _compressive_atelectasis(f)
    return _subsegmental_atelectasis(f)


def _atelectasis_impression(f: Finding) -> str:
    term = "Compressive atelectasis" if f.detail.get("kind") == "compressive" else "Atelectasis"
    return f"{term} in {_lobe_short(f)}."


def _emphysema(f: Finding) -> Phrasings:
    return (
        f"{f.amount.capitalize()} centrilobular emphysematous changes are observed in the "
        "upper lobes of both lungs.",
        f"Emphysema, {f.amount}, predominantly in both upper lobes.",
    )


def _pericardial_effusion(f: Finding) -> Phrasings:
    return (
        f"Pericardial effusion reaching {f.size_mm:.0f} mm in thickness is observed.",
        f"There is a pericardial effusion measuring up to {f.size_mm:.0f} mm.",
    )


def _lymphadenopathy(f: Finding) -> Phrasings:
    return (
        f"A pathologically enlarged lymph node measuring {f.size_mm:.0f} mm in short axis is observed "
        f"in the {f.detail['station']} region.",
        f"Lymphadenopathy is present in the {f.detail['station']} station, "
        f"with a node of {f.size_mm:.0f} mm.",
    )


def _medical_material(f: Finding) -> Phrasings:
    return (
        f"A {f.detail['device']} is seen in the {f.side} anterior chest wall, with its lead "
        "extending to the heart.",
        f"Medical material consistent with a {f.detail['device']} is present on the {f.side} side.",
    )


# One entry per rendered finding, in the order IMPRESSION lists them.
WORDING: dict[str, Wording] = {
    "Pleural effusion": Wording(
        _pleural_effusion,
        lambda f: f"{f.amount.capitalize()} {f.side} pleural effusion.",
        absent=(
            "Pleural effusion-thickening was not detected.",
            "No pleural effusion was detected.",
            "There is no pleural effusion.",
        ),
    ),
    "Lung nodule": Wording(
        _lung_nodule,
        lambda f: f"{f.size_mm:.0f} mm nodule in the {f.side} {f.lobe} lobe.",
        absent=("No pulmonary nodule was detected.", "No nodule or mass was seen."),
    ),
    "Consolidation": Wording(
        _located(
            "Consolidation is observed in {where}.",
            "An area of consolidation is present in {where}.",
        ),
        lambda f: f"Consolidation in {_lobe_short(f)}.",
        absent=("No consolidation was detected.", "There is no consolidation."),
    ),
    "Lung opacity": Wording(
        _located(
            "Ground-glass opacities are observed in {where}.",
            "Patchy ground-glass density increases are seen in {where}.",
        ),
        lambda f: f"Ground-glass opacity in {_lobe_short(f)}.",
    ),
    "Atelectasis": Wording(_atelectasis, _atelectasis_impression),
    "Emphysema": Wording(_emphysema, _named),
    "Cardiomegaly": Wording(
        _fixed(
            "The heart is enlarged; the cardiothoracic ratio is increased.",
            "Cardiomegaly is observed.",
            "Heart size is increased (cardiomegaly).",
        ),
        _named,
        absent=(
            "Heart contour and size are normal.",
            "Heart size is within normal limits.",
            "Mediastinal main vascular structures, heart contour and size are normal.",
        ),
    ),
    "Pericardial effusion": Wording(
        _pericardial_effusion,
        _named,
        absent=(
            "Pericardial effusion-thickening was not observed.",
            "No pericardial effusion was detected.",
            "There is no pericardial effusion or thickening.",
        ),
    ),
    "Lymphadenopathy": Wording(
        _lymphadenopathy,
        _named,
        absent=(
            "No enlarged lymph nodes in prevascular, pre-paratracheal, subcarinal or bilateral hilar-axillary "
            "pathological dimensions were detected.",
            "No pathologically enlarged mediastinal or hilar lymph nodes were detected.",
        ),
    ),
    "Arterial wall calcification": Wording(
        _fixed(
            "Atherosclerotic calcified plaques are observed in the wall of the thoracic aorta.",
            "Calcific atherosclerotic changes are seen in the aortic wall.",
        ),
        lambda f: "Atherosclerotic changes in the thoracic aorta.",
        absent=(
            "Thoracic aorta diameter is normal.",
            "The thoracic aorta is of normal calibre without calcification.",
        ),
    ),
    "Coronary artery wall calcification": Wording(
        _fixed(
            "Calcifications are present in the coronary artery walls.",
            "Coronary artery wall calcifications are noted.",
        ),
        lambda f: "Coronary artery calcification.",
    ),
    "Hiatal hernia": Wording(
        _fixed(
            "A hiatal hernia is observed at the esophageal hiatus.",
            "Part of the stomach has herniated through the hiatus (hiatal hernia).",
        ),
        _named,
        absent=(
            "The esophagus is of normal calibre; no hiatal hernia was detected.",
            "No hiatal hernia is seen.",
        ),
    ),
    "Medical material": Wording(
        _medical_material, lambda f: f"{f.detail['device'].capitalize()} in place."
    ),
}

# The order FINDINGS states them in, by region.
MEDIASTINUM = (
    "Cardiomegaly",
    "Pericardial effusion",
    "Arterial wall calcification",
    "Coronary artery wall calcification",
    "Lymphadenopathy",
    "Medical material",
    "Hiatal hernia",
)
LUNGS = ("Emphysema", "Lung nodule", "Consolidation", "Lung opacity", "Atelectasis")
PLEURA = ("Pleural effusion",)

# Statements made of every phantom.
AIRWAYS: tuple[Phrasings, ...] = (
    (
        "Trachea and both main bronchi are open.",
        "Trachea and both main bronchi are in normal width and open.",
        "The trachea and main bronchi are patent.",
    ),
    (
        "No obstructive pathology was detected in the trachea and both main bronchi.",
        "No endobronchial lesion was seen.",
    ),
)
LUNG_WINDOW = ("When examined in the lung parenchyma window;", "In the lung parenchyma window,")
CLEAR_LUNGS = (
    "no mass or infiltrative lesion was detected in both lungs.",
    "both lungs are clear; no nodule, consolidation or opacity was detected.",
)
BELOW_THE_CHEST: tuple[Phrasings, ...] = (
    (
        "Upper abdominal organs included in the sections are normal.",
        "The liver dome and upper abdominal sections are unremarkable.",
    ),
    (
        "No lytic-destructive lesion was detected in the bone structures within the sections.",
        "Bone structures are natural.",
        "No lytic or sclerotic lesion was seen in the bones.",
    ),
)
NORMAL_IMPRESSION = (
    "Thorax CT examination within normal limits.",
    "No acute pathology in the thorax.",
    "Normal chest CT.",
)


class _Picker:
    """Picks one of several phrasings from the report's random stream."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def __call__(self, options: Phrasings) -> str:
        return options[int(self.rng.integers(len(options)))]


def write_report(findings: list[Finding], rng: np.random.Generator) -> tuple[str, str]:
    """(FINDINGS, IMPRESSION) text."""
    by = {f.label: f for f in findings}
    pick = _Picker(rng)
    sentences = [pick(options) for options in AIRWAYS]
    sentences += _statements(MEDIASTINUM, by, pick)
    sentences += _lungs(by, pick)
    sentences += _statements(PLEURA, by, pick)
    sentences += [pick(options) for options in BELOW_THE_CHEST]
    return " ".join(sentences), _impression(by, pick)


def _statements(names: tuple[str, ...], by: dict[str, Finding], pick: _Picker) -> list[str]:
    """Each finding stated if present, negated if absent (where reports negate it)."""
    sentences = []
    for name in names:
        wording = WORDING[name]
        if name in by:
            sentences.append(pick(wording.present(by[name])))
        elif wording.absent:
            sentences.append(pick(wording.absent))
    return sentences


def _lungs(by: dict[str, Finding], pick: _Picker) -> list[str]:
    """The lung window: the present findings, then the negations; clear
    lungs in one sentence when nothing is present."""
    sentences = [pick(LUNG_WINDOW)]
    present = [pick(WORDING[name].present(by[name])) for name in LUNGS if name in by]
    if not present:
        return [*sentences, pick(CLEAR_LUNGS)]
    negations = [WORDING[name].absent for name in LUNGS if name not in by]
    return sentences + present + [pick(absent) for absent in negations if absent]


def _impression(by: dict[str, Finding], pick: _Picker) -> str:
    lines = [wording.impression(by[name]) for name, wording in WORDING.items() if name in by]
    return " ".join(lines) if lines else pick(NORMAL_IMPRESSION)
