"""The chaos suite: faults, bad input and security, against a real local S3
endpoint and a real local Ray. Each scenario records what happened (committed,
lost, duplicated) in the assertions; docs/guarantees.md tabulates them."""

import json
import logging
import re
import shutil
import threading
from pathlib import Path

import pytest

from factory.index import read_errors
from factory.job import EXIT_OK, EXIT_PARTIAL, GenerateOptions, run_generate
from factory.storage import open_storage
from tests.chaos.harness import (
    TcpProxy,
    generate_cli,
    kill_group,
    manifest_lines,
    objects,
    settle,
    wait_for,
)
from tests.services import TEST_ACCESS_KEY, TEST_SECRET_KEY

pytestmark = pytest.mark.integration


def put(s3_server, bucket, key, lines):
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=("\n".join(lines) + "\n").encode())
    return f"s3://{bucket}/{key}"


def committed_keys(client, bucket, run_prefix):
    return sorted(
        k.rsplit("/", 1)[1][:-5] for k in objects(client, bucket, f"{run_prefix}/commits/")
    )


def test_three_actor_kills_in_a_24_record_job(
    s3_server, s3_bucket, ray_local, tiny_bundle, monkeypatch
):
    monkeypatch.setenv("CTFACTORY_FAULTS", "kill_before_commit=3")
    manifest = put(s3_server, s3_bucket, "in/chaos24.jsonl", list(manifest_lines(24)))
    result = run_generate(
        GenerateOptions(
            manifest=manifest,
            output=f"s3://{s3_bucket}/out",
            bundle=str(tiny_bundle),
            workers=2,
            num_steps=2,
        )
    )
    client = s3_server.client()
    assert result.exit_code == EXIT_OK
    assert (
        len(objects(client, s3_bucket, "out/chaos24/_work/faults/")) == 3
    )  # three workers really died
    keys = committed_keys(client, s3_bucket, "out/chaos24")
    assert keys == [f"c{i:03d}" for i in range(24)]  # 24 committed, none twice
    from factory.reader import GeneratedVolumes

    run_uri = f"s3://{s3_bucket}/out/chaos24"
    assert (
        sorted(entry.id for entry in GeneratedVolumes(run_uri).entries) == keys
    )  # leftovers invisible

    # Secrets: nothing the job wrote, and no log of the local Ray, holds the credentials.
    for key in objects(client, s3_bucket):
        body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert TEST_SECRET_KEY.encode() not in body and TEST_ACCESS_KEY.encode() not in body, key
    logs = Path(ray_local._private.worker._global_node.get_logs_dir_path())
    for path in logs.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert TEST_SECRET_KEY.encode() not in text and TEST_ACCESS_KEY.encode() not in text, (
                path
            )
    # Confinement: every object is the manifest or under the run's prefix.
    assert all(k.startswith(("in/", "out/chaos24/")) for k in objects(client, s3_bucket))

    # The killed attempts' leftovers exist, are invisible, and `ctfactory cleanup` removes them.
    from typer.testing import CliRunner

    from factory.commit import find_leftovers
    from factory.storage import open_storage
    from jobs.cli import app

    run = open_storage(f"s3://{s3_bucket}/out/chaos24")
    assert len(find_leftovers(run)) >= 1
    cleaned = CliRunner().invoke(app, ["cleanup", f"s3://{s3_bucket}/out/chaos24"])
    assert cleaned.exit_code == 0 and "leftover objects removed" in cleaned.output
    assert find_leftovers(run) == [] and not objects(client, s3_bucket, "out/chaos24/_work/")
    assert len(GeneratedVolumes(run_uri)) == 24  # every committed volume still reads
    assert committed_keys(client, s3_bucket, "out/chaos24") == keys


