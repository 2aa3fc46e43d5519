"""The factory end to end against a real local S3 endpoint and a real local Ray."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from factory.index import read_errors
from factory.job import EXIT_OK, EXIT_PARTIAL, GenerateOptions, run_generate
from factory.storage import open_storage
from report2ct.labels import CTRATE_LABELS

pytestmark = pytest.mark.integration

REPORTS = [
    ("Large right pleural effusion with compressive atelectasis.", "Right pleural effusion."),
    ("The heart is enlarged.", "Cardiomegaly."),
    ("A 12 mm nodule in the left upper lobe.", "Left upper lobe nodule."),
    ("Trachea and both main bronchi are open. No effusion.", "Normal thorax CT."),
]


def records(n, start=0):
    out = []
    for i in range(start, start + n):
        findings, impression = REPORTS[i % len(REPORTS)]
        out.append(
            {
                "id": f"vol-{i:03d}",
                "findings": findings,
                "impression": impression,
                "labels": {"Pleural effusion": int(i % 4 == 0), "Cardiomegaly": int(i % 4 == 1)},
            }
        )
    return out


def put_manifest(s3, bucket, key, rows):
    body = "".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in rows)
    s3.client().put_object(Bucket=bucket, Key=key, Body=body.encode())
    return f"s3://{bucket}/{key}"


def read_run(s3, bucket, run_prefix, folder):
    """Every row of the run's index or errors parts, read with plain boto3."""
    client, rows = s3.client(), []
    listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{run_prefix}/{folder}/")
    for item in sorted(listing.get("Contents", []), key=lambda item: item["Key"]):
        body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read().decode()
        rows.extend(json.loads(line) for line in body.splitlines() if line)
    return rows


def download_group(s3, bucket, prefix, into: Path) -> Path:
    """An independent copy with boto3, to be opened by zarr alone."""
    client = s3.client()
    for item in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]:
        target = into / item["Key"][len(prefix) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
    return into


def options(manifest, output, bundle, **kwargs):
    return GenerateOptions(
        manifest=manifest, output=output, bundle=str(bundle), **{"workers": 2, **kwargs}
    )


def test_manifest_on_s3_to_committed_ome_zarr_on_s3(s3_server, s3_bucket, ray_local, tiny_bundle):
    manifest = put_manifest(s3_server, s3_bucket, "in/batch.jsonl", records(8))
    result = run_generate(
        options(
            manifest, f"s3://{s3_bucket}/out", tiny_bundle, gpus_per_worker=1, cpus_per_worker=0.4
        )
    )
    assert result.exit_code == EXIT_OK, result.summary
    assert result.counts["committed"] == result.counts["generated"] == 8

    index = read_run(s3_server, s3_bucket, "out/batch", "index")
    assert sorted(row["id"] for row in index) == [f"vol-{i:03d}" for i in range(8)]
    gpu_ids = set()
    for row in index:
        prefix = row["uri"].removeprefix(f"s3://{s3_bucket}/")
        with tempfile.TemporaryDirectory() as scratch:
            group = zarr.open_group(
                str(download_group(s3_server, s3_bucket, prefix, Path(scratch))), mode="r"
            )
            multiscale = group.attrs["ome"]["multiscales"][0]
            assert [a["name"] for a in multiscale["axes"]] == ["z", "y", "x"]
            assert {a["unit"] for a in multiscale["axes"]} == {"millimeter"}
            scale = multiscale["datasets"][0]["coordinateTransformations"][0]["scale"]
            assert scale == [10.0, 8.0, 8.0]  # tiny preset default spacing (x, y, z) = (8, 8, 10)
            array = group[multiscale["datasets"][0]["path"]]
            assert array.dtype == np.int16 and array.shape == (16, 32, 32)
            provenance = group.attrs["provenance"]
            assert provenance["record"]["id"] == row["id"]
            assert provenance["labels"] == row["labels"] and set(row["labels"]) == set(
                CTRATE_LABELS
            )
            assert provenance["bundle_sha256"] == result.summary["bundle_sha256"]
            assert provenance["sampler"]["precision"] == "bf16"
            assert provenance["report"]["findings"] == row["findings"]
            gpu_ids.update(provenance["worker"]["gpu_ids"])
            from ome_zarr_models.v05.image import Image

            Image.from_zarr(group)  # the spec's own models accept it
    # Two actors with num_gpus=1 on two logical GPUs: each pinned to its own.
    assert gpu_ids == {"0", "1"}

    summary = json.loads(
        s3_server.client().get_object(Bucket=s3_bucket, Key="out/batch/summary.json")["Body"].read()
    )
    assert set(summary["seconds"]["time_split"]) == {"text", "sample", "decode", "host", "write"}
    assert summary["volumes_per_hour"] > 0


def test_rerun_skips_committed_and_partial_run_completes_the_rest(
    s3_server, s3_bucket, ray_local, tiny_bundle
):
    out = f"s3://{s3_bucket}/out"
    first = put_manifest(s3_server, s3_bucket, "in/first.jsonl", records(5))
    assert run_generate(options(first, out, tiny_bundle, run="job")).counts["generated"] == 5
    # The full manifest, into the same run: only the 3 missing volumes are made.
    full = put_manifest(s3_server, s3_bucket, "in/full.jsonl", records(8))
    again = run_generate(options(full, out, tiny_bundle, run="job"))
    assert again.counts == {
        "volumes_requested": 8,
        "committed": 8,
        "generated": 3,
        "skipped_already_committed": 5,
        "failed": 0,
        "records_rejected": 0,
    }
    # A rerun of the committed job is test_retries_e2e's.
    listing = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="out/job/commits/")
    assert len(listing["Contents"]) == 8


