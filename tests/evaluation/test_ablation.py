"""`ctfactory ablate` end to end on tiny bundles: one row per variant, every
variant scored on the same reports and seeds by the same networks."""

import json
import shutil

from typer.testing import CliRunner

from jobs.cli import app
from phantom.ctrate_layout import DatasetSpec, write_dataset
from report2ct.bundle import build_random_bundle

SHAPE, SPACING_MM = (32, 32, 24), (12.0, 12.0, 13.5)


def test_ablate_writes_one_row_per_variant(tmp_path, tiny_bundle):
    reference = tmp_path / "reference"
    write_dataset(
        reference,
        DatasetSpec(n=24, seed=5, shape=SHAPE, spacing_mm=SPACING_MM, valid_fraction=0.5),
    )
    other = tmp_path / "other"
    build_random_bundle(other, preset_name="tiny", seed=1)
    # The first bundle again under another path: a variant that differs by
    # nothing must score exactly the first bundle's s=5 row (same reports,
    # seeds and networks, as the ablation promises).
    same = tmp_path / "same"
    shutil.copytree(tiny_bundle, same)
    out = tmp_path / "ablation"
    result = CliRunner().invoke(
        app,
        [
            "ablate",
            *("--bundle", f"several={tiny_bundle}", "--bundle", f"other={other}"),
            *("--bundle", f"same={same}"),
            *("--reference", str(reference), "--out", str(out), "--n", "6", "--steps", "2"),
            *("--scale", "3", "--scale", "5", "--epochs", "1"),
            *("--ask-by", "labels", "--ask-by", "text+labels"),
            *("--spacing-mm", "12", "12", "13.5", "--shape", "32", "32", "24"),
            *("--classifier-grid", "common"),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [(r["variant"], r["guidance_scale"]) for r in rows] == [
        ("several: guidance off (s=1)", 1.0),
        ("several: guidance s=3", 3.0),
        ("several: guidance s=5", 5.0),
        ("several: by labels", 5.0),
        ("several: by text+labels", 5.0),
        ("other", 5.0),
        ("same", 5.0),
    ]
    assert [r["ask_by"] for r in rows] == ["text"] * 3 + ["labels", "text+labels", "text", "text"]
    metrics = ("fidelity_macro_auroc", "fidelity_ratio", "fid_2p5d_mean", "clip_text_to_image")
    assert {m: rows[-1][m] for m in metrics} == {m: rows[2][m] for m in metrics}
    # ...and a different bundle does not.
    assert rows[-2]["fid_2p5d_mean"] != rows[2]["fid_2p5d_mean"]
    # Guidance changes the volumes, so it changes what the networks see.
    # and so does what the model is asked by.
    assert len({round(r["fid_2p5d_mean"], 9) for r in rows[:5]}) == 5
    table = (out / "ablation.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| other | 5 |" in table


def test_ablate_refuses_a_missing_bundle_before_any_work(tmp_path):
    args = ["--bundle", f"x={tmp_path / 'nope'}", "--reference", str(tmp_path)]
    result = CliRunner().invoke(app, ["ablate", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and not (tmp_path / "out").exists()


def test_guidance_off_scale_is_one_row():
    from evaluation.ablation import guidance_variants

    rows = guidance_variants("b", scales_on=[1.0, 5.0, 5.0, 3.0])
    assert [(r.name, r.guidance_scale) for r in rows] == [
        ("guidance off (s=1)", 1.0),
        ("guidance s=5", 5.0),
        ("guidance s=3", 3.0),
    ]
