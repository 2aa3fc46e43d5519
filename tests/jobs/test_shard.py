"""Sharding a manifest: the union of the shards is the manifest, no record twice."""

import json
from pathlib import Path

import pytest

from factory.shard import shard_manifest
from jobs._entry import main


def test_shards_partition_the_manifest(tmp_path):
    lines = [json.dumps({"id": f"r{i}", "findings": "f", "impression": "i"}) for i in range(200)]
    lines.insert(50, "{not json")  # unreadable lines are placed too, for the generate job to reject
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n\n")
    shards = shard_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "shards"), 8)
    assert len(shards) == 8 and sum(shards.values()) == 201
    seen = []
    for uri in shards:
        seen += [line for line in Path(uri).read_text().splitlines() if line]
    assert sorted(seen) == sorted(lines)
    assert max(shards.values()) < 2.5 * min(shards.values())  # a hash spreads them
    again = shard_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "again"), 8)
    assert list(again.values()) == list(shards.values())  # stable


@pytest.mark.integration
def test_shard_job_on_s3(s3_server, s3_bucket, capsys):
    body = "".join(json.dumps({"id": f"r{i}"}) + "\n" for i in range(50))
    s3_server.client().put_object(Bucket=s3_bucket, Key="all.jsonl", Body=body.encode())
    spec = {
        "kind": "shard",
        "manifest": f"s3://{s3_bucket}/all.jsonl",
        "output": f"s3://{s3_bucket}/shards",
        "num_shards": 4,
    }
    assert (
        main(
            "shard",
            lambda s: __import__("jobs.shard", fromlist=["run"]).run(s),
            ["--spec-json", json.dumps(spec)],
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["records"] == 50
    keys = [
        o["Key"]
        for o in s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="shards/")["Contents"]
    ]
    assert keys == [f"shards/shard-0000{i}-of-00004.jsonl" for i in range(4)]
