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

# pick(*phrasings) -> one of them, drawn from the report's stream
Pick = Callable[..., str]


def _picker(rng: np.random.Generator) -> Pick:
    def pick(*options: str) -> str:
        return options[int(rng.integers(len(options)))]

    return pick


def _where(f: Finding) -> str:
    if f.side == "bilateral":
        return f"the {f.lobe} lobes of both lungs" if f.lobe else "both lungs"
    return f"the {f.lobe} lobe of the {f.side} lung" if f.lobe else f"the {f.side} lung"


def _lobe_short(f: Finding) -> str:
    """'the right lower lobe' / 'both lower lobes' (IMPRESSION style)."""
    return f"both {f.lobe} lobes" if f.side == "bilateral" else f"the {f.side} {f.lobe} lobe"


@dataclass(frozen=True)
class Wording:
    present: Callable[[Finding, Pick], str]  # its FINDINGS sentence
    impression: Callable[[Finding], str]  # its IMPRESSION line
    absent: Callable[[Pick], str] | None = None  # the negation, where reports state one


# --- heart, mediastinum and vessels


def _cardiomegaly(f: Finding, p: Pick) -> str:
    return p(
        "The heart is enlarged; the cardiothoracic ratio is increased.",
        "Cardiomegaly is observed.",
        "Heart size is increased (cardiomegaly).",
    )


def _no_cardiomegaly(p: Pick) -> str:
    return p(
        "Heart contour and size are normal.",
        "Heart size is within normal limits.",
        "Mediastinal main vascular structures, heart contour and size are normal.",
    )


def _pericardial_effusion(f: Finding, p: Pick) -> str:
    return p(
        f"Pericardial effusion reaching {f.size_mm:.0f} mm in thickness is observed.",
        f"There is a pericardial effusion measuring up to {f.size_mm:.0f} mm.",
    )


def _no_pericardial_effusion(p: Pick) -> str:
    return p(
        "Pericardial effusion-thickening was not observed.",
        "No pericardial effusion was detected.",
        "There is no pericardial effusion or thickening.",
    )


def _arterial_calcification(f: Finding, p: Pick) -> str:
    return p(
        "Atherosclerotic calcified plaques are observed in the wall of the thoracic aorta.",
        "Calcific atherosclerotic changes are seen in the aortic wall.",
    )


def _no_arterial_calcification(p: Pick) -> str:
    return p(
        "Thoracic aorta diameter is normal.",
        "The thoracic aorta is of normal calibre without calcification.",
    )


def _coronary_calcification(f: Finding, p: Pick) -> str:
    return p(
        "Calcifications are present in the coronary artery walls.",
        "Coronary artery wall calcifications are noted.",
    )


def _lymphadenopathy(f: Finding, p: Pick) -> str:
    return p(
        f"A pathologically enlarged lymph node measuring {f.size_mm:.0f} mm in short axis is observed "
        f"in the {f.detail['station']} region.",
        f"Lymphadenopathy is present in the {f.detail['station']} station, "
        f"with a node of {f.size_mm:.0f} mm.",
    )


def _no_lymphadenopathy(p: Pick) -> str:
    return p(
        "No enlarged lymph nodes in prevascular, pre-paratracheal, subcarinal or bilateral hilar-axillary "
        "pathological dimensions were detected.",
        "No pathologically enlarged mediastinal or hilar lymph nodes were detected.",
    )


def _medical_material(f: Finding, p: Pick) -> str:
    return p(
        f"A {f.detail['device']} is seen in the {f.side} anterior chest wall, with its lead "
        "extending to the heart.",
        f"Medical material consistent with a {f.detail['device']} is present on the {f.side} side.",
    )


def _hiatal_hernia(f: Finding, p: Pick) -> str:
    return p(
        "A hiatal hernia is observed at the esophageal hiatus.",
        "Part of the stomach has herniated through the hiatus (hiatal hernia).",
    )


def _no_hiatal_hernia(p: Pick) -> str:
    return p(
        "The esophagus is of normal calibre; no hiatal hernia was detected.",
        "No hiatal hernia is seen.",
    )


# --- lungs


def _emphysema(f: Finding, p: Pick) -> str:
    return p(
        f"{f.amount.capitalize()} centrilobular emphysematous changes are observed in the "
        "upper lobes of both lungs.",
        f"Emphysema, {f.amount}, predominantly in both upper lobes.",
    )


def _lung_nodule(f: Finding, p: Pick) -> str:
    return p(
        f"A solid nodule measuring {f.size_mm:.0f} mm is observed in {_where(f)}.",
        f"There is a {f.size_mm:.0f} mm nodule in {_where(f)}.",
        f"A {f.size_mm:.0f} mm solid pulmonary nodule is seen in {_where(f)}.",
    )


def _no_lung_nodule(p: Pick) -> str:
    return p("No pulmonary nodule was detected.", "No nodule or mass was seen.")


def _consolidation(f: Finding, p: Pick) -> str:
    return p(
        f"Consolidation is observed in {_where(f)}.",
        f"An area of consolidation is present in {_where(f)}.",
    )


def _no_consolidation(p: Pick) -> str:
    return p("No consolidation was detected.", "There is no consolidation.")


