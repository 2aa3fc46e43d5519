"""The reader on CT-RATE's storage conventions, as the phantom writer's
quirks produce them: true HU back, the rule recorded, forced rules honoured,
oblique and undecidable volumes refused by name, non-chest volumes flagged."""

import hashlib
import logging

import nibabel as nib
import numpy as np
import pytest

from phantom.ctrate_layout import (
    DatasetSpec,
    Quirks,
    outside_scan_circle,
    phantom_seed,
    relative_path,
    volume_name,
    volume_quirks,
    write_dataset,
)
from phantom.world import make_phantom
from training.data.ctrate import CTRateDataset, CTRateError

SHAPE, SPACING = (32, 32, 16), (12.0, 12.0, 16.0)  # the chest's field of view, few voxels


def _write(root, quirks, *, n=2, shape=SHAPE, spacing=SPACING):
    spec = DatasetSpec(
        n=n, seed=2, shape=shape, spacing_mm=spacing, valid_fraction=0, quirks=quirks
    )
    write_dataset(root, spec)
    return spec


def _truth(spec, index, *, shift=0.0):
    """What the reader must return for volume `index`: the phantom's HU in
    RAS+ (plus `shift` for a wrong forced rule), padding as air, windowed."""
    q = volume_quirks(spec, index)
    phantom = make_phantom(
        phantom_seed(spec.seed, index),
        shape=q.shape,
        spacing_mm=q.spacing_mm,
        prevalence=spec.prevalence,
    )
    hu = phantom.volume_hu.astype(np.float32) + shift
    if q.padding_hu is not None:
        hu = np.where(outside_scan_circle(q.shape), -1000.0, hu)
    hu[hu < -1024] = -1000.0
    return np.clip(hu, -1000, 1000), phantom.mask, q


@pytest.mark.parametrize(
    ("quirks", "rule"),
    [
        (Quirks(storage="hu+metadata", orientation="LPS", padding_hu=-3024), "stored"),
        (Quirks(storage="hu+metadata", padding_hu=-8192), "stored"),
        (Quirks(storage="raw+metadata", orientation="LPS", padding_hu=-2048), "metadata"),
        (Quirks(storage="raw+header", orientation="LPS", padding_hu=-8192), "stored"),
    ],
)
def test_each_storage_reads_as_true_hu_with_its_rule_recorded(tmp_path, quirks, rule):
    spec = _write(tmp_path, quirks)
    dataset = CTRateDataset(tmp_path, "train")
    for index in range(len(dataset)):
        item = dataset[index]
        hu, mask, q = _truth(spec, index)
        assert q.storage == quirks.storage
        np.testing.assert_allclose(item["volume"][0].numpy(), hu, atol=1)
        np.testing.assert_array_equal(item["mask"][0].numpy(), mask)  # same reorientation
        assert item["hu_rule"] == rule and item["chest"] is True
        decision = dataset.decisions[item["name"]]
        assert decision.rule == rule and not decision.forced
        assert -1100 < decision.air_peak_hu < -900
    rows = dataset.index()
    assert [row["rule"] for row in rows] == [rule] * len(dataset)


def test_a_header_scaled_file_is_never_scaled_twice(tmp_path):
    """raw + scl_inter -1024 + metadata -1024: nibabel's reading already is
    HU; applying the metadata on top of it would put air at -2048."""
    _write(tmp_path, Quirks(storage="raw+header"))
    path = tmp_path / relative_path(volume_name("train", 0))
    assert nib.load(path).dataobj.inter == -1024
    item = CTRateDataset(tmp_path, "train")[0]
    assert "scl_inter -1024" in item["hu_reason"]
    assert np.quantile(item["volume"].numpy(), 0.5) > -1000  # not everything pushed to air


