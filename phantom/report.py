"""Reports in CT-RATE's style, written from a phantom's findings.

FINDINGS walks the chest in the order CT-RATE reports do (airways,
mediastinum and heart, vessels, lymph nodes, lungs, pleura, upper abdomen,
bones), states every present finding with its laterality, lobe and size, and
negates the absent ones, each with several phrasings; IMPRESSION lists the
present findings or calls the examination normal. Deterministic per seed.
"""

from __future__ import annotations

import numpy as np

from phantom.findings import Finding


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _where(f: Finding) -> str:
    if f.side == "bilateral":
        return f"the {f.lobe} lobes of both lungs" if f.lobe else "both lungs"
    return f"the {f.lobe} lobe of the {f.side} lung" if f.lobe else f"the {f.side} lung"


def _lobe_short(f: Finding) -> str:
    """'the right lower lobe' / 'both lower lobes' (IMPRESSION style)."""
    return f"both {f.lobe} lobes" if f.side == "bilateral" else f"the {f.side} {f.lobe} lobe"


def write_report(findings: list[Finding], rng: np.random.Generator) -> tuple[str, str]:
    """(FINDINGS, IMPRESSION) text."""
    by = {f.label: f for f in findings}
    p = lambda *options: _pick(rng, list(options))  # noqa: E731
    s: list[str] = []

    s.append(
        p(
            "Trachea and both main bronchi are open.",
            "Trachea and both main bronchi are in normal width and open.",
            "The trachea and main bronchi are patent.",
        )
    )
    s.append(
        p(
            "No obstructive pathology was detected in the trachea and both main bronchi.",
            "No endobronchial lesion was seen.",
        )
    )
    if "Cardiomegaly" in by:
        s.append(
            p(
                "The heart is enlarged; the cardiothoracic ratio is increased.",
                "Cardiomegaly is observed.",
                "Heart size is increased (cardiomegaly).",
            )
        )
    else:
        s.append(
            p(
                "Heart contour and size are normal.",
                "Heart size is within normal limits.",
                "Mediastinal main vascular structures, heart contour and size are normal.",
            )
        )
    if "Pericardial effusion" in by:
        f = by["Pericardial effusion"]
        s.append(
            p(
                f"Pericardial effusion reaching {f.size_mm:.0f} mm in thickness is observed.",
                f"There is a pericardial effusion measuring up to {f.size_mm:.0f} mm.",
            )
        )
    else:
        s.append(
            p(
                "Pericardial effusion-thickening was not observed.",
                "No pericardial effusion was detected.",
                "There is no pericardial effusion or thickening.",
            )
        )
    if "Arterial wall calcification" in by:
        s.append(
            p(
                "Atherosclerotic calcified plaques are observed in the wall of the thoracic aorta.",
                "Calcific atherosclerotic changes are seen in the aortic wall.",
            )
        )
    else:
        s.append(
            p(
                "Thoracic aorta diameter is normal.",
                "The thoracic aorta is of normal calibre without calcification.",
            )
        )
    if "Coronary artery wall calcification" in by:
        s.append(
            p(
                "Calcifications are present in the coronary artery walls.",
                "Coronary artery wall calcifications are noted.",
            )
        )
    if "Lymphadenopathy" in by:
        f = by["Lymphadenopathy"]
        s.append(
            p(
                f"A pathologically enlarged lymph node measuring {f.size_mm:.0f} mm in short axis is observed "
                f"in the {f.detail['station']} region.",
                f"Lymphadenopathy is present in the {f.detail['station']} station, "
                f"with a node of {f.size_mm:.0f} mm.",
            )
        )
    else:
        s.append(
            p(
                "No enlarged lymph nodes in prevascular, pre-paratracheal, subcarinal or bilateral hilar-axillary "
                "pathological dimensions were detected.",
                "No pathologically enlarged mediastinal or hilar lymph nodes were detected.",
            )
        )
    if "Medical material" in by:
        f = by["Medical material"]
        s.append(
            p(
                f"A {f.detail['device']} is seen in the {f.side} anterior chest wall, with its lead "
                "extending to the heart.",
                f"Medical material consistent with a {f.detail['device']} is present on the {f.side} side.",
            )
        )
    if "Hiatal hernia" in by:
        s.append(
            p(
                "A hiatal hernia is observed at the esophageal hiatus.",
                "Part of the stomach has herniated through the hiatus (hiatal hernia).",
            )
        )
    else:
        s.append(
            p(
                "The esophagus is of normal calibre; no hiatal hernia was detected.",
                "No hiatal hernia is seen.",
            )
        )

    s.append(p("When examined in the lung parenchyma window;", "In the lung parenchyma window,"))
    lung_sentences = []
    if "Emphysema" in by:
        f = by["Emphysema"]
        lung_sentences.append(
            p(
                f"{f.amount.capitalize()} centrilobular emphysematous changes are observed in the "
                "upper lobes of both lungs.",
                f"Emphysema, {f.amount}, predominantly in both upper lobes.",
            )
        )
    if "Lung nodule" in by:
        f = by["Lung nodule"]
        lung_sentences.append(
            p(
                f"A solid nodule measuring {f.size_mm:.0f} mm is observed in {_where(f)}.",
                f"There is a {f.size_mm:.0f} mm nodule in {_where(f)}.",
                f"A {f.size_mm:.0f} mm solid pulmonary nodule is seen in {_where(f)}.",
            )
        )
    if "Consolidation" in by:
        f = by["Consolidation"]
        lung_sentences.append(
            p(
                f"Consolidation is observed in {_where(f)}.",
                f"An area of consolidation is present in {_where(f)}.",
            )
        )
    if "Lung opacity" in by:
        f = by["Lung opacity"]
        lung_sentences.append(
            p(
                f"Ground-glass opacities are observed in {_where(f)}.",
                f"Patchy ground-glass density increases are seen in {_where(f)}.",
            )
        )
    if "Atelectasis" in by and by["Atelectasis"].detail.get("kind") == "compressive":
        f = by["Atelectasis"]
        lung_sentences.append(
            p(
                f"Compressive atelectasis is observed in {_where(f)} adjacent to the effusion.",
                f"Passive atelectasis secondary to the effusion is seen in {_where(f)}.",
            )
        )
    elif "Atelectasis" in by:
        f = by["Atelectasis"]
        lung_sentences.append(
            p(
                f"Subsegmental atelectasis is observed in {_where(f)}.",
                f"Atelectatic changes are present in {_where(f)}.",
            )
        )
    if not lung_sentences:
        lung_sentences.append(
            p(
                "no mass or infiltrative lesion was detected in both lungs.",
                "both lungs are clear; no nodule, consolidation or opacity was detected.",
            )
        )
    else:
        if "Lung nodule" not in by:
            lung_sentences.append(
                p("No pulmonary nodule was detected.", "No nodule or mass was seen.")
            )
        if "Consolidation" not in by:
            lung_sentences.append(p("No consolidation was detected.", "There is no consolidation."))
    s.extend(lung_sentences)
    if "Pleural effusion" in by:
        f = by["Pleural effusion"]
        where = "bilateral" if f.side == "bilateral" else f"{f.side}-sided"
        thickness = f.detail.get("thickness_mm")
        s.append(
            p(
                f"A {f.amount} {where} pleural effusion is observed, reaching {thickness} mm in its thickest part.",
                f"{f.amount.capitalize()} pleural effusion on the {f.side} side"
                + (" of both hemithoraces." if f.side == "bilateral" else " is present."),
            )
        )
    else:
        s.append(
            p(
                "Pleural effusion-thickening was not detected.",
                "No pleural effusion was detected.",
                "There is no pleural effusion.",
            )
        )
    s.append(
        p(
            "Upper abdominal organs included in the sections are normal.",
            "The liver dome and upper abdominal sections are unremarkable.",
        )
    )
    s.append(
        p(
            "No lytic-destructive lesion was detected in the bone structures within the sections.",
            "Bone structures are natural.",
            "No lytic or sclerotic lesion was seen in the bones.",
        )
    )
    findings_text = " ".join(s)

    impression = []
    order = [
        "Pleural effusion",
        "Lung nodule",
        "Consolidation",
        "Lung opacity",
        "Atelectasis",
        "Emphysema",
        "Cardiomegaly",
        "Pericardial effusion",
        "Lymphadenopathy",
        "Arterial wall calcification",
        "Coronary artery wall calcification",
        "Hiatal hernia",
        "Medical material",
    ]
    for name in order:
        if name not in by:
            continue
        f = by[name]
        if name == "Pleural effusion":
            impression.append(
                f"{f.amount.capitalize()} {'bilateral' if f.side == 'bilateral' else f.side} pleural effusion."
            )
        elif name == "Lung nodule":
            impression.append(f"{f.size_mm:.0f} mm nodule in the {f.side} {f.lobe} lobe.")
        elif name in {"Consolidation", "Lung opacity", "Atelectasis"}:
            term = {"Lung opacity": "Ground-glass opacity"}.get(name, name)
            if f.detail.get("kind") == "compressive":
                term = "Compressive atelectasis"
            impression.append(f"{term} in {_lobe_short(f)}.")
        elif name == "Medical material":
            impression.append(f"{f.detail['device'].capitalize()} in place.")
        elif name == "Arterial wall calcification":
            impression.append("Atherosclerotic changes in the thoracic aorta.")
        elif name == "Coronary artery wall calcification":
            impression.append("Coronary artery calcification.")
        else:
            impression.append(f"{name}.")
    impression_text = (
        " ".join(impression)
        if impression
        else p(
            "Thorax CT examination within normal limits.",
            "No acute pathology in the thorax.",
            "Normal chest CT.",
        )
    )
    return findings_text, impression_text
