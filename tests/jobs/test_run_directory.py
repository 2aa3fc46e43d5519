"""An s3:// run directory (jobs.train.RunDirectory, fetch_run) against a real
local S3 endpoint: a resumed rank gets the latest *complete* checkpoint and
only its own optimizer shard, a checkpoint's client.json goes up last, and a
run started afresh drops the old checkpoints but keeps the cache."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

SHARD = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"


def _put(s3_server, bucket, keys: dict[str, bytes]) -> None:
    for key, body in keys.items():
        s3_server.client().put_object(Bucket=bucket, Key=f"run/{key}", Body=body)


def _keys(s3_server, bucket) -> set[str]:
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="run/")
    return {item["Key"].removeprefix("run/") for item in listed.get("Contents", [])}


@pytest.fixture
def stored_run(s3_server, s3_bucket):
    _put(
        s3_server,
        s3_bucket,
        {
            "cache.safetensors": b"cache",
            "log.jsonl": b"{}\n",
            "checkpoints/step-2/client.json": json.dumps({"step": 2}).encode(),
            "checkpoints/step-2/ema.safetensors": b"ema2",
            "checkpoints/step-2/mp_rank_00_model_states.pt": b"model2",
            "checkpoints/step-2/" + SHARD.format(0): b"shard0",
            "checkpoints/step-2/" + SHARD.format(1): b"shard1",
            # an upload cut short: no client.json, so not a checkpoint yet
            "checkpoints/step-4/ema.safetensors": b"ema4",
            "checkpoints/step-4/" + SHARD.format(1): b"shard1-4",
        },
    )
    return f"s3://{s3_bucket}/run"


def test_a_resumed_rank_gets_the_latest_complete_checkpoint_and_its_own_shard(
    stored_run, tmp_path, monkeypatch
):
    import training.engine
    from jobs.train import RunDirectory

    monkeypatch.setattr(training.engine, "process_rank", lambda: (1, 2))
    run = RunDirectory(stored_run, tmp_path / "scratch", resume=True)
    files = {p.relative_to(run.path).as_posix() for p in run.path.rglob("*") if p.is_file()}
    assert files == {
        "cache.safetensors",
        "log.jsonl",
        "checkpoints/step-2/client.json",
        "checkpoints/step-2/ema.safetensors",
        "checkpoints/step-2/mp_rank_00_model_states.pt",
        "checkpoints/step-2/" + SHARD.format(1),
    }
    assert (run.path / "checkpoints/step-2" / SHARD.format(1)).read_bytes() == b"shard1"


def test_rank_zero_puts_client_json_last_and_only_its_own_files(
    stored_run, s3_server, s3_bucket, tmp_path, monkeypatch
):
    import training.engine
    from jobs.train import RunDirectory

    monkeypatch.setattr(training.engine, "process_rank", lambda: (0, 2))
    run = RunDirectory(stored_run, tmp_path / "scratch", resume=True)
    folder = run.path / "checkpoints/step-3"
    folder.mkdir(parents=True)
    for name in ("ema.safetensors", "mp_rank_00_model_states.pt", SHARD.format(0), SHARD.format(1)):
        (folder / name).write_bytes(name.encode())
    (folder / "client.json").write_text(json.dumps({"step": 3}))
    written = []

    class Recording:  # the run's storage, every put noted in order
        def __init__(self, storage):
            self.storage = storage

        def __getattr__(self, name):
            return getattr(self.storage, name)

        def write_bytes(self, key, data):
            written.append(key)
            self.storage.write_bytes(key, data)

    run.storage = Recording(run.storage)
    run.checkpointed(folder)
    # Downloaded files are not sent back; rank 1's shard is rank 1's to send.
    assert written == [
        "checkpoints/step-3/ema.safetensors",
        "checkpoints/step-3/mp_rank_00_model_states.pt",
        "checkpoints/step-3/" + SHARD.format(0),
        "checkpoints/step-3/client.json",
    ]
    assert "checkpoints/step-3/" + SHARD.format(1) not in _keys(s3_server, s3_bucket)


def test_a_run_started_afresh_drops_old_checkpoints_and_keeps_the_cache(
    stored_run, s3_server, s3_bucket, tmp_path
):
    from jobs.train import RunDirectory

    run = RunDirectory(stored_run, tmp_path / "scratch", resume=False)
    assert not any(run.path.rglob("*.*"))  # nothing downloaded
    assert _keys(s3_server, s3_bucket) == {"cache.safetensors"}


def test_fetch_run_takes_the_latest_complete_ema_and_what_is_asked(stored_run, tmp_path):
    from jobs.train import fetch_run

    local = fetch_run(stored_run, tmp_path / "fetched", ("cache.safetensors",))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert files == {
        "cache.safetensors",
        "checkpoints/step-2/client.json",
        "checkpoints/step-2/ema.safetensors",
    }
    with pytest.raises(FileNotFoundError, match="not a run"):
        fetch_run(stored_run + "/nothing", tmp_path / "none")
