"""Latent caches at paper scale: shards written to a local directory or S3
read back sample by sample (and whole, by safetensors itself), in DataLoader
workers too; a broken cache is refused naming the file; the split encode
equals the whole-volume encode; a cache built from a streamed split equals
the in-memory cache of the demo path; a blank report section is the empty
condition in training as in generation."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file
from torch.utils.data import DataLoader

from phantom.ctrate_layout import DatasetSpec, write_dataset
from report2ct.bundle import load_bundle
from report2ct.codec import LatentCodec, hu_to_unit
from report2ct.condition import empty
from report2ct.config import ControlConfig, preset
from report2ct.denoiser import Denoiser
from report2ct.pipeline import VolumeRequest, _condition
from training.caches import latent_text_cache
from training.data.ctrate import CTRateDataset
from training.data.shards import (
    INDEX,
    LatentShards,
    ShardError,
    ShardSet,
    ShardWriter,
    read_index,
    std_from_stats,
)
from training.data.stream import VolumeStream
from training.data.volumes import load_volumes
from training.shard_cache import SPLIT_ELEMENTS, build_latent_shards, encode_volume, plan_split
from training.stages import LatentSet, LDMLoss


def samples(n: int = 7) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "latent": torch.randn(4, 3, 3, 2, generator=g),
            "context": torch.randn(2, 5, generator=g).half(),
            "spacing_mm": torch.rand(3, generator=g).bfloat16(),
            "control": torch.randint(0, 255, (2, 3, 3, 2), generator=g, dtype=torch.uint8),
        }
        for _ in range(n)
    ]


def write(dest: str, rows, **options) -> dict:
    with ShardWriter(dest, shard_size=3, **options) as writer:
        for i, row in enumerate(rows):
            writer.add(row, name=f"v{i}")
        writer.skip("bad.nii.gz", "not a chest CT")
        writer.note(latent_scale=2.0)
    return writer.index


def check_round_trip(dest: str, rows, read_shard) -> None:
    index = read_index(dest)
    assert index["count"] == 7 and [s["count"] for s in index["shards"]] == [3, 3, 1]
    assert index["skipped"] == [{"name": "bad.nii.gz", "reason": "not a chest CT"}]
    data = ShardSet(dest)
    for i, row in enumerate(rows):
        item = data[i]
        assert data.name(i) == f"v{i}"
        assert set(item) == set(row)
        for key, value in row.items():
            assert item[key].dtype == value.dtype and torch.equal(item[key], value)
    # The shards as safetensors reads them, whole.
    for number, shard in enumerate(index["shards"]):
        whole = read_shard(shard["file"])
        for key in rows[0]:
            expected = torch.stack([r[key] for r in rows[3 * number : 3 * number + 3]])
            assert torch.equal(whole[key], expected)
    latents = torch.stack([r["latent"] for r in rows]).double()
    assert std_from_stats(index["stats"]["latent"]) == pytest.approx(float(latents.std()))
    scaled = LatentShards(dest, columns=("latent", "spacing_mm"))
    assert set(scaled[4]) == {"latent", "spacing_mm"}
    assert torch.equal(scaled[4]["latent"], rows[4]["latent"] * 2.0)
    # In two DataLoader workers (each opens its own file system).
    loader = DataLoader(data, batch_size=2, num_workers=2)
    batches = list(loader)
    assert torch.equal(
        torch.cat([b["control"] for b in batches]), torch.stack([r["control"] for r in rows])
    )


def test_shards_round_trip_in_a_local_directory(tmp_path):
    rows = samples()
    dest = str(tmp_path / "cache")
    write(dest, rows)
    check_round_trip(dest, rows, lambda file: load_file(tmp_path / "cache" / file))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        INDEX,
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]


def test_broken_caches_are_refused_naming_the_file(tmp_path):
    rows = samples()
    dest = tmp_path / "cache"
    write(str(dest), rows)
    with pytest.raises(ShardError, match="finished cache is there already"):
        ShardWriter(str(dest))
    writer = ShardWriter(str(tmp_path / "other"))
    writer.add(rows[0], name="v0")
    with pytest.raises(ShardError, match="v3: columns"):
        writer.add({**rows[3], "latent": torch.zeros(4, 3, 3, 3)}, name="v3")
    with pytest.raises(ShardError, match="no column 'labels'"):
        ShardSet(str(dest), columns=("latent", "labels"))
    shard = dest / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ShardError, match=r"shard-00002\.safetensors: column"):
        ShardSet(str(dest))[6]
    shard.unlink()
    with pytest.raises(ShardError, match=r"shard-00002\.safetensors: shard missing"):
        ShardSet(str(dest))[6]
    (dest / INDEX).unlink()
    with pytest.raises(ShardError, match=r"no index\.json"):
        ShardSet(str(dest))


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """A phantom split whose second report has no IMPRESSION (a blank cell)."""
    root = tmp_path_factory.mktemp("shards") / "ctrate"
    write_dataset(root, DatasetSpec(n=4, seed=7, shape=(40, 40, 20), spacing_mm=(7.0, 7.0, 9.0)))
    reports = root / "radiology_text_reports" / "train_reports.csv"
    with reports.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[1]["Impressions_EN"] = ""
    with reports.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.mark.integration
def test_shards_and_a_split_round_trip_through_s3(s3_server, s3_bucket, split):
    rows = samples()
    dest = f"s3://{s3_bucket}/cache"
    write(dest, rows)
    client = s3_server.client()
    check_round_trip(
        dest,
        rows,
        lambda file: load(client.get_object(Bucket=s3_bucket, Key=f"cache/{file}")["Body"].read()),
    )
    # The split itself, read volume by volume from S3, equals the local read.
    for path in split.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), s3_bucket, f"ctrate/{path.relative_to(split)}")
    config = preset("tiny")
    remote = VolumeStream(f"s3://{s3_bucket}/ctrate", config, seed=2, masks=True)
    local = VolumeStream(split, config, seed=2, masks=True)
    assert [r.name for r in remote.records] == [r.name for r in local.records]
    loader = DataLoader(remote, sampler=[(1, i) for i in range(len(remote))], num_workers=2)
    for i, batch in enumerate(loader):
        reference = local[(1, i)]
        assert torch.equal(batch["volume"][0], reference["volume"])
        assert torch.equal(batch["mask"][0], reference["mask"])
        assert torch.equal(batch["spacing_mm"][0], reference["spacing_mm"])


def test_split_encode_equals_the_whole_volume_encode(split):
    config = preset("tiny")
    torch.manual_seed(0)
    codec = LatentCodec(config.vae).eval()
    shape = (64, 64, 32)
    volume = CTRateDataset(split, target_spacing_mm=(4.375, 4.375, 5.625), target_shape=shape)[0][
        "volume"
    ]
    with torch.no_grad():
        whole = codec.vae.encode(hu_to_unit(volume[None]))[0][0]
    budget = config.vae.num_channels[0] * 64 * 64 * 32 // 4
    assert plan_split(config.vae, shape, max_elements=budget) == (4, 0)
    split_latent = encode_volume(codec, volume, device="cpu", max_elements=budget)
    error = float((split_latent - whole).abs().max() / whole.std())
    assert error < 1e-5, error  # float rounding (measured 1.5e-6 on the demo VAE)
    # At the paper's size: 8 slabs along x, each convolution input under the limit.
    paper = preset("paper").vae
    splits, axis = plan_split(paper, (480, 480, 256))
    assert (splits, axis) == (8, 0)
    assert paper.num_channels[0] * (480 // splits) * 480 * 256 <= SPLIT_ELEMENTS
    with pytest.raises(ValueError, match="voxels at the encoder's deepest level"):
        plan_split(config.vae, (16, 16, 16), max_elements=64)


def test_a_streamed_cache_equals_the_in_memory_cache_and_blank_sections_are_empty(
    split, tiny_mask_bundle, tmp_path
):
    model = load_bundle(tiny_mask_bundle)
    config, codec = model.config, model.codec
    # The demo path: whole split in memory, one cache file.
    volumes, conditions = load_volumes(split, config, masks=True)
    assert conditions[1].impression == ""
    cached, scale = latent_text_cache(
        tmp_path / "cache.safetensors",
        codec,
        config,
        volumes,
        conditions,
        encoders_dir=tiny_mask_bundle,
    )
    reference = LatentSet.from_cache(cached, conditions, config)
    # The paper path: streamed, encoded on the training device, sharded.
    stream = VolumeStream(split, config, spacing="fixed", masks=True)
    index = build_latent_shards(
        str(tmp_path / "shards"),
        stream,
        codec,
        config,
        encoders_dir=tiny_mask_bundle,
        conditioner=model.conditioner,
        shard_size=3,
        num_workers=2,
        device="cpu",
    )
    assert index["count"] == 4 and len(index["shards"]) == 2
    shards = LatentShards.for_model(str(tmp_path / "shards"), config)
    assert shards.latent_scale == pytest.approx(scale, rel=1e-5)
    for i in range(4):
        got, want = shards[i], reference[i]
        assert set(got) == set(want) == {"latent", "context", "spacing_mm", "labels", "control"}
        assert torch.allclose(got["latent"], want["latent"], atol=1e-4)  # batch of 4 vs 1
        assert torch.allclose(got["context"], want["context"], atol=1e-5)
        for key in ("spacing_mm", "labels", "control"):
            assert torch.equal(got[key], want[key])
    # The blank IMPRESSION is the empty condition's token, as at generation.
    assert torch.equal(shards[1]["context"][1], empty(config.context_dim))
    request = VolumeRequest(seed=0, findings=conditions[1].findings, impression=None)
    generation = _condition(model, [request], config.default_shape, [config.default_spacing_mm])
    assert torch.allclose(generation.context[0], shards[1]["context"], atol=1e-5)
    assert torch.allclose(
        model.conditioner.encode(["  ", None], ["", "\n"]), model.conditioner.null_context(2)
    )
    # The streamed cache feeds the diffusion stages' loss as the in-memory one does.
    torch.manual_seed(0)
    denoiser, loss = Denoiser.for_model(config), LDMLoss.for_model(config)

    def loss_on(data) -> torch.Tensor:
        batch = next(iter(DataLoader(data, batch_size=2, num_workers=0)))
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        return loss(denoiser, batch, generators).detach()

    streamed = loss_on(shards)
    assert torch.isfinite(streamed)
    assert float(streamed) == pytest.approx(float(loss_on(reference)), rel=1e-3)


class FailingStream(VolumeStream):
    """The stream as it is, until a planted failure: reading index `fail_at`
    raises, as a node lost mid-build would stop the build. Logs each read."""

    fail_at: int | None = None
    reads: list[int]

    def _item(self, record, epoch, index):
        if index == self.fail_at:
            raise RuntimeError(f"planted failure at {index}")
        self.reads.append(index)
        return super()._item(record, epoch, index)


def failing(split, config, fail_at):
    stream = FailingStream(split, config, seed=1)
    stream.fail_at, stream.reads = fail_at, []
    return stream


def test_an_interrupted_cache_build_resumes_after_its_finished_shards(split, tiny_bundle, tmp_path):
    model = load_bundle(tiny_bundle)
    config, codec = model.config, model.codec
    options = dict(
        encoders_dir=tiny_bundle,
        conditioner=model.conditioner,
        shard_size=2,
        num_workers=0,
        device="cpu",
    )
    whole = build_latent_shards(
        str(tmp_path / "whole"), failing(split, config, None), codec, config, **options
    )
    dest = str(tmp_path / "resumed")
    first = failing(split, config, 3)
    with pytest.raises(RuntimeError, match="planted failure at 3"):
        build_latent_shards(dest, first, codec, config, **options)
    assert first.reads == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["shard-00000.safetensors"]
    again = failing(split, config, None)
    resumed = build_latent_shards(dest, again, codec, config, **options)
    assert again.reads == [2, 3]  # shard 0 (volumes 0, 1) was kept
    assert resumed["count"] == whole["count"] == 4
    assert resumed["latent_scale"] == whole["latent_scale"]
    a, b = ShardSet(dest), ShardSet(str(tmp_path / "whole"))
    for i in range(4):
        assert a.name(i) == b.name(i)
        for key, value in a[i].items():
            assert torch.equal(value, b[i][key])
    # Finished: returned as it is, nothing read; another VAE is refused.
    untouched = failing(split, config, 0)
    assert build_latent_shards(dest, untouched, codec, config, **options) == resumed
    other = LatentCodec(config.vae)
    with pytest.raises(ShardError, match="finished cache of other input"):
        build_latent_shards(dest, untouched, other, config, **options)
    # Read for a model it does not fit: refused, saying why.
    with pytest.raises(ShardError, match="no mask occupancy"):
        LatentShards.for_model(
            dest, dataclasses.replace(config, control=ControlConfig(legend=((1, "lung"),)))
        )
    with pytest.raises(ShardError, match="context is"):
        LatentShards.for_model(dest, preset("demo"))
