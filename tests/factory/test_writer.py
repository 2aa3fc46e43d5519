"""The single-shard OME-Zarr writer: valid OME-Zarr 0.5, read back by plain
zarr with the right grid, few objects, and the same bytes to a directory or
straight to storage."""

import hashlib
import json

import numpy as np
import pytest
import zarr

from factory.storage import open_storage
from factory.writer import (
    Compression,
    encode_ome_zarr,
    put_ome_zarr,
    validate_ome_zarr,
    write_ome_zarr,
)

SHAPE, SPACING = (70, 52, 36), (0.8, 0.7, 1.5)  # not multiples of the 64^3 chunk
CLASSES = {1: ("lung", (10, 20, 30, 255)), 4: ("heart", (200, 0, 0, 255))}


def volume_and_mask(seed=0):
    rng = np.random.default_rng(seed)
    volume = rng.integers(-1024, 3071, SHAPE).astype(np.int16)
    mask = rng.choice(np.array([0, 1, 4], np.uint8), size=SHAPE)
    return volume, mask


def test_reads_back_with_plain_zarr_on_the_right_grid(tmp_path):
    volume, mask = volume_and_mask()
    path = write_ome_zarr(
        tmp_path / "v.ome.zarr",
        volume,
        SPACING,
        attributes={"provenance": {"seed": 3}},
        mask_xyz=mask,
        mask_classes=CLASSES,
    )
    validate_ome_zarr(path)
    group = zarr.open_group(str(path), mode="r")
    assert np.array_equal(group["s0"][...], volume.transpose(2, 1, 0))
    assert np.array_equal(group["mask"][...], mask.transpose(2, 1, 0))
    assert group.attrs["provenance"] == {"seed": 3}
    image, label_map = group.attrs["ome"]["multiscales"]  # the image first: readers' default
    assert (image["name"], image["datasets"][0]["path"]) == ("image", "s0")
    assert (label_map["name"], label_map["datasets"][0]["path"]) == ("mask", "mask")
    for multiscale in (image, label_map):
        assert [(a["name"], a["unit"]) for a in multiscale["axes"]] == [
            ("z", "millimeter"),
            ("y", "millimeter"),
            ("x", "millimeter"),
        ]
        transforms = multiscale["datasets"][0]["coordinateTransformations"]
        assert transforms[0] == {"type": "scale", "scale": [1.5, 0.7, 0.8]}
    assert group["s0"].attrs.asdict() == {} and group["s0"].metadata.dimension_names == (
        "z",
        "y",
        "x",
    )
    label = group["mask"].attrs["image-label"]
    assert [p["name"] for p in label["properties"]] == ["lung", "heart"]
    assert [c["rgba"] for c in label["colors"]] == [[10, 20, 30, 255], [200, 0, 0, 255]]


def test_ome_zarr_py_opens_the_image_and_the_mask_by_name(tmp_path):
    # An independent OME reader: ome-zarr-py takes the first multiscale
    # (the image) as before; the mask is the group's multiscale "mask".
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    volume, mask = volume_and_mask()
    path = write_ome_zarr(
        tmp_path / "v.ome.zarr", volume, SPACING, attributes={}, mask_xyz=mask, mask_classes=CLASSES
    )
    (node, *_) = Reader(parse_url(str(path)))()
    assert np.array_equal(np.asarray(node.data[0]), volume.transpose(2, 1, 0))
    assert node.metadata["name"] == "image"


def test_one_shard_per_array_and_few_objects(tmp_path):
    volume, mask = volume_and_mask()
    assert sorted(encode_ome_zarr(volume, SPACING, attributes={})) == [
        "s0/c/0/0/0",
        "s0/zarr.json",
        "zarr.json",
    ]
    objects = encode_ome_zarr(volume, SPACING, attributes={}, mask_xyz=mask, mask_classes=CLASSES)
    assert sorted(objects) == [  # a mask adds 2: its array metadata and shard
        "mask/c/0/0/0",
        "mask/zarr.json",
        "s0/c/0/0/0",
        "s0/zarr.json",
        "zarr.json",
    ]
    metadata = json.loads(objects["s0/zarr.json"])
    (sharding,) = metadata["codecs"]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [36, 52, 64]
    assert metadata["chunk_grid"]["configuration"]["chunk_shape"] == [36, 52, 128]


def test_straight_to_storage_writes_the_same_objects_and_their_sums(tmp_path):
    volume, mask = volume_and_mask(1)
    storage = open_storage(str(tmp_path / "run"))
    files = put_ome_zarr(
        storage,
        "vol/a.ome.zarr",
        volume,
        SPACING,
        attributes={"x": 1},
        mask_xyz=mask,
        mask_classes=CLASSES,
    )
    objects = encode_ome_zarr(
        volume, SPACING, attributes={"x": 1}, mask_xyz=mask, mask_classes=CLASSES
    )
    assert files == {
        f"vol/a.ome.zarr/{key}": hashlib.sha256(data).hexdigest() for key, data in objects.items()
    }
    assert sorted(storage.list("vol")) == sorted(files)
    validate_ome_zarr(tmp_path / "run" / "vol" / "a.ome.zarr")
    group = zarr.open_group(store=storage.zarr_store("vol/a.ome.zarr"), mode="r")
    assert np.array_equal(group["s0"][...], volume.transpose(2, 1, 0))


@pytest.mark.parametrize(
    "compression",
    [
        Compression("zstd", 1),
        Compression("blosc-zstd", 3, "shuffle"),
        Compression("blosc-zstd", 5, "bitshuffle"),
    ],
)
def test_every_offered_compressor_round_trips(tmp_path, compression):
    volume, _ = volume_and_mask(2)
    path = write_ome_zarr(
        tmp_path / "c.ome.zarr", volume, SPACING, attributes={}, compression=compression
    )
    assert np.array_equal(zarr.open_group(str(path), mode="r")["s0"][...], volume.T)


def test_the_downsampled_level_for_viewers(tmp_path):
    volume, mask = volume_and_mask(3)
    path = write_ome_zarr(
        tmp_path / "d.ome.zarr",
        volume,
        SPACING,
        attributes={},
        mask_xyz=mask,
        mask_classes=CLASSES,
        downsampled=True,
    )
    validate_ome_zarr(path)
    group = zarr.open_group(str(path), mode="r")
    half = volume.astype(np.float64).reshape(35, 2, 26, 2, 18, 2).mean(axis=(1, 3, 5))
    assert np.array_equal(group["s1"][...], np.round(half).astype(np.int16).T)
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert datasets[1]["coordinateTransformations"] == [
        {"type": "scale", "scale": [3.0, 1.4, 1.6]},
        {"type": "translation", "translation": [0.75, 0.35, 0.4]},
    ]
    assert np.array_equal(group["mask"][...], mask.T)  # the mask: full resolution only
    assert [d["path"] for d in group.attrs["ome"]["multiscales"][1]["datasets"]] == ["mask"]


def test_a_mask_off_the_grid_is_refused(tmp_path):
    volume, mask = volume_and_mask()
    with pytest.raises(ValueError, match="not on the image grid"):
        encode_ome_zarr(volume, SPACING, attributes={}, mask_xyz=mask[:-1], mask_classes=CLASSES)
