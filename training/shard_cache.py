"""The diffusion stages' inputs at paper scale: latents and report contexts
of a streamed split, computed on the training device, written as shards.

Contract (for the training stages and the Ray Train integration):

    stream = VolumeStream(root, config, seed=0, spacing="varied", masks=True)
    index = build_latent_shards("s3://bucket/cache", stream, codec, config,
                                encoders_dir=bundle_or_work_dir, views=1)
    data = LatentShards.for_model("s3://bucket/cache", config)   # train_ldm / train_controlnet
    config = dataclasses.replace(config, latent_scale=data.latent_scale)

- Volumes come from DataLoader workers (`num_workers`), one at a time; the
  VAE encoder and the text encoders run on `device` (default: the CUDA
  device when there is one, else the CPU).
- Large volumes are encoded exactly, never by blended tiles: the encoder is
  MAISI's own split convolution (`AutoencoderKlMaisi(num_splits=k)`: every
  convolution runs on k overlapping slabs along one axis, with the halo its
  kernel needs, so the result equals the whole-volume encode to float
  rounding; GroupNorm keeps whole-volume statistics). k is chosen so no
  convolution sees more than `SPLIT_ELEMENTS` elements (cuDNN's 32-bit
  indexing limit, and its workspace, are the reason MAISI splits). MONAI's
  sliding-window inference was measured and refused: each window normalises
  with its own GroupNorm statistics, which moves latents by 11-15 % of their
  standard deviation on average (demo VAE, 128x128x64 phantom, 64^3 windows).
- `views` > 1 encodes every volume that many times, view v at the stream's
  epoch v: with a varied-spacing stream, each view at its own spacing.
- Each sample: `latent` (C, x, y, z, unscaled posterior mean, float32 or
  `latent_dtype`), `context` (2, D: a missing report section is the empty
  condition, `report2ct.condition.section`), `spacing_mm` (3,) (the spacing
  the volume was resampled to), `labels` (18,) signed, and `control`
  (K, x, y, z) float16 mask-class occupancy when `config.control` is set.
  The index carries `latent_scale` (1 / std of every latent value, as
  `training.caches.latent_scale_factor` computes it for the in-memory cache)
  and the skipped volumes with their reasons, and how the stream read the
  volumes (`stream`: split, seed, spacing, spacing range, HU rule), so a
  ControlNet reads each volume's label map at its latent's spacing
  (`training.stages.MaskedLatents`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from torch.utils.data import DataLoader, Dataset

from report2ct.codec import LatentCodec, build_vae, hu_to_unit
from report2ct.config import ModelConfig, VAEConfig
from report2ct.control import class_occupancy, to_class_index
from report2ct.text import TextConditioner
from training.data.shards import ShardError, ShardWriter, read_index, std_from_stats

log = logging.getLogger(__name__)

# The most elements one convolution input may hold before the encoder is
# split: 2^31 is cuDNN's 32-bit indexing limit; a quarter of it keeps the
# workspace of a slab small too.
SPLIT_ELEMENTS = 2**29
# A slab must stay at least this many voxels thick at the deepest level.
MIN_SLAB = 4


def default_device() -> torch.device:
    """The training device: the (current) CUDA device when there is one."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def plan_split(
    config: VAEConfig, shape: tuple[int, int, int], *, max_elements: int = SPLIT_ELEMENTS
) -> tuple[int, int]:
    """(num_splits, spatial axis) for encoding a volume of `shape`: along
    the longest axis, the fewest slabs that keep the largest convolution
    input (the first level's channels x the volume) under `max_elements`;
    (1, 0) when it fits whole. Raises when the slabs would be too thin."""
    largest = config.num_channels[0] * math.prod(shape)
    splits = max(1, math.ceil(largest / max_elements))
    axis = max(range(3), key=lambda a: shape[a])
    deepest = shape[axis] // config.downsample
    if splits > 1 and deepest // splits < MIN_SLAB:
        raise ValueError(
            f"volume {shape}: {splits} slabs along axis {axis} would leave "
            f"{deepest // splits} voxels at the encoder's deepest level (at least {MIN_SLAB}); "
            "raise max_elements or use a smaller volume"
        )
    return splits, axis


def split_encoder(codec: LatentCodec, num_splits: int, axis: int) -> AutoencoderKlMaisi:
    """A copy of `codec.vae` whose convolutions run in `num_splits` slabs
    along spatial `axis` (MAISI's own memory option: same weights, same
    result)."""
    vae = build_vae(codec.config, num_splits=num_splits, dim_split=axis)
    vae.load_state_dict(codec.vae.state_dict())
    return vae.to(next(codec.vae.parameters()).device).eval()


@torch.no_grad()
def encode_volume(
    codec: LatentCodec,
    volume_hu: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    max_elements: int = SPLIT_ELEMENTS,
    encoders: dict[tuple[int, int], AutoencoderKlMaisi] | None = None,
) -> torch.Tensor:
    """One HU volume (1, X, Y, Z) -> its unscaled posterior mean (C, x, y, z)
    on the CPU (float32), encoded on `device`, in slabs when large
    (`plan_split`). `encoders` caches the split copies between calls."""
    device = torch.device(device) if device is not None else default_device()
    codec.vae.to(device).eval()
    splits, axis = plan_split(codec.config, tuple(volume_hu.shape[1:]), max_elements=max_elements)
    if splits == 1:
        vae = codec.vae
    else:
        encoders = {} if encoders is None else encoders
        if (splits, axis) not in encoders:
            encoders[(splits, axis)] = split_encoder(codec, splits, axis)
        vae = encoders[(splits, axis)]
    unit = hu_to_unit(volume_hu[None].to(device=device, dtype=torch.float32))
    mu, _ = vae.encode(unit)
    return mu[0].float().cpu()


