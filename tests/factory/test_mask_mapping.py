"""The lookup-table class mapping and the device occupancy give exactly what
the np.unique mapping and the CPU bincount gave (kept here as the reference),
for every mask dtype, in the model's legend and through a mapping."""

import numpy as np
import pytest
import torch

from report2ct.config import ControlConfig
from report2ct.control import MaskError, class_occupancy, legend_lookup, to_class_index

CONTROL = ControlConfig(legend=tuple((v, f"class{v}") for v in range(1, 25)))
SPARSE = ControlConfig(legend=((3, "lung"), (7, "heart"), (200, "aorta")))
MAPPING = {13: "lung", 14: "lung", 51: "heart", -5: "aorta", 0: "background", 1000: "background"}


def reference_index(mask, control, mapping=None):
    if mask.dtype.kind not in "iub":
        mask = mask.astype(np.int64)
    lookup = legend_lookup(control, mapping)
    values, inverse = np.unique(mask, return_inverse=True)
    unknown = [int(v) for v in values if int(v) not in lookup]
    if unknown:
        raise MaskError(f"unknown label values {unknown[:10]} (the legend has {sorted(lookup)})")
    channels = np.array([lookup[int(v)] for v in values], dtype=np.uint8)
    return channels[inverse].reshape(mask.shape)


def reference_occupancy(index, num_classes, factor):
    index = torch.as_tensor(np.asarray(index), dtype=torch.long)
    X, Y, Z = index.shape
    x, y, z = X // factor, Y // factor, Z // factor
    block = (
        torch.arange(X).div(factor, rounding_mode="floor")[:, None, None] * (y * z)
        + torch.arange(Y).div(factor, rounding_mode="floor")[None, :, None] * z
        + torch.arange(Z).div(factor, rounding_mode="floor")[None, None, :]
    )
    counts = torch.bincount(
        (index * (x * y * z) + block).reshape(-1), minlength=(num_classes + 1) * x * y * z
    )
    return counts.view(num_classes + 1, x, y, z)[1:].float() / factor**3


def random_map(values, dtype, shape=(16, 12, 8), seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice(np.array(values), size=shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.int64])
def test_own_legend_maps_exactly_as_before(dtype):
    mask = random_map(range(25), dtype)
    assert np.array_equal(to_class_index(mask, CONTROL), reference_index(mask, CONTROL))
    sparse = random_map([0, 3, 7, 200] if np.iinfo(dtype).max >= 200 else [0, 3, 7], dtype)
    got = to_class_index(sparse, SPARSE)
    assert got.dtype == np.uint8 and np.array_equal(got, reference_index(sparse, SPARSE))


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64, np.float32])
def test_a_declared_mapping_maps_exactly_as_before(dtype):
    mask = random_map([0, 13, 14, 51, -5, 1000], dtype)
    assert np.array_equal(
        to_class_index(mask, SPARSE, MAPPING), reference_index(mask, SPARSE, MAPPING)
    )


def test_wide_values_and_booleans():
    wide = random_map([0, 3, 7], np.int64)
    wide[0, 0, 0] = 1 << 40  # beyond 16 bits: the np.unique path
    mapping = {1 << 40: "lung", 3: "lung", 7: "heart"}
    assert np.array_equal(
        to_class_index(wide, SPARSE, mapping), reference_index(wide, SPARSE, mapping)
    )
    flags = random_map([0, 1], np.bool_)
    assert np.array_equal(to_class_index(flags, CONTROL), reference_index(flags, CONTROL))


@pytest.mark.parametrize(
    ("values", "dtype"),
    [([0, 3, 99, 250], np.uint8), ([0, 3, -1, 4000], np.int16), ([0, 3, 70000], np.int64)],
)
def test_unknown_values_fail_with_the_same_message(values, dtype):
    mask = random_map(values, dtype)
    with pytest.raises(MaskError) as ours:
        to_class_index(mask, SPARSE)
    with pytest.raises(MaskError) as theirs:
        reference_index(mask, SPARSE)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("factor", [2, 4])
def test_occupancy_is_exactly_the_bincount_of_before(factor):
    for seed in range(3):
        index = random_map(range(25), np.uint8, shape=(16, 8, 12), seed=seed)
        index[:8] = 0  # background regions and whole blocks of one class
        index[8:12, :4] = 5
        got = class_occupancy(index, 24, factor)
        assert got.dtype == torch.float32
        assert torch.equal(got, reference_occupancy(index, 24, factor))
        assert torch.equal(class_occupancy(torch.from_numpy(index), 24, factor, device="cpu"), got)
        assert torch.equal(class_occupancy(index.astype(np.int64), 24, factor), got)


def test_a_phantom_map_end_to_end_matches_the_reference():
    from phantom.legend import LABELS
    from phantom.world import make_mask

    control = ControlConfig(
        legend=tuple((label.value, label.name) for label in LABELS if label.value)
    )
    mask, _ = make_mask(4, shape=(32, 32, 16), spacing_mm=(8.0, 8.0, 10.0))
    index = to_class_index(mask, control)
    assert np.array_equal(index, reference_index(mask, control))
    assert torch.equal(
        class_occupancy(index, control.num_classes, 4),
        reference_occupancy(reference_index(mask, control), control.num_classes, 4),
    )
