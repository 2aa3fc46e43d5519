"""The CT-RATE reader: real CT-RATE and phantom data sets alike.

    dataset = CTRateDataset("/data/ct-rate", split="train",
                            target_spacing_mm=(4, 4, 5), target_shape=(96, 96, 64))
    item = dataset[0]  # volume (1,X,Y,Z) HU, mask, findings, impression, labels (18,), spacing_mm

Per volume: join the reports, metadata and labels CSVs by VolumeName; read
the NIfTI; decide how its values become HU (below); reorient to RAS+ from the
affine (the one canonical orientation, docs/conventions.md; oblique affines
are refused); take the spacing from the metadata (XYSpacing is a string like
"[0.75, 0.75]", ZSpacing a number), permuted with the axes; padding (-8192,
-3024, -2048, anything below -1024 HU) to air, then HU to the model's window;
resample to a target spacing (trilinear for images, nearest for masks) and
crop or pad to a target shape. Bad input raises `CTRateError` naming the
volume and the reason, or is skipped with a logged reason (`policy="skip"`).

HU, decided per volume (`hu_rule="auto"`). CT-RATE's releases store values
in more than one convention while the metadata says RescaleIntercept -1024
throughout: raw values (air near 0), values already in HU (the *_fixed
release: air near -1000), or raw values whose NIfTI header carries its own
scl_slope/scl_inter (nibabel applies it). Exactly one scaling is applied to
the file's stored integers, never two:

    "stored"    the file's own reading: its header scaling when it has one,
                else the values as stored
    "metadata"  RescaleSlope/RescaleIntercept of the metadata CSV

`auto` takes the one that puts the air peak of the histogram (outside air
and airways, about -1000 HU; padding left out) near -1000 HU; when both
readings are the same scaling it is "stored"; when neither fits it raises,
asking for a forced rule. `hu_rule="metadata"|"stored"` forces one. The rule
applied, why, the air peak and the chest check are recorded per volume
(`HUDecision`: in each item, in `CTRateDataset.decisions`, `.index()`).

Chest check: a volume with (almost) no lung inside the body - fewer than
`CHEST_MIN_LUNG_FRACTION` of the body's voxels (axial outlines filled) in
the lung range -950..-500 HU - is not a chest CT: flagged in its decision,
and dropped with a logged reason when `non_chest="skip"`.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import binary_fill_holes
from torch.utils.data import Dataset

# The layout's file names are defined once, beside the writer of phantom sets.
from phantom.ctrate_layout import SPLITS, relative_path
from report2ct.codec import HU_WINDOW
from report2ct.grid import crop_or_pad, resample
from report2ct.labels import CTRATE_LABELS

log = logging.getLogger(__name__)

HU_RULES = ("auto", "metadata", "stored")
NON_CHEST = ("flag", "skip")
# Where an air peak may sit once in HU: outside air is about -1000 (scanners
# clamp at -1024); a tight field of view leaves the lungs' -850 as the lowest
# peak. The two readings of a CT-RATE file differ by 1024 HU, far outside it.
AIR_PEAK_HU = (-1200.0, -750.0)
PADDING_HU = (-8192.0, -3024.0, -2048.0)
LUNG_HU = (-950.0, -500.0)
# Lungs are about 10-20 % of the body in the phantoms' chest fields of view,
# 0 % once filled with soft tissue; "no lungs at all" is far below the first.
CHEST_MIN_LUNG_FRACTION = 0.02
# Largest sine of a voxel axis's angle to its nearest world axis still read
# as axis-aligned (about 0.6 degrees: float32 rounding is ~1e-7, a gantry
# tilt 5-30 degrees). Reading 0.6 degrees as aligned moves the edge of a
# 500 mm field by under 5 mm; more would need resampling.
OBLIQUE_TOLERANCE = 1e-2


class CTRateError(ValueError):
    """Unusable input; the message names the volume and the field."""


@dataclass(frozen=True)
class VolumeRecord:
    name: str
    path: Path
    mask_path: Path | None
    findings: str
    impression: str
    labels: tuple[int, ...]
    spacing_mm: tuple[float, float, float]  # of the stored array axes (i, j, k)
    slope: float  # the metadata's RescaleSlope
    intercept: float  # the metadata's RescaleIntercept
    header_slope: float = 1.0  # the NIfTI header's scl_slope (1 when it has none)
    header_inter: float = 0.0  # the NIfTI header's scl_inter (0 when it has none)


@dataclass(frozen=True)
class HUDecision:
    """How one volume's stored values became HU, and what they showed."""

    rule: str  # "metadata" | "stored": the one scaling applied
    forced: bool  # True when hu_rule named it, False when the evidence chose it
    slope: float  # applied to the file's stored integers
    intercept: float
    reason: str
    air_peak_hu: float | None  # after the scaling; None when nothing but padding
    lung_fraction: float  # of the body's voxels in the lung range
    chest: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        raise CTRateError(f"{path}: CSV file missing")
    with path.open(newline="") as handle:
        return {row["VolumeName"]: row for row in csv.DictReader(handle)}


