"""A `kind: train` spec for the `ldm` stage runs under Ray Train: two CPU
workers (local Ray, loopback only) set up one process group, DeepSpeed
trains in it under the DeepSpeed config the spec names, and the run lands
on S3, read back here with boto3 (not the code that wrote it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _vae_run(folder: Path) -> Path:
    """A random tiny VAE as a VAE run (the path a pretrained MAISI VAE takes)."""
    from safetensors.torch import save_file

    from report2ct.codec import LatentCodec
    from report2ct.config import preset
    from training.maisi import import_maisi_vae

    vae = LatentCodec(preset("tiny").vae).vae
    folder.mkdir(parents=True)
    save_file(vae.state_dict(), folder / "vae.safetensors")
    import_maisi_vae(folder / "vae.safetensors", folder / "run", preset("tiny"))
    return folder / "run"


def test_two_ray_train_workers_train_the_ldm_stage_into_s3(
    tmp_path, s3_server, s3_bucket, ray_local, capsys
):
    from jobs.specs import parse_spec
    from jobs.train import run
    from phantom.ctrate_layout import DatasetSpec, write_dataset
    from report2ct.bundle import write_random_bert

    write_dataset(tmp_path / "data", DatasetSpec(n=4, shape=(32, 32, 16), spacing_mm=(8, 8, 10)))
    client = s3_server.client()
    vae_run = _vae_run(tmp_path / "vae")
    for path in vae_run.rglob("*"):
        if path.is_file():
            key = f"runs/vae/{path.relative_to(vae_run).as_posix()}"
            client.put_object(Bucket=s3_bucket, Key=key, Body=path.read_bytes())
    spec = parse_spec(
        {
            "kind": "train",
            "stage": "ldm",
            "preset": "tiny",
            "data": str(tmp_path / "data"),
            "vae_run": f"s3://{s3_bucket}/runs/vae",
            "encoders": {"tiny-bert": str(write_random_bert(tmp_path / "bert", hidden_size=32))},
            "output": f"s3://{s3_bucket}/runs/ldm",
            # the repository's own ZeRO-2 bf16 config: micro-batch 4, 2 accumulation steps
            "deepspeed_config": str(ROOT / "infra/deepspeed/zero2_bf16.json"),
            "overrides": {"steps": 2, "warmup_steps": 1, "checkpoint_every": 1, "log_every": 1},
            "num_workers": 2,
            "max_failures": 0,
        }
    )
    assert run(spec) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 2, summary

    def read(key: str) -> bytes:
        return client.get_object(Bucket=s3_bucket, Key=f"runs/ldm/{key}")["Body"].read()

    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/ldm/")
    keys = {item["Key"].removeprefix("runs/ldm/") for item in listed.get("Contents", [])}
    # Each rank uploaded its own ZeRO-2 optimizer shard, at every checkpoint.
    for step in (1, 2):
        shards = {k for k in keys if k.startswith(f"checkpoints/step-{step}/") and "optim" in k}
        assert len(shards) == 2 and any("zero_pp_rank_1_" in k for k in shards), keys
        assert f"checkpoints/step-{step}/client.json" in keys
    client_state = json.loads(read("checkpoints/step-2/client.json"))
    assert client_state["step"] == 2 and sorted(client_state["rng"]) == ["0", "1"]  # both ranks

    from safetensors.torch import load

    ema = load(read("checkpoints/step-2/ema.safetensors"))
    assert ema and all(v.isfinite().all() for v in ema.values())
    document = json.loads(read("train_config.json"))
    assert document["world_size"] == 2
    assert document["deepspeed"]["train_batch_size"] == 4 * 2 * 2  # micro x accumulation x ranks
    assert document["deepspeed"]["zero_optimization"]["stage"] == 2
    losses = [json.loads(line)["loss"] for line in read("log.jsonl").decode().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert "encoders/tiny-bert/model.safetensors" in keys
    # The latent cache was streamed into shards beside the run, one sample a volume.
    latents = json.loads(read("latents/index.json"))
    assert latents["count"] == 4 and latents["latent_scale"] > 0, latents
    assert all(f"latents/{shard['file']}" in keys for shard in latents["shards"])
    assert read("loss.png").startswith(b"\x89PNG")

    assert "checkpoints/step-2/mp_rank_00_model_states.pt" in keys  # rank 0's weights
