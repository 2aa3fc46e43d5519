"""The command line's own work, beyond --help: `phantoms` writes the phantoms
the phantom world draws, `bundle init | verify` make and check bundles, and
`info` reports the installed stack."""

import csv
import json
from importlib.metadata import version

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from jobs.cli import app
from phantom.ctrate_layout import phantom_seed
from phantom.world import make_phantom
from report2ct.labels import CTRATE_LABELS

SHAPE, SPACING = (32, 32, 24), (12.0, 12.0, 13.5)


def phantoms(out, *extra):
    return CliRunner().invoke(
        app,
        [
            "phantoms",
            *("--n", "3", "--out", str(out), "--seed", "5", "--valid-fraction", "0.34"),
            *("--shape", *map(str, SHAPE), "--spacing-mm", *map(str, SPACING)),
            *extra,
        ],
    )


def test_phantoms_writes_the_drawn_phantoms_in_ctrate_layout(tmp_path):
    result = phantoms(tmp_path / "one")
    assert result.exit_code == 0, result.output
    assert "wrote 2 train + 1 valid phantoms" in result.output
    root = tmp_path / "one"
    names = {"train": ["train_10000_a_1", "train_10001_a_1"], "valid": ["valid_10002_a_1"]}
    with open(root / "multi_abnormality_labels" / "train_predicted_labels.csv") as handle:
        labels = {row["VolumeName"]: row for row in csv.DictReader(handle)}
    assert sorted(labels) == [f"{n}.nii.gz" for n in names["train"]]
    for index, name in enumerate(names["train"] + names["valid"]):
        split, pid = name.split("_")[:2]
        path = root / f"{split}_fixed" / f"{split}_{pid}" / f"{split}_{pid}_a" / f"{name}.nii.gz"
        image = nib.load(path)
        assert image.shape == SHAPE and image.header.get_zooms() == SPACING
        # Exactly the phantom world's phantom for (seed, index), stored as CT-RATE does (HU + 1024).
        truth = make_phantom(phantom_seed(5, index), shape=SHAPE, spacing_mm=SPACING)
        np.testing.assert_array_equal(np.asarray(image.dataobj) - 1024, truth.volume_hu)
        mask = nib.load(root / "masks" / path.relative_to(root))
        np.testing.assert_array_equal(np.asarray(mask.dataobj), truth.mask)
        if split == "train":
            row = labels[f"{name}.nii.gz"]
            assert {n: int(row[n]) for n in CTRATE_LABELS} == {
                n: truth.labels.get(n, 0) for n in CTRATE_LABELS
            }
    assert json.loads((root / "masks" / "legend.json").read_text())

    # The same seed gives the same data set with 2 worker processes.
    assert phantoms(tmp_path / "two", "--workers", "2").exit_code == 0
    for path in sorted(root.rglob("*")):
        twin = tmp_path / "two" / path.relative_to(root)
        if path.suffix == ".csv" or path.name == "legend.json":
            assert twin.read_text() == path.read_text(), path
        elif path.name.endswith(".nii.gz"):
            np.testing.assert_array_equal(nib.load(twin).dataobj, nib.load(path).dataobj)


def test_bundle_init_then_verify_and_a_tampered_bundle_refused(tmp_path, tiny_bundle):
    runner = CliRunner()
    made = runner.invoke(app, ["bundle", "init", "--out", str(tmp_path / "b"), "--seed", "0"])
    assert made.exit_code == 0, made.output
    sha = made.output.split("sha256 ")[1].split()[0]
    checked = runner.invoke(app, ["bundle", "verify", str(tmp_path / "b")])
    assert checked.exit_code == 0, checked.output
    identity = json.loads(checked.output)
    assert identity["bundle_sha256"] == sha and identity["preset"] == "tiny"
    assert identity["default_shape"] == [32, 32, 16] and identity["encoders"]
    # The same preset and seed as the session's tiny bundle: the same bundle.
    twin = runner.invoke(app, ["bundle", "verify", str(tiny_bundle)])
    assert json.loads(twin.output)["bundle_sha256"] == sha

    weights = tmp_path / "b" / "vae.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    refused = runner.invoke(app, ["bundle", "verify", str(tmp_path / "b")])
    assert refused.exit_code == 1 and "refused" in refused.output
    assert "vae.safetensors" in refused.output


def test_info_lists_the_installed_versions_and_the_device():
    result = CliRunner().invoke(app, ["info"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for dist in ("torch", "monai", "ray", "zarr"):
        line = next(line for line in result.output.splitlines() if f" {dist} " in line)
        assert version(dist) in line, (dist, line)
    assert "missing" not in result.output
    device = next(line for line in result.output.splitlines() if " device " in line)
    assert "cpu" in device or "cuda x" in device
