"""Masks through the whole factory, against a real local S3 endpoint and a
real local Ray: outputs carry the `mask` array on the image's grid, an
independent zarr reader opens them, the downstream reader returns (image,
mask, labels, report), and unusable masks are reported by id and reason."""

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from factory.index import read_errors
from factory.job import EXIT_PARTIAL, GenerateOptions, run_generate
from factory.reader import GeneratedVolumes
from factory.storage import open_storage
from phantom.world import make_mask
from report2ct.config import preset

pytestmark = pytest.mark.integration

TINY = preset("tiny")
SHAPE, SPACING = TINY.default_shape, TINY.default_spacing_mm


def nifti_bytes(array, spacing):
    image = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    return gzip.compress(image.to_bytes())


def test_masks_from_uris_and_the_phantom_world_end_in_labels(
    s3_server, s3_bucket, ray_local, tiny_mask_bundle, tmp_path
):
    client = s3_server.client()
    truth = make_mask(21, shape=SHAPE, spacing_mm=SPACING)[0]
    fine = truth.repeat(2, 0).repeat(2, 1).repeat(2, 2).astype(np.int16)  # half the spacing
    half = tuple(s / 2 for s in SPACING)
    client.put_object(Bucket=s3_bucket, Key="masks/fine.nii.gz", Body=nifti_bytes(fine, half))
    bad = np.full(SHAPE, 99, np.int16)
    client.put_object(Bucket=s3_bucket, Key="masks/bad.nii.gz", Body=nifti_bytes(bad, SPACING))
    flat = np.zeros((32, 32), np.int16)
    client.put_object(Bucket=s3_bucket, Key="masks/flat.nii.gz", Body=nifti_bytes(flat, SPACING))
    rows = [
        {"id": "uri", "findings": "Normal chest.", "mask": f"s3://{s3_bucket}/masks/fine.nii.gz"},
        {"id": "drawn", "labels": {"Pleural effusion": 1}, "mask_source": "phantom", "seed": 4},
        {"id": "by-labels", "labels": {"Cardiomegaly": 1}},
        {"id": "unknown-value", "findings": "x", "mask": f"s3://{s3_bucket}/masks/bad.nii.gz"},
        {"id": "flat", "findings": "x", "mask": f"s3://{s3_bucket}/masks/flat.nii.gz"},
        {"id": "nothing", "spacing_mm": list(SPACING)},
    ]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    client.put_object(Bucket=s3_bucket, Key="in/masks.jsonl", Body=body)
    result = run_generate(
        GenerateOptions(
            manifest=f"s3://{s3_bucket}/in/masks.jsonl",
            output=f"s3://{s3_bucket}/out",
            bundle=str(tiny_mask_bundle),
            workers=2,
            batch_size=2,
        )
    )
    assert result.exit_code == EXIT_PARTIAL, result.summary
    assert result.counts["committed"] == 3, result.summary

    errors = {
        e["id"]: e["reason"] for e in read_errors(open_storage(f"s3://{s3_bucket}/out/masks"))
    }
    assert "unknown label values [99]" in errors["unknown-value"]
    assert "a label map is 3-D" in errors["flat"]
    assert "neither text" in errors["nothing"]

    run_uri = f"s3://{s3_bucket}/out/masks"
    items = {item["id"]: item for item in GeneratedVolumes(run_uri)}
    assert set(items) == {"uri", "drawn", "by-labels"}
    assert "mask" not in items["by-labels"] and items["by-labels"]["labels"][2] == 1.0
    assert np.array_equal(items["uri"]["mask"][0].numpy(), truth)
    drawn = items["drawn"]
    expected, _ = make_mask(
        drawn["seed"],
        shape=SHAPE,
        spacing_mm=SPACING,
        prevalence=0.0,
        requested={"Pleural effusion": 1},
    )
    assert np.array_equal(drawn["mask"][0].numpy(), expected)
    assert drawn["mask_classes"][21] == "pleural_effusion"
    assert drawn["volume"].shape == drawn["mask"].shape == (1, *SHAPE)

    # Evaluation reads the same masks back and scores adherence on them.
    from evaluation.adherence import mask_adherence
    from evaluation.data import generated_cases

    masked = [c for c in generated_cases(run_uri) if c.mask is not None]
    assert sorted(c.id for c in masked) == ["drawn", "uri"]
    adherence = mask_adherence((c.volume_hu, c.mask, c.mask_classes) for c in masked)
    assert adherence["volumes"] == 2
    # Known answers on the masks as evaluation reads them back: a volume
    # painted from the map the record asked for (each class at the middle of
    # its tissue's HU range) adheres everywhere, so a mask read back shifted
    # or transposed scores below 1; one painted at -275 HU (inside no
    # tissue's range) adheres nowhere.
    from evaluation.adherence import TISSUE_HU, tissue_of

    def painted(mask, classes):
        volume = np.full(mask.shape, -275.0)
        for value, tissue in tissue_of(classes).items():
            low, high = TISSUE_HU["air" if value == 0 else tissue]
            volume[mask == value] = (low + high) / 2
        return volume

    asked = {"uri": truth, "drawn": expected}
    matching = mask_adherence(
        (painted(asked[c.id], c.mask_classes), c.mask, c.mask_classes) for c in masked
    )
    assert matching["overall"] == matching["in_body"] == 1.0, matching
    assert {"lung", "soft_tissue", "bone"} <= set(matching["per_tissue"])
    against = mask_adherence(
        (np.full(c.mask.shape, -275.0), c.mask, c.mask_classes) for c in masked
    )
    assert against["overall"] == against["in_body"] == 0.0, against

    # An independent reader: the objects copied with boto3, opened by zarr alone.
    for name in ("uri", "drawn"):
        prefix = _uri_of("out/masks", client, s3_bucket, name)
        local = _download(client, s3_bucket, prefix, tmp_path / name)
        image = zarr.open_group(str(local), mode="r")
        files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
        assert files == [
            "mask/c/0/0/0",
            "mask/zarr.json",
            "s0/c/0/0/0",
            "s0/zarr.json",
            "zarr.json",
        ]
        assert image["mask"].shape == image["s0"].shape == SHAPE[::-1]
        image_ms, mask_ms = image.attrs["ome"]["multiscales"]
        scale = lambda m: m["datasets"][0]["coordinateTransformations"][0]["scale"]  # noqa: E731
        assert mask_ms["name"] == "mask" and mask_ms["datasets"][0]["path"] == "mask"
        assert scale(mask_ms) == scale(image_ms) == list(SPACING[::-1])
        names = {
            p["label-value"]: p["name"] for p in image["mask"].attrs["image-label"]["properties"]
        }
        assert names[3] == "lung" and set(names) == set(np.unique(image["mask"][...])) - {0}
        provenance = image.attrs["provenance"]["mask"]
        assert provenance["source"] == ("uri" if name == "uri" else "phantom")
        from factory.writer import validate_ome_zarr

        validate_ome_zarr(local)


def _uri_of(run_prefix, client, bucket, record_id):
    """The record's image, found in the index parts with plain boto3."""
    listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{run_prefix}/index/")["Contents"]
    lines = [
        line
        for item in listing
        for line in client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read().splitlines()
    ]
    for row in map(json.loads, lines):
        if row["id"] == record_id:
            assert row["mask"] == row["uri"] + "/mask"  # the label map's array
            return row["uri"].removeprefix(f"s3://{bucket}/")
    raise AssertionError(record_id)


def _download(client, bucket, prefix, into: Path) -> Path:
    for item in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]:
        target = into / item["Key"][len(prefix) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
    return into