def test_mixed_conventions_and_native_in_plane_spacing(tmp_path):
    quirks = Quirks(
        storage=("hu+metadata", "raw+metadata", "raw+header"),
        orientation=("RAS", "LPS"),
        padding_hu=-3024,
        in_plane_mm=(0.3, 1.0),
    )
    # a chest scaled into a 64 mm field of view, so 0.3 mm stays a small array
    spec = _write(tmp_path, quirks, n=4, shape=(8, 8, 6), spacing=(8.0, 8.0, 12.0))
    dataset = CTRateDataset(tmp_path, "train")
    seen = set()
    for index in range(len(dataset)):
        item = dataset[index]
        hu, _, q = _truth(spec, index)
        seen.add(q.storage)
        assert 0.3 <= q.spacing_mm[0] <= 1.0
        assert item["spacing_mm"].tolist() == pytest.approx(list(q.spacing_mm))
        np.testing.assert_allclose(item["volume"][0].numpy(), hu, atol=1)
        assert item["hu_rule"] == ("metadata" if q.storage == "raw+metadata" else "stored")
    assert len(seen) >= 2
    # resampled onto a model grid, the truth survives to within a few HU on average
    grid = CTRateDataset(tmp_path, "train", target_spacing_mm=(2.0, 2.0, 12.0))[0]
    assert grid["volume"].shape[1] == round(64 / 2.0)


@pytest.mark.parametrize(
    ("storage", "forced", "shift"),
    [
        ("hu+metadata", "metadata", -1024.0),  # the old reader's -1024 HU error, on request
        ("hu+metadata", "stored", 0.0),
        ("raw+metadata", "stored", 1024.0),
        ("raw+metadata", "metadata", 0.0),
        ("raw+header", "metadata", 0.0),  # metadata on the stored integers: one scaling
    ],
)
def test_a_forced_rule_is_honoured_and_recorded(tmp_path, storage, forced, shift):
    spec = _write(tmp_path, Quirks(storage=storage), n=1)
    item = CTRateDataset(tmp_path, "train", hu_rule=forced)[0]
    hu, _, _ = _truth(spec, 0, shift=shift)
    np.testing.assert_allclose(item["volume"][0].numpy(), hu, atol=1)
    assert item["hu_rule"] == forced and f"forced by hu_rule={forced}" in item["hu_reason"]


def test_an_unknown_rule_is_refused(tmp_path):
    with pytest.raises(ValueError, match="hu_rule must be one of"):
        CTRateDataset(tmp_path, "train", hu_rule="dicom")


