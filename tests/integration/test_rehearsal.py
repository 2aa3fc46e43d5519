"""A rehearsal of the real path, end to end, on stand-ins laid out like the
real thing (issue 15):

- the paper's three encoder repositories as they are published (random
  weights at the real widths 768 / 1024 / 768): CXR-BERT with its own model
  code and `pytorch_model.bin`, Bio_ClinicalBERT with `pytorch_model.bin` and
  a bare `vocab.txt`, MedEmbed as a sentence-transformers repository;
- a CT-RATE-layout set with the release's storage quirks (values already in
  HU under -1024 metadata, raw + metadata, raw + NIfTI scaling; LPS; padding;
  native 0.3-1 mm in-plane spacing);
- the paper architecture (MAISI VAE and UNet levels, attention, spacing
  input, 2560-d context) at a reduced grid and width, each stage trained a
  few steps by a `kind: train` spec into S3 (moto's server);
- `ctfactory train export` from those S3 runs into a bundle on S3, and the
  factory generating from that bundle with remote code allowed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.report2ct.test_encoders import make_clinical_bert, make_cxr_bert, make_med_embed

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CXR, MED, CLINICAL = "BiomedVLP-CXR-BERT-specialized", "MedEmbed-large-v0.1", "Bio_ClinicalBERT"
# The paper preset at a 32^3 grid of 2 mm (inside its spacing range), every
# level and block of the architecture kept, the channels narrowed.
MODEL = {
    "default_shape": [32, 32, 32],
    "default_spacing_mm": [2.0, 2.0, 2.0],
    "vae": {"num_channels": [8, 16, 16], "norm_num_groups": 8},
    "unet": {
        "num_channels": [8, 16, 16, 32],
        "num_head_channels": [0, 0, 8, 8],
        "norm_num_groups": 8,
    },
}
STEPS = {"steps": 2, "micro_batch": 1, "warmup_steps": 1, "checkpoint_every": 100, "log_every": 1}


def _train(stage: str, capsys, **fields) -> dict:
    from jobs.specs import parse_spec
    from jobs.train import run

    spec = {"kind": "train", "stage": stage, "preset": "paper", "model": MODEL, **fields}
    assert run(parse_spec(spec, source=f"{stage}.yaml")) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_the_real_path_rehearsed_from_encoders_to_generated_volumes(
    tmp_path, s3_server, s3_bucket, ray_local, capsys
):
    from phantom.ctrate_layout import DatasetSpec, Quirks, write_dataset

    repos = {
        CXR: make_cxr_bert(tmp_path / "hub/CXR-BERT-specialized", 768),
        MED: make_med_embed(tmp_path / "hub/MedEmbed-large-v0.1", 1024),
        CLINICAL: make_clinical_bert(tmp_path / "hub/Bio_ClinicalBERT", 768),
    }
    assert (repos[CXR] / "pytorch_model.bin").is_file() and (
        repos[CXR] / "modeling_cxrbert.py"
    ).is_file()
    quirks = Quirks(
        storage=("hu+metadata", "raw+metadata", "raw+header"),
        orientation=("RAS", "LPS"),
        padding_hu=-3024,
        in_plane_mm=(0.3, 1.0),
    )
    data = tmp_path / "ct-rate"
    write_dataset(
        data, DatasetSpec(n=4, seed=1, shape=(32, 32, 32), spacing_mm=(2, 2, 2), quirks=quirks)
    )
    runs = f"s3://{s3_bucket}/runs"

    vae = _train(
        "vae",
        capsys,
        data=str(data),
        output=f"{runs}/vae",
        overrides={**STEPS, "crop": [16, 16, 16]},
    )
    ldm = _train(
        "ldm",
        capsys,
        data=str(data),
        vae_run=f"{runs}/vae",
        output=f"{runs}/ldm",
        encoders={name: str(folder) for name, folder in repos.items()},
        allow_remote_code=True,
        overrides=STEPS,
    )
    control = _train(
        "controlnet",
        capsys,
        data=str(data),
        ldm_run=f"{runs}/ldm",
        output=f"{runs}/controlnet",
        overrides=STEPS,
    )
    for summary in (vae, ldm, control):
        assert summary["steps"] == 2 and math.isfinite(summary["final_loss"]), summary

    client = s3_server.client()
    index = json.loads(
        client.get_object(Bucket=s3_bucket, Key="runs/ldm/latents/index.json")["Body"].read()
    )
    # Every quirky volume was read (none skipped), each to the grid's latent and a 2560-d context.
    assert index["count"] == 4 and index["skipped"] == [], index["skipped"]
    assert index["columns"]["latent"]["shape"] == [4, 8, 8, 8]
    assert index["columns"]["context"]["shape"] == [2, 2560]

    from typer.testing import CliRunner

    from jobs.cli import app

    bundle = f"s3://{s3_bucket}/bundles/paper-rehearsal"
    exported = CliRunner().invoke(
        app,
        [
            "train", "export", "--vae-run", f"{runs}/vae", "--ldm-run", f"{runs}/ldm",
            "--controlnet-run", f"{runs}/controlnet", "--data", str(data),
            "--out", bundle, "--allow-remote-code",
        ],
    )  # fmt: skip
    assert exported.exit_code == 0, exported.output
    sha = exported.output.split("sha256 ")[-1].strip()

    def read(key: str) -> bytes:
        return client.get_object(Bucket=s3_bucket, Key=f"bundles/paper-rehearsal/{key}")[
            "Body"
        ].read()

    sums = read("SHA256SUMS").decode()
    # CXR-BERT's code ships checksummed beside its weights; every pickle became safetensors.
    assert f"encoders/{CXR}/modeling_cxrbert.py" in sums
    assert f"encoders/{CLINICAL}/model.safetensors" in sums and ".bin" not in sums
    model = json.loads(read("config.json"))["model"]
    assert [(e["name"], e["trust_remote_code"]) for e in model["encoders"]] == [
        (CXR, True),
        (MED, False),
        (CLINICAL, False),
    ]
    assert model["unet"]["attention_levels"] == [False, False, True, True]
    assert model["default_shape"] == [32, 32, 32] and model["control"]["legend"]

    from factory.job import EXIT_OK, GenerateOptions, run_generate

    record = {
        "id": "rehearsal-0",
        "findings": "Right pleural effusion. A 9 mm nodule in the left upper lobe.",
        "impression": "Right pleural effusion.",
        "spacing_mm": [2.0, 2.0, 2.0],
        "shape": [32, 32, 32],
    }
    client.put_object(Bucket=s3_bucket, Key="in/rehearsal.jsonl", Body=json.dumps(record).encode())
    options = GenerateOptions(
        manifest=f"s3://{s3_bucket}/in/rehearsal.jsonl",
        output=f"s3://{s3_bucket}/out",
        bundle=bundle,
        workers=1,
        cpus_per_worker=0.5,
        num_steps=2,
        allow_remote_code=True,
    )
    result = run_generate(options)
    assert result.exit_code == EXIT_OK, result.summary
    assert result.summary["bundle_sha256"] == sha

    import zarr

    listing = client.list_objects_v2(Bucket=s3_bucket, Prefix="out/rehearsal/index/")
    rows = [
        json.loads(line)
        for item in listing["Contents"]
        for line in client.get_object(Bucket=s3_bucket, Key=item["Key"])["Body"].read().splitlines()
    ]
    assert [row["id"] for row in rows] == ["rehearsal-0"]
    prefix = rows[0]["uri"].removeprefix(f"s3://{s3_bucket}/")
    local = tmp_path / "volume.ome.zarr"
    for item in client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix + "/")["Contents"]:
        target = local / item["Key"][len(prefix) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(client.get_object(Bucket=s3_bucket, Key=item["Key"])["Body"].read())
    group = zarr.open_group(str(local), mode="r")
    array = np.asarray(group[group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"]])
    assert array.shape == (32, 32, 32) and array.dtype == np.int16
    provenance = group.attrs["provenance"]
    assert provenance["bundle_sha256"] == sha
    assert [e["name"] for e in provenance["encoders"]] == [CXR, MED, CLINICAL]