def _number(name: str, field: str, text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise CTRateError(f"{name}: field {field} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise CTRateError(f"{name}: field {field} is not finite: {text!r}")
    return value


def parse_spacing(name: str, xy: str, z: str) -> tuple[float, float, float]:
    """CT-RATE's XYSpacing ("[0.75, 0.75]") and ZSpacing -> (x, y, z) mm."""
    try:
        values = json.loads(xy) if isinstance(xy, str) else list(xy)
        if not isinstance(values, list) or len(values) != 2:
            raise ValueError
    except (ValueError, TypeError):
        raise CTRateError(
            f'{name}: field XYSpacing is malformed: {xy!r} (expected like "[0.75, 0.75]")'
        ) from None
    spacing = (
        _number(name, "XYSpacing", values[0]),
        _number(name, "XYSpacing", values[1]),
        _number(name, "ZSpacing", z),
    )
    if any(v <= 0 for v in spacing):
        raise CTRateError(f"{name}: spacing must be positive, got {spacing}")
    return spacing


def _check_header(path: Path, name: str, what: str):
    """Read only the NIfTI header (cheap), so bad volumes fail or are skipped
    when the data set is indexed rather than mid-epoch. Returns the image
    (its data is not read)."""
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises several types for unreadable files
        raise CTRateError(f"{name}: {what} file unreadable as NIfTI: {path} ({error})") from None
    if len(image.shape) != 3:
        raise CTRateError(
            f"{name}: {what} is {len(image.shape)}-D {tuple(image.shape)}, expected 3-D"
        )
    check_axis_aligned(image.affine, name, what)
    return image


def check_axis_aligned(affine, name: str, what: str = "volume") -> None:
    """Refuse an oblique affine: reorienting by flips and axis swaps would
    misplace every voxel, and resampling it is not this reader's job."""
    rotation = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(rotation, axis=0)
    if not np.all(np.isfinite(rotation)) or np.any(norms == 0):
        raise CTRateError(f"{name}: {what} affine is degenerate: {rotation.tolist()}")
    cosines = np.abs(rotation / norms)
    off_axis = np.sqrt(np.clip(1.0 - cosines.max(axis=0) ** 2, 0.0, 1.0))  # sine
    chosen = cosines.argmax(axis=0)
    if off_axis.max() > OBLIQUE_TOLERANCE or len(set(chosen.tolist())) != 3:
        degrees = float(np.degrees(np.arccos(np.clip(cosines.max(axis=0).min(), -1, 1))))
        raise CTRateError(
            f"{name}: {what} affine is oblique ({degrees:.2f} degrees off the nearest "
            "axis): only axis-aligned volumes can be put in RAS+ without resampling; "
            "resample it onto an axis-aligned grid first"
        )


def index_split(root: Path, split: str) -> list[VolumeRecord | CTRateError]:
    """Every volume of a split as a record, or the error that makes it unusable."""
    _folder, reports_csv, metadata_csv, labels_csv = SPLITS[split]
    reports = _read_csv(root / "radiology_text_reports" / reports_csv)
    metadata = _read_csv(root / "metadata" / metadata_csv)
    labels = _read_csv(root / "multi_abnormality_labels" / labels_csv)
    out: list[VolumeRecord | CTRateError] = []
    for name in sorted(reports):
        try:
            if name not in metadata:
                raise CTRateError(f"{name}: no row in {metadata_csv}")
            if name not in labels:
                raise CTRateError(f"{name}: no row in {labels_csv}")
            meta = metadata[name]
            try:
                path = root / relative_path(name)
            except (ValueError, KeyError):
                raise CTRateError(
                    f"{name}: VolumeName is not of the form <split>_<patient>_<scan>_<recon>.nii.gz"
                ) from None
            if not path.is_file():
                raise CTRateError(f"{name}: volume file missing: {path}")
            image = _check_header(path, name, "volume")
            shape = tuple(image.shape)
            mask = root / "masks" / path.relative_to(root)
            mask_shape = tuple(_check_header(mask, name, "mask").shape) if mask.is_file() else shape
            if mask_shape != shape:
                raise CTRateError(
                    f"{name}: mask shape {mask_shape} differs from the volume's {shape}"
                )
            out.append(
                VolumeRecord(
                    name=name,
                    path=path,
                    mask_path=mask if mask.is_file() else None,
                    findings=reports[name].get("Findings_EN") or "",
                    impression=reports[name].get("Impressions_EN") or "",
                    labels=tuple(
                        int(_number(name, label, labels[name][label])) for label in CTRATE_LABELS
                    ),
                    spacing_mm=parse_spacing(name, meta.get("XYSpacing"), meta.get("ZSpacing")),
                    slope=_number(name, "RescaleSlope", meta.get("RescaleSlope", 1) or 1),
                    intercept=_number(
                        name, "RescaleIntercept", meta.get("RescaleIntercept", 0) or 0
                    ),
                    # nibabel reads scl_slope/scl_inter into the proxy: (1, 0) when unset
                    header_slope=float(image.dataobj.slope),
                    header_inter=float(image.dataobj.inter),
                )
            )
        except CTRateError as error:
            out.append(error)
        except KeyError as error:
            out.append(CTRateError(f"{name}: field {error.args[0]} missing from a CSV row"))
    return out


def _open(path: Path, name: str, what: str):
    image = nib.load(str(path))
    if len(image.shape) != 3:
        raise CTRateError(
            f"{name}: {what} is {len(image.shape)}-D {tuple(image.shape)}, expected 3-D"
        )
    check_axis_aligned(image.affine, name, what)
    return image


def to_canonical(data: np.ndarray, affine, spacing_mm) -> tuple[np.ndarray, tuple]:
    """(array in RAS+ axis order, spacing permuted to match), by flips and
    axis swaps only (the affine was checked to be axis-aligned)."""
    ornt = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(
        ornt, nib.orientations.axcodes2ornt(("R", "A", "S"))
    )
    data = nib.orientations.apply_orientation(data, transform)
    spacing = tuple(float(spacing_mm[int(axis)]) for axis in np.argsort(transform[:, 0]))
    return np.ascontiguousarray(data), spacing


def load_canonical(path: Path, name: str, spacing_mm, *, order_name: str = "volume"):
    """(array in RAS+ axis order, spacing permuted to match), values as the
    file reads them (a mask's labels)."""
    image = _open(path, name, order_name)
    return to_canonical(np.asanyarray(image.dataobj), image.affine, spacing_mm)


def _sample(values: np.ndarray, limit: int = 2_000_000) -> np.ndarray:
    """A strided subsample for the histogram evidence: whole 512^2 x 300
    volumes would cost seconds for no better an estimate."""
    step = max(1, math.ceil((values.size / limit) ** (1 / 3)))
    return values[::step, ::step, ::step] if values.ndim == 3 and step > 1 else values


def air_peak(stored: np.ndarray, readings=()) -> float | None:
    """Where the air peak sits, in stored units: the mode of the lowest tenth
    of the values, padding left out. Padding fills the corners outside the
    scan circle (a fifth of a square slice, so it would be the peak): any
    value that none of `readings` ((slope, intercept) pairs) puts at or above
    -1124 HU, which also catches padding blended by resampling; and a
    negative value that a gap of more than 100 units separates from
    everything above it at the bottom of the histogram (up to three such:
    -1024 raw is -2048 HU but would read as air as stored), since measured
    values form a continuum and raw air (about 0-24) is not negative. None
    when nothing else is left."""
    values = _sample(stored).ravel().astype(np.float64)
    if readings:
        physical = np.zeros(values.shape, dtype=bool)
        for slope, intercept in readings:
            physical |= values * slope + intercept >= -1124
        values = values[physical]
    levels = np.unique(values)
    for level, above in itertools.pairwise(levels[:4]):
        if level >= 0 or above - level <= 100:
            break
        values = values[values > level]
    if values.size == 0:
        return None
    cut = np.quantile(values, 0.1)
    lowest = values[values <= cut]
    width = 8.0  # stored units; air's noise spans tens of them
    bins = np.floor((lowest - lowest.min()) / width).astype(np.int64)
    mode = int(np.bincount(bins).argmax())
    return float(np.median(lowest[bins == mode]))


def decide_hu(
    name: str,
    stored: np.ndarray,
    *,
    header: tuple[float, float],
    metadata: tuple[float, float],
    hu_rule: str = "auto",
) -> tuple[str, float, float, str, float | None]:
    """(rule, slope, intercept, reason, air peak in HU) for one volume's
    stored integers; see the module docstring."""
    if hu_rule not in HU_RULES:
        raise ValueError(f"hu_rule must be one of {HU_RULES}, got {hu_rule!r}")
    readings = {"stored": header, "metadata": metadata}
    peak = air_peak(stored, readings.values())
    described = {
        "stored": "as stored"
        if header == (1.0, 0.0)
        else f"with the NIfTI header's scl_slope {header[0]:g}, scl_inter {header[1]:g}",
        "metadata": f"with the metadata's RescaleSlope {metadata[0]:g}, "
        f"RescaleIntercept {metadata[1]:g}",
    }

    def air(rule: str) -> float | None:
        return None if peak is None else peak * readings[rule][0] + readings[rule][1]

    def fits(rule: str) -> bool:
        value = air(rule)
        return value is not None and AIR_PEAK_HU[0] <= value <= AIR_PEAK_HU[1]

    if peak is None:
        evidence = "no air peak (nothing but padding)"
    else:
        evidence = f"air peak at stored value {peak:g}: " + "; ".join(
            f"{rule} ({described[rule]}) puts it at {air(rule):.0f} HU" for rule in readings
        )
    if hu_rule != "auto":
        rule = hu_rule
        if not fits(rule):
            log.warning(
                "%s: hu_rule=%s forced, though it puts the air peak outside %s HU (%s)",
                name,
                rule,
                AIR_PEAK_HU,
                evidence,
            )
        reason = f"forced by hu_rule={rule}: {described[rule]}; {evidence}"
    elif np.allclose(header, metadata):
        rule = "stored"
        reason = (
            f"one scaling either way: {described['stored']}, equal to the metadata's; {evidence}"
        )
        if not fits(rule):
            log.warning(
                "%s: the only reading puts air outside %s HU (%s)", name, AIR_PEAK_HU, evidence
            )
    else:
        fitting = [rule for rule in readings if fits(rule)]
        if not fitting:
            raise CTRateError(
                f"{name}: cannot tell whether the values are HU: {evidence}; neither is "
                f"within {AIR_PEAK_HU} HU where air belongs. Force hu_rule='metadata' or "
                "'stored' if you know the convention"
            )
        rule = min(fitting, key=lambda r: abs(air(r) - AIR_PEAK_HU[0] / 2 - AIR_PEAK_HU[1] / 2))
        reason = f"{described[rule]}: {evidence}"
    return rule, *readings[rule], reason, air(rule)


def lung_fraction(hu: np.ndarray) -> float:
    """Fraction of the body's voxels (HU > -500, each axial outline filled,
    so the lungs inside count) in the lung range; `hu` in RAS+ order, z last."""
    hu = _sample(hu, 4_000_000)
    body = hu > LUNG_HU[1]
    filled = np.zeros_like(body)
    for k in range(hu.shape[2]):
        filled[:, :, k] = binary_fill_holes(body[:, :, k])
    total = int(filled.sum())
    if total == 0:
        return 0.0
    lungs = filled & (hu >= LUNG_HU[0]) & (hu <= LUNG_HU[1])
    return float(lungs.sum()) / total


def read_volume(
    record: VolumeRecord, hu_rule: str = "auto"
) -> tuple[np.ndarray, tuple, HUDecision]:
    """(HU volume in RAS+ order clipped to the model's window, its spacing,
    the decision) for one indexed volume."""
    image = _open(record.path, record.name, "volume")
    stored = np.asarray(image.dataobj.get_unscaled())
    rule, slope, intercept, reason, air_hu = decide_hu(
        record.name,
        stored,
        header=(record.header_slope, record.header_inter),
        metadata=(record.slope, record.intercept),
        hu_rule=hu_rule,
    )
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    # Padding (-8192, -3024, -2048, any value below what a scanner measures)
    # is air; then the model's window.
    hu[hu < -1024] = -1000.0
    hu, spacing = to_canonical(hu, image.affine, record.spacing_mm)
    fraction = lung_fraction(hu)
    decision = HUDecision(
        rule=rule,
        forced=hu_rule != "auto",
        slope=float(slope),
        intercept=float(intercept),
        reason=reason,
        air_peak_hu=None if air_hu is None else round(float(air_hu), 1),
        lung_fraction=round(fraction, 4),
        chest=fraction >= CHEST_MIN_LUNG_FRACTION,
    )
    return np.clip(hu, *HU_WINDOW), spacing, decision


def mask_legend(root: str | Path) -> tuple[tuple[int, str], ...]:
    """The data set's label-map legend, (value, name) without background,
    from masks/legend.json (the phantom world writes one; give a real data
    set's segmentation legend in the same form)."""
    path = Path(root) / "masks" / "legend.json"
    try:
        labels = json.loads(path.read_text())["labels"]
        return tuple((int(e["value"]), str(e["name"])) for e in labels if int(e["value"]) != 0)
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise CTRateError(f"{path}: no usable mask legend: {error}") from None


class CTRateDataset(Dataset):
    """A CT-RATE-layout split. `hu_rule` ("auto" | "metadata" | "stored")
    decides how stored values become HU (module docstring); every volume
    read records its `HUDecision` in `decisions` and in its item ("hu_rule",
    "hu_reason", "chest", "lung_fraction"). `non_chest="skip"` reads every
    volume once here and drops those that are not chest CT with a logged
    reason (listed in `skipped`); "flag" (the default) only records it."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        target_spacing_mm: tuple[float, float, float] | None = None,
        target_shape: tuple[int, int, int] | None = None,
        load_masks: bool = True,
        policy: str = "raise",
        hu_rule: str = "auto",
        non_chest: str = "flag",
    ) -> None:
        if policy not in {"raise", "skip"}:
            raise ValueError("policy must be 'raise' or 'skip'")
        if hu_rule not in HU_RULES:
            raise ValueError(f"hu_rule must be one of {HU_RULES}, got {hu_rule!r}")
        if non_chest not in NON_CHEST:
            raise ValueError(f"non_chest must be one of {NON_CHEST}, got {non_chest!r}")
        self.root, self.split, self.policy = Path(root), split, policy
        self.hu_rule, self.non_chest = hu_rule, non_chest
        self.target_spacing_mm, self.target_shape, self.load_masks = (
            target_spacing_mm,
            target_shape,
            load_masks,
        )
        self.decisions: dict[str, HUDecision] = {}
        self.skipped: list[tuple[str, str]] = []  # (volume, reason)
        self.records: list[VolumeRecord] = []
        for entry in index_split(self.root, split):
            if isinstance(entry, CTRateError):
                self._skip_or_raise(entry)
            else:
                self.records.append(entry)
        if non_chest == "skip":
            kept = []
            for record in self.records:
                try:
                    decision = self.decide(record)
                except CTRateError as error:
                    self._skip_or_raise(error, record.name)
                    continue
                if decision.chest:
                    kept.append(record)
                else:
                    reason = (
                        f"not a chest CT: {decision.lung_fraction:.2%} of the body in the "
                        f"lung range {LUNG_HU} HU (a chest CT has at least "
                        f"{CHEST_MIN_LUNG_FRACTION:.0%})"
                    )
                    log.warning("skipping %s: %s", record.name, reason)
                    self.skipped.append((record.name, reason))
            self.records = kept

    def _skip_or_raise(self, error: CTRateError, name: str | None = None) -> None:
        if self.policy == "raise":
            raise error
        log.warning("skipping: %s", error)
        self.skipped.append((name or str(error).split(":", 1)[0], str(error)))

    def decide(self, record: VolumeRecord) -> HUDecision:
        """Read one volume and record how its values become HU."""
        return self._read(record)[2]

    def _read(self, record: VolumeRecord):
        hu, spacing, decision = read_volume(record, self.hu_rule)
        self.decisions[record.name] = decision
        return hu, spacing, decision

    def index(self) -> list[dict[str, Any]]:
        """One JSON-able row per volume read so far (or skipped): the HU rule
        applied and why, the air peak, the chest check."""
        rows = [{"name": name, **d.as_dict()} for name, d in sorted(self.decisions.items())]
        rows += [{"name": name, "skipped": reason} for name, reason in self.skipped]
        return rows

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        hu, spacing, decision = self._read(record)
        volume = torch.from_numpy(hu)[None]  # (1, X, Y, Z)
        volume = resample(volume, spacing, self.target_spacing_mm, mode="trilinear")
        volume = crop_or_pad(volume, self.target_shape, HU_WINDOW[0])
        item = {
            "name": record.name,
            "volume": volume,
            "findings": record.findings,
            "impression": record.impression,
            "labels": torch.tensor(record.labels, dtype=torch.float32),
            "spacing_mm": torch.tensor(self.target_spacing_mm or spacing, dtype=torch.float32),
            "hu_rule": decision.rule,
            "hu_reason": decision.reason,
            "chest": decision.chest,
            "lung_fraction": decision.lung_fraction,
        }
        if self.load_masks and record.mask_path is not None:
            mask, _ = load_canonical(
                record.mask_path, record.name, record.spacing_mm, order_name="mask"
            )
            mask_t = torch.from_numpy(mask.astype(np.int64))[None]
            mask_t = resample(mask_t, spacing, self.target_spacing_mm, mode="nearest").long()
            item["mask"] = crop_or_pad(mask_t, self.target_shape, 0).long()
        return item