def _lung_opacity(f: Finding, p: Pick) -> str:
    return p(
        f"Ground-glass opacities are observed in {_where(f)}.",
        f"Patchy ground-glass density increases are seen in {_where(f)}.",
    )


def _atelectasis(f: Finding, p: Pick) -> str:
    if f.detail.get("kind") == "compressive":
        return p(
            f"Compressive atelectasis is observed in {_where(f)} adjacent to the effusion.",
            f"Passive atelectasis secondary to the effusion is seen in {_where(f)}.",
        )
    return p(
        f"Subsegmental atelectasis is observed in {_where(f)}.",
        f"Atelectatic changes are present in {_where(f)}.",
    )


def _atelectasis_impression(f: Finding) -> str:
    term = "Compressive atelectasis" if f.detail.get("kind") == "compressive" else "Atelectasis"
    return f"{term} in {_lobe_short(f)}."


# --- pleura


def _pleural_effusion(f: Finding, p: Pick) -> str:
    where = "bilateral" if f.side == "bilateral" else f"{f.side}-sided"
    thickness = f.detail.get("thickness_mm")
    return p(
        f"A {f.amount} {where} pleural effusion is observed, reaching {thickness} mm in its thickest part.",
        f"{f.amount.capitalize()} pleural effusion on the {f.side} side"
        + (" of both hemithoraces." if f.side == "bilateral" else " is present."),
    )


def _no_pleural_effusion(p: Pick) -> str:
    return p(
        "Pleural effusion-thickening was not detected.",
        "No pleural effusion was detected.",
        "There is no pleural effusion.",
    )


def _named(f: Finding) -> str:
    return f"{f.label}."


# One entry per rendered finding, in the order IMPRESSION lists them.
WORDING: dict[str, Wording] = {
    "Pleural effusion": Wording(
        _pleural_effusion,
        lambda f: f"{f.amount.capitalize()} {f.side} pleural effusion.",
        _no_pleural_effusion,
    ),
    "Lung nodule": Wording(
        _lung_nodule,
        lambda f: f"{f.size_mm:.0f} mm nodule in the {f.side} {f.lobe} lobe.",
        _no_lung_nodule,
    ),
    "Consolidation": Wording(
        _consolidation, lambda f: f"Consolidation in {_lobe_short(f)}.", _no_consolidation
    ),
    "Lung opacity": Wording(_lung_opacity, lambda f: f"Ground-glass opacity in {_lobe_short(f)}."),
    "Atelectasis": Wording(_atelectasis, _atelectasis_impression),
    "Emphysema": Wording(_emphysema, _named),
    "Cardiomegaly": Wording(_cardiomegaly, _named, _no_cardiomegaly),
    "Pericardial effusion": Wording(_pericardial_effusion, _named, _no_pericardial_effusion),
    "Lymphadenopathy": Wording(_lymphadenopathy, _named, _no_lymphadenopathy),
    "Arterial wall calcification": Wording(
        _arterial_calcification,
        lambda f: "Atherosclerotic changes in the thoracic aorta.",
        _no_arterial_calcification,
    ),
    "Coronary artery wall calcification": Wording(
        _coronary_calcification, lambda f: "Coronary artery calcification."
    ),
    "Hiatal hernia": Wording(_hiatal_hernia, _named, _no_hiatal_hernia),
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

# Statements made of every phantom (each a tuple of phrasings).
AIRWAYS = (
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
BELOW_THE_CHEST = (
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


def write_report(findings: list[Finding], rng: np.random.Generator) -> tuple[str, str]:
    """(FINDINGS, IMPRESSION) text."""
    by = {f.label: f for f in findings}
    p = _picker(rng)
    sentences = [p(*options) for options in AIRWAYS]
    sentences += _statements(MEDIASTINUM, by, p)
    sentences += _lungs(by, p)
    sentences += _statements(PLEURA, by, p)
    sentences += [p(*options) for options in BELOW_THE_CHEST]
    return " ".join(sentences), _impression(by, p)


def _statements(names: tuple[str, ...], by: dict[str, Finding], p: Pick) -> list[str]:
    """Each finding stated if present, negated if absent (where reports negate it)."""
    sentences = []
    for name in names:
        wording = WORDING[name]
        if name in by:
            sentences.append(wording.present(by[name], p))
        elif wording.absent is not None:
            sentences.append(wording.absent(p))
    return sentences


def _lungs(by: dict[str, Finding], p: Pick) -> list[str]:
    """The lung window: the present findings, then the negations; clear
    lungs in one sentence when nothing is present."""
    sentences = [p(*LUNG_WINDOW)]
    present = [WORDING[name].present(by[name], p) for name in LUNGS if name in by]
    if not present:
        return [*sentences, p(*CLEAR_LUNGS)]
    absent = [WORDING[name].absent for name in LUNGS if name not in by]
    return sentences + present + [negate(p) for negate in absent if negate is not None]


def _impression(by: dict[str, Finding], p: Pick) -> str:
    lines = [wording.impression(by[name]) for name, wording in WORDING.items() if name in by]
    return " ".join(lines) if lines else p(*NORMAL_IMPRESSION)