def _rewrite(root, index, change):
    """Replace volume `index`'s NIfTI with `change(data, affine)`'s result."""
    path = root / relative_path(volume_name("train", index))
    image = nib.load(path)
    data, affine = change(np.asarray(image.dataobj.get_unscaled()), image.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path.name


def test_an_oblique_volume_is_refused_with_its_name(tmp_path):
    _write(tmp_path, Quirks())

    def tilt(data, affine):
        angle = np.radians(10)
        rotation = np.array(
            [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
        )
        affine[:3, :3] = rotation @ affine[:3, :3]
        return data, affine

    name = _rewrite(tmp_path, 1, tilt)
    with pytest.raises(CTRateError, match=r"oblique \(10\.00 degrees") as excinfo:
        CTRateDataset(tmp_path, "train")
    assert str(excinfo.value).startswith(name)
    dataset = CTRateDataset(tmp_path, "train", policy="skip")
    assert len(dataset) == 1 and dataset.skipped[0][0] == name


def test_values_that_no_reading_puts_air_in_are_refused_with_the_evidence(tmp_path):
    _write(tmp_path, Quirks(), n=1)
    name = _rewrite(tmp_path, 0, lambda data, affine: (data + 500, affine))  # air at +500
    with pytest.raises(CTRateError, match="cannot tell whether the values are HU") as excinfo:
        CTRateDataset(tmp_path, "train")[0]
    message = str(excinfo.value)
    assert message.startswith(name) and "Force hu_rule" in message
    # the user knows better: forced, it reads (with a logged warning)
    assert CTRateDataset(tmp_path, "train", hu_rule="metadata")[0]["hu_rule"] == "metadata"


def test_a_volume_without_lungs_is_flagged_and_skipped_for_training(tmp_path, caplog):
    _write(tmp_path, Quirks())

    def fill_lungs(data, affine):  # raw: lung range -950..-500 HU is 74..524
        data = data.copy()
        data[(data >= 50) & (data <= 600)] = 1064  # soft tissue: an abdomen, not a chest
        return data, affine

    name = _rewrite(tmp_path, 0, fill_lungs)
    flagged = CTRateDataset(tmp_path, "train")
    assert len(flagged) == 2
    assert flagged[0]["chest"] is False and flagged[0]["lung_fraction"] < 0.02
    assert flagged[1]["chest"] is True and flagged[1]["lung_fraction"] > 0.1
    with caplog.at_level(logging.WARNING, logger="training.data.ctrate"):
        training = CTRateDataset(tmp_path, "train", non_chest="skip")
    assert [r.name for r in training.records] == [volume_name("train", 1)]
    assert training.skipped[0][0] == name and "not a chest CT" in training.skipped[0][1]
    assert f"skipping {name}: not a chest CT" in caplog.text
    assert {"name": name, "skipped": training.skipped[0][1]} in training.index()


def test_the_default_writer_output_is_unchanged(tmp_path):
    """The committed demo bundle was trained on this output: the quirk options
    must not change a byte of what the defaults write (digest of the NIfTI
    header and data, independent of gzip's version)."""
    write_dataset(tmp_path, DatasetSpec(n=2, seed=1, shape=(16, 16, 8), spacing_mm=(24, 24, 40)))
    digest = hashlib.sha256()
    for base in (tmp_path, tmp_path / "masks"):
        for index in (0, 1):
            image = nib.load(base / relative_path(volume_name("train", index)))
            digest.update(image.header.binaryblock)
            digest.update(np.asarray(image.dataobj.get_unscaled()).tobytes())
    for rel in ("metadata/train_metadata.csv", "radiology_text_reports/train_reports.csv"):
        digest.update((tmp_path / rel).read_bytes())
    assert digest.hexdigest() == (
        "61d189b42f125333e50ba22c8868b3c0347115d72f0c6c9e1d38faa364e442a5"  # before the quirks
    )


def _slab(storage, padding_hu, *, blend):
    """A synthetic chest-like slab: air, a body, a lung, with noise; padding
    in the corners, optionally smeared into the air by a resampling (a ring
    of values between the two); stored as HU or raw (HU + 1024)."""
    rng = np.random.default_rng(0)
    hu = np.full((64, 64, 4), -1000.0)
    hu[12:52, 12:52] = 40
    hu[18:30, 18:46] = -820
    hu = np.clip(hu + rng.normal(0, 15, hu.shape), -1024, None)
    corners = outside_scan_circle(hu.shape)[:, :, 0]
    hu[corners] = padding_hu
    if blend:
        x = np.arange(64) - 31.5
        ring = (np.hypot(x[:, None], x[None, :]) / 32 > 0.93) & ~corners
        hu[ring] = (padding_hu - 1000) / 2
    return np.round(hu + (1024 if storage == "raw" else 0)).astype(np.int16)


@pytest.mark.parametrize("blend", [False, True])
@pytest.mark.parametrize("padding_hu", [-8192, -3024, -2048])
@pytest.mark.parametrize(("storage", "rule"), [("hu", "stored"), ("raw", "metadata")])
def test_the_air_peak_ignores_padding_even_smeared(storage, rule, padding_hu, blend):
    from training.data.ctrate import decide_hu

    chosen, *_, reason, air = decide_hu(
        "v.nii.gz",
        _slab(storage, padding_hu, blend=blend),
        header=(1.0, 0.0),
        metadata=(1.0, -1024.0),
    )
    assert chosen == rule and -1050 < air < -950, reason


def test_rounding_in_an_affine_is_not_obliquity():
    from training.data.ctrate import check_axis_aligned

    affine = np.diag([-0.75, -0.75, 1.5, 1.0])
    affine[0, 1] = 1e-5  # float rounding of an axial scan's direction cosines
    check_axis_aligned(affine, "v.nii.gz")
    affine[0, 1] = 0.75 * np.tan(np.radians(2))
    with pytest.raises(CTRateError, match=r"v\.nii\.gz: volume affine is oblique \(2\.00"):
        check_axis_aligned(affine, "v.nii.gz")


def test_the_command_line_offers_exactly_the_readers_hu_rules():
    from jobs.cli.train import HU_RULES as CLI_RULES
    from training.data.ctrate import HU_RULES

    assert CLI_RULES == HU_RULES
