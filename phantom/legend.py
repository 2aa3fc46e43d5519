"""The phantom world's label-map legend: one value per anatomy or finding
class, its name, the tissue class it belongs to (what its HU should look
like), its mean HU and its display colour.

Finding classes override anatomy where they overlap; cardiomegaly has no
class of its own (it is the size of `heart`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    tissue: str  # air | lung | fat | soft_tissue | fluid | bone | calcification | metal
    hu: float  # mean HU the renderer draws
    hu_sd: float  # texture standard deviation (before acquisition noise)
    rgba: tuple[int, int, int, int]


LABELS: tuple[Label, ...] = (
    Label(0, "background", "air", -1000, 0, (0, 0, 0, 0)),
    Label(1, "subcutaneous_fat", "fat", -100, 12, (230, 200, 120, 255)),
    Label(2, "muscle", "soft_tissue", 50, 12, (200, 80, 80, 255)),
    Label(3, "lung", "lung", -860, 25, (120, 180, 255, 255)),
    Label(4, "heart", "soft_tissue", 40, 10, (220, 30, 60, 255)),
    Label(5, "aorta", "soft_tissue", 45, 8, (255, 60, 0, 255)),
    Label(6, "airway", "air", -990, 5, (0, 255, 255, 255)),
    Label(7, "spine", "bone", 450, 80, (250, 250, 250, 255)),
    Label(8, "rib", "bone", 550, 90, (230, 230, 210, 255)),
    Label(9, "liver", "soft_tissue", 60, 10, (150, 70, 30, 255)),
    Label(10, "pulmonary_vessel", "soft_tissue", 35, 15, (180, 0, 180, 255)),
    Label(11, "mediastinum", "fat", -60, 20, (240, 220, 160, 255)),
    Label(20, "lung_nodule", "soft_tissue", 30, 10, (255, 255, 0, 255)),
    Label(21, "pleural_effusion", "fluid", 10, 6, (0, 120, 255, 255)),
    Label(22, "pericardial_effusion", "fluid", 8, 6, (0, 200, 200, 255)),
    Label(23, "consolidation", "soft_tissue", 35, 12, (255, 140, 0, 255)),
    Label(24, "atelectasis", "soft_tissue", 40, 12, (255, 100, 200, 255)),
    Label(25, "ground_glass_opacity", "lung", -520, 40, (160, 255, 160, 255)),
    Label(26, "emphysema", "air", -965, 10, (60, 60, 200, 255)),
    Label(27, "arterial_calcification", "calcification", 650, 100, (255, 255, 255, 255)),
    Label(28, "coronary_calcification", "calcification", 600, 100, (255, 240, 200, 255)),
    Label(29, "lymph_node", "soft_tissue", 35, 8, (0, 200, 0, 255)),
    Label(30, "medical_material", "metal", 2500, 200, (192, 192, 192, 255)),
    Label(31, "hiatal_hernia", "soft_tissue", 25, 10, (140, 90, 200, 255)),
    Label(32, "hernia_air", "air", -980, 5, (90, 60, 160, 255)),
)

BY_NAME = {label.name: label for label in LABELS}

# Which label classes show each rendered CT-RATE finding.
FINDING_CLASSES: dict[str, tuple[str, ...]] = {
    "Medical material": ("medical_material",),
    "Arterial wall calcification": ("arterial_calcification",),
    "Cardiomegaly": ("heart",),
    "Pericardial effusion": ("pericardial_effusion",),
    "Coronary artery wall calcification": ("coronary_calcification",),
    "Hiatal hernia": ("hiatal_hernia", "hernia_air"),
    "Lymphadenopathy": ("lymph_node",),
    "Emphysema": ("emphysema",),
    "Atelectasis": ("atelectasis",),
    "Lung nodule": ("lung_nodule",),
    "Lung opacity": ("ground_glass_opacity",),
    "Pleural effusion": ("pleural_effusion",),
    "Consolidation": ("consolidation",),
}
RENDERED_FINDINGS = tuple(FINDING_CLASSES)
# CT-RATE labels the phantom never draws: always 0 in its labels CSV.
NOT_RENDERED = (
    "Pulmonary fibrotic sequela",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Bronchiectasis",
    "Interlobular septal thickening",
)


def legend_json() -> dict:
    """The legend as written beside the masks (masks/legend.json)."""
    return {
        "labels": [
            {
                "value": label.value,
                "name": label.name,
                "tissue": label.tissue,
                "hu": label.hu,
                "rgba": list(label.rgba),
            }
            for label in LABELS
        ],
        "finding_classes": {name: list(classes) for name, classes in FINDING_CLASSES.items()},
        "not_rendered": list(NOT_RENDERED),
    }
