"""Masks onto the output grid: NIfTI and OME-Zarr read in RAS+ with their
spacing, resampled and cropped like training masks, and refused with a
reason when they cannot be used."""

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from factory.manifest import ManifestRecord
from factory.masks import on_grid, read_mask, resolve_mask
from phantom.legend import LABELS
from phantom.world import make_mask
from report2ct.config import ControlConfig, preset
from report2ct.control import MaskError, class_occupancy, to_class_index

CONTROL = ControlConfig(legend=tuple((label.value, label.name) for label in LABELS if label.value))
SHAPE, SPACING = (32, 32, 16), (8.0, 8.0, 10.0)


def phantom_mask(seed=3):
    return make_mask(seed, shape=SHAPE, spacing_mm=SPACING)[0]


def save_nifti(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def record(**fields):
    return ManifestRecord.model_validate({"id": "m", "findings": "x", **fields})


def test_a_finer_nifti_in_lps_comes_back_exactly_on_the_output_grid(tmp_path):
    truth = phantom_mask()
    fine = truth.repeat(2, 0).repeat(2, 1).repeat(2, 2)  # half the spacing, same field of view
    lps = fine[::-1, ::-1, :].astype(np.int16)  # stored L->R, P->A: the affine says so
    affine = np.diag([-4.0, -4.0, 5.0, 1.0])
    affine[:3, 3] = [100.0, 80.0, -40.0]
    uri = save_nifti(tmp_path / "fine.nii.gz", lps, affine)
    array, spacing, digest = read_mask(uri)
    assert spacing == (4.0, 4.0, 5.0) and len(digest) == 64
    assert np.array_equal(on_grid(array, spacing, SHAPE, SPACING), truth)
    resolved = resolve_mask(record(mask=f"file://{uri}"), 0, SHAPE, SPACING, CONTROL)
    assert np.array_equal(resolved.values, truth) and resolved.provenance["sha256"] == digest


def test_a_map_already_on_the_output_grid_is_used_as_it_is():
    truth = phantom_mask(3)
    assert on_grid(truth, SPACING, SHAPE, SPACING) is truth  # no int64 copy, no resample
    moved = on_grid(truth, SPACING, SHAPE, (SPACING[0], SPACING[1], SPACING[2] * 2))
    assert moved.shape == SHAPE and not np.array_equal(moved, truth)


def test_a_smaller_field_of_view_is_padded_with_background_symmetrically():
    mask = np.full((8, 8, 4), 4, dtype=np.uint8)  # heart, 64 x 64 x 40 mm
    out = on_grid(mask, SPACING, SHAPE, SPACING)
    assert out.shape == SHAPE and (out == 4).sum() == mask.size
    assert out[12:20, 12:20, 6:10].min() == 4 and out[:12].max() == 0


def test_an_ome_zarr_label_image_is_read_with_its_scale(tmp_path):
    from factory.writer import write_ome_zarr

    truth = phantom_mask(5)
    path = write_ome_zarr(
        tmp_path / "v.ome.zarr",
        np.zeros(SHAPE, np.int16),
        SPACING,
        attributes={},
        mask_xyz=truth,
        mask_classes={v: (n, (1, 2, 3, 255)) for v, n in CONTROL.legend},
    )
    array, spacing, _ = read_mask(str(path / "mask"))  # the array, as the index names it
    assert spacing == SPACING and np.array_equal(array, truth)


def test_a_declared_mapping_takes_another_legend(tmp_path):
    other = np.zeros(SHAPE, np.int16)
    other[4:12, 4:28, 2:14] = 13  # "right lung" in some organ legend
    other[14:20, 10:20, 4:10] = 51  # "heart"
    uri = save_nifti(tmp_path / "organs.nii", other, np.diag([*SPACING, 1.0]))
    legend = tmp_path / "organs.json"
    legend.write_text(json.dumps({"values": {"13": "lung", "51": "heart"}}))
    resolved = resolve_mask(record(mask=uri, mask_legend=str(legend)), 0, SHAPE, SPACING, CONTROL)
    assert set(np.unique(resolved.values)) == {0, 3, 4}
    assert (resolved.values == 4).sum() == (other == 51).sum()
    legend.write_text(json.dumps({"values": {"13": "lung", "51": "spleen"}}))
    with pytest.raises(MaskError, match="'spleen', which is not a class of the model"):
        resolve_mask(record(mask=uri, mask_legend=str(legend)), 0, SHAPE, SPACING, CONTROL)


@pytest.mark.parametrize(
    ("array", "affine", "reason"),
    [
        (np.full(SHAPE, 99, np.int16), np.diag([*SPACING, 1.0]), r"unknown label values \[99\]"),
        (np.zeros((32, 32), np.int16), np.diag([*SPACING, 1.0]), "a label map is 3-D"),
        (np.zeros((*SHAPE, 2), np.int16), np.diag([*SPACING, 1.0]), "a label map is 3-D"),
        (np.zeros(SHAPE, np.float32) + 0.5, np.diag([*SPACING, 1.0]), "fractions"),
        (np.zeros((512, 512, 400), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]), "not resampled"),
    ],
    ids=["unknown-value", "2d", "4d", "fractional", "huge-grid"],
)
def test_unusable_masks_are_refused_with_the_reason(tmp_path, array, affine, reason):
    uri = save_nifti(tmp_path / "bad.nii.gz", array, affine)
    with pytest.raises(MaskError, match=reason):
        resolve_mask(record(mask=uri), 0, SHAPE, SPACING, CONTROL)


def test_an_oblique_grid_is_refused(tmp_path):
    angle = np.deg2rad(20)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.array(SPACING)
    uri = save_nifti(tmp_path / "oblique.nii.gz", phantom_mask().astype(np.int16), affine)
    with pytest.raises(MaskError, match="oblique"):
        resolve_mask(record(mask=uri), 0, SHAPE, SPACING, CONTROL)


def test_a_phantom_mask_draws_the_requested_findings_and_says_so():
    wanted = record(labels={"Pleural effusion": 1, "Cardiomegaly": 1}, mask_source="phantom")
    resolved = resolve_mask(wanted, 11, SHAPE, SPACING, CONTROL)
    expected, _ = make_mask(
        11, shape=SHAPE, spacing_mm=SPACING, prevalence=0.0, requested=wanted.labels
    )
    assert np.array_equal(resolved.values, expected)
    assert resolved.labels["Pleural effusion"] == 1 and resolved.labels["Cardiomegaly"] == 1
    assert resolved.labels["Lung nodule"] == 0
    assert (resolved.values == 21).any()  # the effusion class is drawn


def test_occupancy_counts_each_class_fraction_per_latent_voxel():
    index = np.zeros((8, 8, 4), np.int64)
    index[:4, :4, :4] = 1  # one whole 4^3 block
    index[4:6, :4, :4] = 2  # half of the next block along x
    occupancy = class_occupancy(index, 2, 4).numpy()
    assert occupancy.shape == (2, 2, 2, 1)
    assert occupancy[0, 0, 0, 0] == 1.0 and occupancy[1, 1, 0, 0] == 0.5
    assert occupancy.sum() == 1.5
    config = dataclasses.replace(preset("tiny"), control=CONTROL)
    with pytest.raises(MaskError, match="unknown label values"):
        to_class_index(np.array([[[0, 77]]]), config.control)
