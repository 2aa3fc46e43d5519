"""The 18 CT-RATE abnormality labels, in the column order of CT-RATE's labels
CSV. One definition, used by the phantom world, the reader, the model's label
condition, the factory's manifest schema and the evaluation."""

from collections.abc import Mapping

CTRATE_LABELS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

NUM_LABELS = len(CTRATE_LABELS)


def signed_labels(labels: Mapping[str, int] | None) -> list[float]:
    """The label condition's input: +1 present, -1 absent, 0 not given, in
    CT-RATE's order. A record may give some labels and leave the rest to the
    model; the all-zero vector (nothing given) is the empty condition."""
    labels = labels or {}
    unknown = sorted(set(labels) - set(CTRATE_LABELS))
    if unknown:
        raise ValueError(f"unknown label names {unknown}; expected CT-RATE's 18 names")
    return [
        0.0 if name not in labels else (1.0 if labels[name] else -1.0) for name in CTRATE_LABELS
    ]
