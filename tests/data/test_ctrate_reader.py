"""The CT-RATE reader on phantom data sets and on hand-made CT-RATE quirks."""

import csv

import nibabel as nib
import numpy as np
import pytest

from phantom.ctrate_layout import DatasetSpec, phantom_seed, write_dataset
from phantom.world import make_phantom
from report2ct.labels import CTRATE_LABELS
from training.data.ctrate import CTRateDataset, CTRateError


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_dataset(root, DatasetSpec(n=6, seed=3, valid_fraction=0.34), workers=2)
    return root


def test_round_trip_returns_the_same_volume_labels_and_report(phantom_set):
    dataset = CTRateDataset(phantom_set, "train")
    assert len(dataset) == 4 and len(CTRateDataset(phantom_set, "valid")) == 2
    for index in (0, 3):
        item = dataset[index]
        truth = make_phantom(phantom_seed(3, index))
        np.testing.assert_array_equal(
            item["volume"][0].numpy(), np.clip(truth.volume_hu, -1000, 1000)
        )
        np.testing.assert_array_equal(item["mask"][0].numpy(), truth.mask)
        assert item["findings"] == truth.findings and item["impression"] == truth.impression
        assert item["labels"].tolist() == [truth.labels[name] for name in CTRATE_LABELS]
        assert item["spacing_mm"].tolist() == [4.0, 4.0, 5.0]


def test_dataset_is_the_same_whatever_the_worker_count(phantom_set, tmp_path):
    write_dataset(tmp_path, DatasetSpec(n=6, seed=3, valid_fraction=0.34), workers=1)
    for rel in (
        "radiology_text_reports/train_reports.csv",
        "multi_abnormality_labels/valid_predicted_labels.csv",
    ):
        assert (tmp_path / rel).read_text() == (phantom_set / rel).read_text()
    a = nib.load(
        tmp_path / "train_fixed/train_10001/train_10001_a/train_10001_a_1.nii.gz"
    ).get_fdata()
    b = nib.load(
        phantom_set / "train_fixed/train_10001/train_10001_a/train_10001_a_1.nii.gz"
    ).get_fdata()
    np.testing.assert_array_equal(a, b)


def test_resampling_and_crop_or_pad(phantom_set):
    item = CTRateDataset(
        phantom_set, "train", target_spacing_mm=(8.0, 8.0, 10.0), target_shape=(40, 40, 40)
    )[0]
    assert item["volume"].shape == (1, 40, 40, 40) and item["mask"].shape == (1, 40, 40, 40)
    assert item["mask"].dtype.is_floating_point is False
    assert set(np.unique(item["mask"].numpy())) <= set(
        np.unique(CTRateDataset(phantom_set, "train")[0]["mask"].numpy())
    )
    # 96 voxels at 4 mm -> 48 at 8 mm, padded to 40? no: cropped; z: 64 at 5 -> 32 at 10, padded with air
    assert item["volume"][0, :, :, 0].max() == -1000 and item["spacing_mm"].tolist() == [
        8.0,
        8.0,
        10.0,
    ]


def _handmade(
    root, *, xy="[0.75, 0.75]", z="1.5", flip=True, padding=True, ndim=3, drop_labels=False
):
    """One CT-RATE-like volume: raw values with a rescale, -8192 padding
    outside the scan circle, an affine flipped in x (LPS-like)."""
    name = "train_1_a_1.nii.gz"
    hu = np.full((8, 6, 4), -1000.0)
    hu[2:6, 1:5, :] = 40.0
    hu[3, 2, 1] = 1500.0  # a bone voxel above the window
    marker = hu.copy()
    marker[7, 5, 3] = 500.0  # a corner we can find after reorientation
    raw = marker + 1024.0
    if padding:
        raw[0, :, :] = -8192 + 1024  # padding, stored raw
    data = raw.astype(np.int16) if ndim == 3 else raw[..., None].astype(np.int16)
    affine = np.diag([-0.75 if flip else 0.75, 0.75, 1.5, 1.0])
    path = root / "train_fixed/train_1/train_1_a" / name
    path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    for folder, file, row in (
        (
            "radiology_text_reports",
            "train_reports.csv",
            {"VolumeName": name, "Findings_EN": "F.", "Impressions_EN": "I."},
        ),
        (
            "metadata",
            "train_metadata.csv",
            {
                "VolumeName": name,
                "XYSpacing": xy,
                "ZSpacing": z,
                "RescaleSlope": "1",
                "RescaleIntercept": "-1024",
            },
        ),
        (
            "multi_abnormality_labels",
            "train_predicted_labels.csv",
            {"VolumeName": name, **dict.fromkeys(CTRATE_LABELS, 0), "Cardiomegaly": 1},
        ),
    ):
        (root / folder).mkdir(exist_ok=True)
        if drop_labels and folder == "multi_abnormality_labels":
            row = {"VolumeName": "other.nii.gz", **dict.fromkeys(CTRATE_LABELS, 0)}
        with (root / folder / file).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            writer.writeheader()
            writer.writerow(row)
    return name


def test_ctrate_quirks_read_correctly(tmp_path):
    _handmade(tmp_path)
    item = CTRateDataset(tmp_path, "train")[0]
    volume = item["volume"][0].numpy()
    assert volume.shape == (8, 6, 4)
    assert volume.min() == -1000 and volume.max() == 1000  # padding and bone clipped to the window
    # the affine flipped x: the marker stored at i=7 is at x index 0 in RAS+
    assert volume[0, 5, 3] == 500.0
    assert volume[7, :, :].max() == -1000  # the padding row (stored i=0) is air now
    assert item["spacing_mm"].tolist() == [0.75, 0.75, 1.5]
    assert item["labels"][CTRATE_LABELS.index("Cardiomegaly")] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"xy": "0.75, 0.75"}, "XYSpacing is malformed"),
        ({"z": "nan"}, "ZSpacing is not finite"),
        ({"xy": "[0.75, -0.75]"}, "spacing must be positive"),
        ({"ndim": 4}, r"4-D \(8, 6, 4, 1\), expected 3-D"),
        ({"drop_labels": True}, "no row in train_predicted_labels.csv"),
    ],
)
def test_bad_input_names_the_volume_and_the_field(tmp_path, kwargs, message):
    name = _handmade(tmp_path, **kwargs)
    with pytest.raises(CTRateError, match=message) as excinfo:
        CTRateDataset(tmp_path, "train")[0]
    assert name in str(excinfo.value)
    if kwargs.get("ndim") is None:  # index-time errors can be skipped with a logged reason
        assert len(CTRateDataset(tmp_path, "train", policy="skip")) == 0


def test_missing_volume_file(tmp_path):
    name = _handmade(tmp_path)
    (tmp_path / "train_fixed/train_1/train_1_a" / name).unlink()
    with pytest.raises(CTRateError, match="volume file missing"):
        CTRateDataset(tmp_path, "train")
