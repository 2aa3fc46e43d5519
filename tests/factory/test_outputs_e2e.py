"""What a generate job writes beside each volume, and the options that shape
it, through the command line and `run_generate` on a real local Ray: NIfTI
and PNG copies, `ctfactory preview`, `num_samples`, per-record guidance mixed
in one batch, fp16, and a bundle read from S3 into the node's cache."""

import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from factory.index import read_index
from factory.job import EXIT_OK, GenerateOptions, run_generate
from factory.reader import open_volume
from factory.storage import open_storage
from jobs.cli import app

pytestmark = pytest.mark.integration

DEMO_BUNDLE = Path(__file__).resolve().parents[2] / "report2ct" / "bundles" / "demo"
TEXT = {"findings": "Large right pleural effusion.", "impression": "Right pleural effusion."}
# One seed, one report, one grid: the two records differ by their guidance only.
GUIDED = [
    {"id": "g3", **TEXT, "seed": 21, "guidance_scale": 3.0},
    {"id": "g7", **TEXT, "seed": 21, "guidance_scale": 7.0},
]
# Not the tiny bundle's default (8, 8, 10): the NIfTI must carry the record's.
SPACING = (6.0, 7.0, 9.0)


def write_manifest(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def index_of(run_uri: str) -> dict:
    return {entry.key: entry for entry in read_index(open_storage(run_uri))}


def decoded_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every pixel: a truncated or corrupt PNG raises
    return image


def test_nifti_preview_samples_and_mixed_guidance_in_one_batch(ray_local, tiny_bundle, tmp_path):
    rows = [*GUIDED, {"id": "s", **TEXT, "seed": 11, "num_samples": 2, "spacing_mm": SPACING}]
    manifest = write_manifest(tmp_path / "mixed.jsonl", rows)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            *("--manifest", manifest, "--out", str(out), "--model", str(tiny_bundle)),
            *("--workers", "1", "--batch-size", "2", "--steps", "2", "--precision", "fp32"),
            *("--nifti", "--preview"),
        ],
    )
    assert result.exit_code == 0, result.output
    entries = index_of(str(out / "mixed"))
    assert sorted(entries) == ["g3", "g7", "s~0", "s~1"]

    # num_samples: one key per sample, sample k seeded seed + k.
    for k in (0, 1):
        entry = entries[f"s~{k}"]
        assert (entry.id, entry.sample, entry.seed) == ("s", k, 11 + k)
        assert entry.spacing_mm == SPACING
    volumes = {key: open_volume(entry.uri)[0] for key, entry in entries.items()}
    assert not np.array_equal(volumes["s~0"], volumes["s~1"])

    # --nifti: the same voxels, with the record's spacing in the affine and header.
    # --preview: a PNG that decodes.
    for key, entry in entries.items():
        image = nib.load(entry.nifti_uri)
        np.testing.assert_array_equal(image.affine, np.diag([*entry.spacing_mm, 1.0]))
        assert image.header.get_zooms() == pytest.approx(entry.spacing_mm)
        assert image.shape == entry.shape
        np.testing.assert_array_equal(np.asarray(image.dataobj), volumes[key])
        png = decoded_png(Path(entry.preview_uri).read_bytes())
        assert png.width > 0 and png.height > 0, key
    assert entries["s~0"].spacing_mm != entries["g3"].spacing_mm  # the spacing check has teeth

    # `ctfactory preview` renders a committed volume on its own.
    png = tmp_path / "p.png"
    shown = CliRunner().invoke(app, ["preview", entries["s~1"].uri, "--png", str(png)])
    assert shown.exit_code == 0, shown.output
    decoded_png(png.read_bytes())

    # Mixed guidance in one batch of 2: each volume is the one its own
    # guidance gives when generated alone (batch 1); guidance does matter.
    assert np.abs(volumes["g3"].astype(float) - volumes["g7"]).max() > 10
    alone = run_generate(
        GenerateOptions(
            manifest=write_manifest(tmp_path / "alone.jsonl", GUIDED),
            output=str(out),
            bundle=str(tiny_bundle),
            workers=1,
            batch_size=1,
            num_steps=2,
            precision="fp32",
        )
    )
    assert alone.exit_code == EXIT_OK and alone.counts["generated"] == 2, alone.counts
    for key, entry in index_of(str(out / "alone")).items():
        single = open_volume(entry.uri)[0].astype(float)
        assert np.abs(single - volumes[key]).max() <= 1.0, key  # kernels may round differently


def test_fp16_with_the_demo_bundle_read_from_s3_into_one_cached_copy(
    s3_server, s3_bucket, ray_local, tmp_path, monkeypatch
):
    client = s3_server.client()
    for path in DEMO_BUNDLE.rglob("*"):
        if path.is_file():
            key = f"bundles/demo/{path.relative_to(DEMO_BUNDLE).as_posix()}"
            client.upload_file(str(path), s3_bucket, key)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CTFACTORY_CACHE", str(cache))  # forwarded to the Ray workers
    rows = [{"id": "b0", **TEXT, "shape": [32, 32, 32], "seed": 0}]
    manifest = write_manifest(tmp_path / "s3bundle.jsonl", rows)
    result = CliRunner().invoke(
        app,
        [
            "generate",
            *("--manifest", manifest, "--out", f"s3://{s3_bucket}/out"),
            *("--model", f"s3://{s3_bucket}/bundles/demo"),
            *("--workers", "1", "--steps", "2", "--precision", "fp16"),
        ],
    )
    assert result.exit_code == 0, result.output
    entries = index_of(f"s3://{s3_bucket}/out/s3bundle")
    assert sorted(entries) == ["b0"]
    for entry in entries.values():
        volume, _, attrs = open_volume(entry.uri)
        assert volume.shape == (32, 32, 32)
        assert attrs["provenance"]["sampler"]["precision"] == "fp16"
    summary = json.loads(
        client.get_object(Bucket=s3_bucket, Key="out/s3bundle/summary.json")["Body"].read()
    )
    expected_sha = json.loads(
        CliRunner().invoke(app, ["bundle", "verify", str(DEMO_BUNDLE)]).output
    )["bundle_sha256"]
    assert summary["bundle_sha256"] == expected_sha

    # The driver and the worker share the node's cache: one copy, no partial download.
    copies = sorted(p for p in (cache / "bundles").iterdir() if not p.name.startswith("."))
    assert len(copies) == 1, copies
    assert not [p for p in (cache / "bundles").iterdir() if ".partial-" in p.name]
    assert (copies[0] / "SHA256SUMS").read_bytes() == (DEMO_BUNDLE / "SHA256SUMS").read_bytes()
    shutil.rmtree(cache)