def test_killed_actors_still_commit_every_record_exactly_once(
    s3_server, s3_bucket, ray_local, tiny_bundle, monkeypatch
):
    monkeypatch.setenv("CTFACTORY_FAULTS", "kill_before_commit=2")
    manifest = put_manifest(s3_server, s3_bucket, "in/chaos.jsonl", records(8))
    result = run_generate(options(manifest, f"s3://{s3_bucket}/out", tiny_bundle))
    assert result.exit_code == EXIT_OK and result.counts["committed"] == 8
    client = s3_server.client()
    kills = client.list_objects_v2(Bucket=s3_bucket, Prefix="out/chaos/_work/faults/")["Contents"]
    assert len(kills) == 2  # the faults really happened
    index = read_run(s3_server, s3_bucket, "out/chaos", "index")
    assert sorted(r["id"] for r in index) == [f"vol-{i:03d}" for i in range(8)]  # no duplicates
    # The killed attempts left data no commit names: invisible, then cleaned.
    from factory.commit import cleanup, find_leftovers
    from factory.reader import GeneratedVolumes
    from factory.storage import open_storage

    run = open_storage(f"s3://{s3_bucket}/out/chaos")
    leftovers = find_leftovers(run)
    assert len(leftovers) == 2
    assert all(r["uri"].split("/out/chaos/")[1] not in leftovers for r in index)
    dataset = GeneratedVolumes(f"s3://{s3_bucket}/out/chaos")
    assert len(dataset) == 8 and dataset[0]["volume"].shape == (1, 32, 32, 16)
    assert cleanup(run)["leftover_objects_removed"] > 0
    assert find_leftovers(run) == []


def test_bad_rows_reported_good_rows_committed(tmp_path, ray_local, tiny_bundle):
    rows = [
        *records(3),
        '{"id": "broken", ',
        {**records(1, 10)[0], "spacing_mm": [0, 8, 10]},
        {**records(1, 11)[0], "mystery": 1},
        records(1)[0],
    ]
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in rows))
    result = run_generate(options(str(manifest), str(tmp_path / "out"), tiny_bundle))
    assert result.exit_code == EXIT_PARTIAL
    assert result.counts["committed"] == 3 and result.counts["records_rejected"] == 4
    errors = list(read_errors(open_storage(str(tmp_path / "out/mixed"))))
    assert [(e["line"], e["id"]) for e in errors] == [
        (4, None),
        (5, "vol-010"),
        (6, "vol-011"),
        (7, "vol-000"),
    ]
    assert "malformed JSON" in errors[0]["reason"] and "duplicate id" in errors[3]["reason"]


def test_same_seed_same_volume_whatever_workers_and_batch(tmp_path, ray_local, tiny_bundle):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records(4)))
    runs = {}
    for name, workers, batch in (("one", 1, 1), ("two", 2, 2)):
        result = run_generate(
            options(
                str(manifest),
                str(tmp_path / "out"),
                tiny_bundle,
                run=name,
                workers=workers,
                batch_size=batch,
                precision="fp32",
            )
        )
        # A run that committed nothing (or not everything) must not pass as
        # "the same volumes": both runs generate all 4.
        assert result.exit_code == EXIT_OK, (name, result.summary)
        assert result.counts["committed"] == result.counts["generated"] == 4, (name, result.counts)
        from factory.reader import GeneratedVolumes

        runs[name] = {
            item["id"]: item["volume"].numpy()
            for item in GeneratedVolumes(str(tmp_path / f"out/{name}"))
        }
    assert sorted(runs["one"]) == sorted(runs["two"]) == [f"vol-{i:03d}" for i in range(4)]
    for key, volume in runs["one"].items():
        assert np.abs(volume - runs["two"][key]).max() <= 1.0, key  # kernels may round differently