def cache_fingerprint(
    stream: Dataset, codec: LatentCodec, config: ModelConfig, *, views: int, latent_dtype
) -> str:
    """What a latent cache was computed from: the stream's volumes and how
    they are read (spacing, seed, shape, masks), the VAE's weights, the text
    encoders, the control legend, the views and the latent dtype. A cache is
    resumed or reused only for the same."""
    digest = hashlib.sha256()
    facts = {
        "names": [record.name for record in getattr(stream, "records", [])] or len(stream),
        "stream": {
            key: getattr(stream, key, None)
            for key in ("root", "split", "seed", "spacing", "spacing_range_mm", "shape", "masks")
        },
        "hu_rule": getattr(stream, "hu_rule", None),
        "vae": dataclasses.asdict(codec.config),
        "encoders": [dataclasses.asdict(spec) for spec in config.encoders],
        "control": None if config.control is None else dataclasses.asdict(config.control),
        "views": views,
        "latent_dtype": str(latent_dtype),
    }
    digest.update(json.dumps(facts, sort_keys=True, default=list).encode())
    for name, tensor in sorted(codec.vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_latent_shards(
    dest: str | Path,
    stream: Dataset,
    codec: LatentCodec,
    config: ModelConfig,
    *,
    encoders_dir: Path | None,
    allow_remote_code: bool = False,
    device: torch.device | str | None = None,
    views: int = 1,
    shard_size: int = 16,
    num_workers: int = 2,
    latent_dtype: torch.dtype = torch.float32,
    max_elements: int = SPLIT_ELEMENTS,
    storage_options: dict[str, Any] | None = None,
    conditioner: TextConditioner | None = None,
) -> dict[str, Any]:
    """Encode every volume of `stream` (a `VolumeStream`; `views` times,
    view v at epoch v) and its report into shards at `dest` (module
    docstring). Skipped volumes (the stream's `errors="skip"`) are listed in
    the index. Resumable: a build that was interrupted continues after the
    shards it finished; a finished cache of the same input (same
    `cache_fingerprint`) is returned as it is, one of other input refused. `conditioner` (default: `config.encoders` loaded from
    `encoders_dir` on `device`) encodes the reports. Returns the index."""
    device = torch.device(device) if device is not None else default_device()
    if conditioner is None:
        conditioner = TextConditioner(
            config.encoders,
            bundle_dir=encoders_dir,
            device=device,
            allow_remote_code=allow_remote_code,
        )
    fingerprint = cache_fingerprint(stream, codec, config, views=views, latent_dtype=latent_dtype)
    try:
        done = read_index(str(dest), storage_options)
    except ShardError:
        done = None
    if done is not None:
        if done.get("fingerprint") != fingerprint:
            raise ShardError(
                f"{dest}: a finished cache of other input is there (another split, VAE, "
                "encoders or spacing): use another destination"
            )
        log.info("latent cache %s: finished already (%d samples)", dest, done["count"])
        return done
    writer = ShardWriter(
        str(dest),
        shard_size=shard_size,
        storage_options=storage_options,
        resume=True,
        fingerprint=fingerprint,
    )
    keys = [(view, i) for view in range(views) for i in range(len(stream))][writer.position :]
    loader = DataLoader(
        stream,
        sampler=keys,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=1 if num_workers else None,
    )
    encoders: dict[tuple[int, int], AutoencoderKlMaisi] = {}
    for item in loader:
        name = item["name"]
        if "skipped" in item:
            writer.skip(name, item["skipped"])
            continue
        latent = encode_volume(
            codec, item["volume"], device=device, max_elements=max_elements, encoders=encoders
        )
        sample = {
            "latent": latent.to(latent_dtype),
            "context": conditioner.encode([item["findings"]], [item["impression"]])[0].cpu(),
            "spacing_mm": item["spacing_mm"].float(),
            "labels": item["labels"].float(),
        }
        if config.control is not None:
            if "mask" not in item:
                raise ValueError(
                    f"{name}: no label map to train a ControlNet on (read the stream "
                    "with masks=True, and give every volume a mask)"
                )
            sample["control"] = class_occupancy(
                to_class_index(item["mask"].numpy(), config.control),
                config.control.num_classes,
                config.vae.downsample,
            ).half()
        writer.add(sample, name=f"{name}@{item['epoch']}")
    if writer.stats["count"]:  # latents were added (some may wait in the last shard)
        std = std_from_stats(writer.stats)
        writer.note(
            latent_scale=float(1.0 / max(std, 1e-6)),
            latent_std=std,
            views=views,
            vae=dataclasses.asdict(codec.config),
            encoders=[spec.name for spec in config.encoders],
            encoder_revisions=list(conditioner.revisions),
            shape=list(config.default_shape),
            # How the volumes were read: a ControlNet reads their label maps the same way.
            stream={
                key: getattr(stream, key, None)
                for key in ("split", "seed", "spacing", "spacing_range_mm", "hu_rule")
            },
        )
    index = writer.close()
    log.info("latent cache %s: %d samples, %d skipped", dest, index["count"], len(index["skipped"]))
    return index