def test_s3_outage_of_ten_seconds_mid_job(
    s3_server, s3_bucket, ray_local, tiny_bundle, monkeypatch, caplog
):
    from factory import storage

    manifest = put(s3_server, s3_bucket, "in/outage.jsonl", list(manifest_lines(12, "o")))
    proxy = TcpProxy(s3_server.port).start()
    monkeypatch.setenv(
        "AWS_ENDPOINT_URL", proxy.url
    )  # the job (driver and workers) goes through the proxy
    storage._clients.clear()
    direct = s3_server.client()
    job_done = threading.Event()
    seen = {}  # what the saboteur saw of the job at the outage's start and end

    def count_commits():
        return len(objects(direct, s3_bucket, "out/outage/commits/"))

    def outage_after_first_commits():
        # On the job's events, not a deadline of its own: a slow (busy)
        # machine delays the first commits, it does not cancel the outage.
        wait_for(lambda: count_commits() >= 2 or job_done.is_set(), timeout_s=900, poll_s=0.2)
        if count_commits() >= 2 and not job_done.is_set():
            seen["start"] = (count_commits(), job_done.is_set())
            proxy.outage(10.0)
            seen["end"] = (count_commits(), job_done.is_set())

    saboteur = threading.Thread(target=outage_after_first_commits, daemon=True)
    saboteur.start()
    caplog.set_level(logging.WARNING, logger="factory.storage")
    try:
        result = run_generate(
            GenerateOptions(
                manifest=manifest,
                output=f"s3://{s3_bucket}/out",
                bundle=str(tiny_bundle),
                workers=2,
                num_steps=2,
            )
        )
    finally:
        job_done.set()
        saboteur.join(timeout=30)
        proxy.stop()
        storage._clients.clear()
    assert result.exit_code == EXIT_OK and result.counts["committed"] == 12  # 0 lost
    assert committed_keys(direct, s3_bucket, "out/outage") == [f"o{i:03d}" for i in range(12)]

    # The outage fell mid-job: the job had committed some volumes but not all
    # when it began, was still running when it ended, and committed the rest
    # after it (nothing can commit through a closed proxy).
    assert "start" in seen and "end" in seen, "the outage never started"
    (at_start, done_at_start), (at_end, done_at_end) = seen["start"], seen["end"]
    assert 2 <= at_start < 12 and not done_at_start, seen
    assert at_end < 12 and not done_at_end, seen

    # Storage calls met the outage and retried, each retry logged: by the
    # driver (captured here) or by the Ray workers (in the local Ray's logs,
    # which never reach the driver). Only this test's bucket counts.
    retry = re.compile(rf"s3://{re.escape(s3_bucket)}/\S*: transient error \(\w+\), retry \d+/\d+")
    retries = [r.getMessage() for r in caplog.records if retry.search(r.getMessage())]
    logs = Path(ray_local._private.worker._global_node.get_logs_dir_path())
    for path in logs.rglob("*"):
        if path.is_file():
            retries += retry.findall(path.read_text(errors="replace"))
    assert retries, "no storage call logged a retry during a 10 s outage"


def test_driver_killed_then_rerun_generates_only_the_missing(
    s3_server, s3_bucket, tiny_bundle, tmp_path
):
    # Enough records that the kill, at the third commit, lands with most of
    # the job still to do even on an idle machine (12 were all committed by
    # then once writes got faster; 24 left 17 to do here).
    total = 24
    manifest = put(s3_server, s3_bucket, "in/driver.jsonl", list(manifest_lines(total, "d")))
    env = {**s3_server.env, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    client = s3_server.client()
    first = generate_cli(
        manifest, f"s3://{s3_bucket}/out", str(tiny_bundle), env=env, log=tmp_path / "first.log"
    )
    assert wait_for(
        lambda: len(objects(client, s3_bucket, "out/driver/commits/")) >= 3, timeout_s=180
    )
    kill_group(first)  # SIGKILL: the driver and the Ray it started
    # A worker mid-record may still commit it; what counts is the state the rerun finds.
    before = settle(lambda: objects(client, s3_bucket, "out/driver/commits/"))
    committed_before = len(before)
    assert 3 <= committed_before < total
    winners = {}
    for key in before:
        marker = json.loads(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
        winners[marker["key"]] = marker
    snapshot = {
        k: v
        for k, v in objects(client, s3_bucket, "out/driver/volumes/").items()
        if k.split("/")[3].split(".")[0] == winners.get(k.split("/")[2], {}).get("attempt")
    }

    second = generate_cli(
        manifest, f"s3://{s3_bucket}/out", str(tiny_bundle), env=env, log=tmp_path / "second.log"
    )
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-2000:]
    summary = json.loads(
        client.get_object(Bucket=s3_bucket, Key="out/driver/summary.json")["Body"].read()
    )
    assert summary["counts"]["committed"] == total
    assert summary["counts"]["generated"] == total - committed_before  # only the missing ones
    after = objects(client, s3_bucket, "out/driver/")
    for key, meta in snapshot.items():  # no committed output was rewritten
        assert after[key] == meta, key
    for key in before:
        assert after[key] == before[key], key


BAD_LINES = [
    '{"id": "bad-json", "findings": ',
    json.dumps({"id": "unknown-field", "findings": "a", "impression": "b", "colour": "red"}),
    json.dumps({"id": "missing-text", "spacing_mm": [8, 8, 10]}),  # neither text nor labels
    json.dumps({"id": "relative-mask", "findings": "a", "mask": "masks/m.nii.gz"}),
    json.dumps({"id": "mask-no-controlnet", "findings": "a", "mask_source": "phantom"}),
    json.dumps({"id": "empty-text", "findings": " ", "impression": "b"}),
    json.dumps({"id": "huge", "findings": "x" * (10 * 1024 * 1024), "impression": "b"}),
    json.dumps({"id": "control", "findings": "a\u0007b", "impression": "b"}),
    b'{"id": "utf8", "findings": "\xff\xfe", "impression": "b"}'.decode("latin-1"),
    json.dumps({"id": "c000", "findings": "duplicate", "impression": "b"}),
    json.dumps({"id": "../escape", "findings": "a", "impression": "b"}),
    json.dumps({"id": "a/b", "findings": "a", "impression": "b"}),
    '{"id": "nan-spacing", "findings": "a", "impression": "b", "spacing_mm": [NaN, 8, 10]}',
    json.dumps(
        {"id": "zero-spacing", "findings": "a", "impression": "b", "spacing_mm": [0, 8, 10]}
    ),
    json.dumps(
        {"id": "far-spacing", "findings": "a", "impression": "b", "spacing_mm": [300, 8, 10]}
    ),
    json.dumps(
        {"id": "absurd-shape", "findings": "a", "impression": "b", "shape": [99999, 32, 16]}
    ),
    json.dumps(
        {"id": "bad-label-name", "findings": "a", "impression": "b", "labels": {"Unicorn": 1}}
    ),
    json.dumps(
        {"id": "bad-label-value", "findings": "a", "impression": "b", "labels": {"Cardiomegaly": 7}}
    ),
]


def test_bad_manifest_rows_reported_good_rows_committed(tmp_path, ray_local, tiny_bundle):
    lines = [*manifest_lines(3), *BAD_LINES]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b"".join(
            (line.encode("latin-1") if "\xff" in line else line.encode()) + b"\n" for line in lines
        )
    )
    result = run_generate(
        GenerateOptions(
            manifest=str(path),
            output=str(tmp_path / "out"),
            bundle=str(tiny_bundle),
            workers=1,
            num_steps=2,
        )
    )
    assert result.exit_code == EXIT_PARTIAL
    assert result.counts["committed"] == 3 and result.counts["records_rejected"] == len(BAD_LINES)
    errors = list(read_errors(open_storage(str(tmp_path / "out/bad"))))
    assert [e["line"] for e in errors] == list(range(4, 4 + len(BAD_LINES)))
    assert all(e["reason"] for e in errors)
    # Nothing was written outside the run, whatever the ids said.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bad"]
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("tamper", ["weights", "checksums", "code", "pickle"])
def test_unsafe_bundles_are_refused_before_any_generation(tmp_path, tiny_bundle, tamper):
    from report2ct.bundle import BundleError, write_checksums

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    if tamper == "weights":
        data = bytearray((bundle / "vae.safetensors").read_bytes())
        data[-1] ^= 1
        (bundle / "vae.safetensors").write_bytes(bytes(data))
    elif tamper == "checksums":
        (bundle / "SHA256SUMS").unlink()
    elif tamper == "code":
        document = json.loads((bundle / "config.json").read_text())
        document["model"]["factory_hook"] = "os.system"
        (bundle / "config.json").write_text(json.dumps(document))
        write_checksums(bundle)
    else:
        (bundle / "evil.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
        write_checksums(bundle)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(manifest_lines(2)) + "\n")
    with pytest.raises(BundleError):
        run_generate(
            GenerateOptions(
                manifest=str(manifest), output=str(tmp_path / "out"), bundle=str(bundle)
            )
        )
    assert not (tmp_path / "out").exists()  # refused before anything was written
