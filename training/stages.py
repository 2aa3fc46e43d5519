"""The two training stages, one shape: (module, loss, data) -> engine.train.

- VAE: `AutoencoderKlMaisi` on random crops of HU volumes (the VAE is fully
  convolutional: crops make the CPU stage affordable), L1 reconstruction in
  the [0, 1] HU window + a small KL term. (MAISI adds perceptual and
  adversarial terms; they are left out here, where the VAE is the costly
  stage on CPU.)
- LDM: the denoiser on *cached* latents and *cached* report contexts
  (computed once by `training.caches`), rectified-flow loss with condition
  dropout; the VAE encoder and the text encoders never run per step. The
  label token (when the config has it) trains here, with the UNet.
- ControlNet: MAISI's recipe: the trained UNet (and label token) frozen, a
  `ControlNetMaisi` copied from its encoder learns to follow the label maps
  of the same volumes, with the same loss.

Data: in memory for the demo recipe (`load_volumes`, `latent_text_cache`,
`LatentSet.from_cache`); streamed for the `train` stage runs
(`training.runs`), with the same items: `training.data.stream.VolumeCrops`
for the VAE, a shard cache (`training.shard_cache.build_latent_shards`, read
by `training.data.shards.LatentShards.for_model`) for the LDM, and those
shards with each volume's label map (`MaskedLatents`) for the ControlNet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from report2ct.codec import LatentCodec, hu_to_unit
from report2ct.config import ModelConfig
from report2ct.control import class_occupancy, to_class_index
from report2ct.denoiser import Denoiser
from report2ct.loss import RectifiedFlowLoss
from training.data.volumes import VolumeConditions
from training.engine import TrainConfig, TrainResult, compute_dtype, train


class RandomCrops(Dataset):
    """Deterministic random crops: crop i of volume (i mod N) at an offset
    drawn from (seed, i), so the data stream is resumable."""

    def __init__(
        self,
        volumes: torch.Tensor,
        crop: tuple[int, int, int],
        *,
        seed: int = 0,
        crops_per_volume: int = 8,
    ):
        self.volumes, self.crop, self.seed, self.k = (
            volumes,
            crop,
            seed,
            crops_per_volume,
        )  # volumes (N,1,X,Y,Z) HU

    def __len__(self) -> int:
        return len(self.volumes) * self.k

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        volume = self.volumes[index % len(self.volumes)]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = [
            int(torch.randint(0, n - c + 1, (1,), generator=generator))
            for n, c in zip(volume.shape[1:], self.crop, strict=True)
        ]
        x, y, z = starts
        cx, cy, cz = self.crop
        return {"hu": volume[:, x : x + cx, y : y + cy, z : z + cz]}


class VAELoss:
    def __init__(self, kl_weight: float = 1e-6):
        self.kl_weight = kl_weight

    def __call__(self, engine, batch, generators) -> torch.Tensor:
        dtype = compute_dtype(engine)  # bf16 under DeepSpeed's bf16
        unit = hu_to_unit(batch["hu"].float()).to(dtype)
        # MAISI's group norm returns fp32 whatever its input: autocast keeps
        # the next convolution in the engine's dtype.
        with torch.autocast(
            device_type=unit.device.type, dtype=dtype, enabled=dtype != torch.float32
        ):
            reconstruction, mu, sigma = engine(unit)
        l1 = (reconstruction.float() - unit.float()).abs().mean()
        kl = (
            0.5
            * (
                mu.float() ** 2 + sigma.float() ** 2 - torch.log(sigma.float() ** 2 + 1e-8) - 1
            ).mean()
        )
        return l1 + self.kl_weight * kl


def train_vae(
    config: ModelConfig,
    volumes_hu: torch.Tensor | Dataset,
    train_config: TrainConfig,
    out_dir: Path,
    *,
    crop: tuple[int, int, int] = (32, 32, 32),
    **kwargs,
) -> tuple[LatentCodec, TrainResult]:
    """The VAE on random crops: of in-memory HU volumes (N, 1, X, Y, Z), or
    of a data set that gives crops itself ({"hu": (1, cx, cy, cz)}: e.g.
    `training.data.stream.VolumeCrops` over a streamed split)."""
    codec = LatentCodec(config.vae)
    if isinstance(volumes_hu, torch.Tensor):
        data = RandomCrops(volumes_hu, crop, seed=train_config.seed)
    else:
        data = volumes_hu
    result = train(codec.vae, VAELoss(), data, train_config, out_dir, **{"name": "vae", **kwargs})
    codec.vae.float().load_state_dict(result.ema)  # DeepSpeed cast it to bf16; EMA is fp32
    return codec, result


class LatentSet(Dataset):
    """Cached (latent, context, spacing) triples, with each volume's signed
    labels (N, 18) and mask-class occupancy (N, K, x, y, z) when the stage
    trains those conditions."""

    def __init__(
        self,
        latents: torch.Tensor,
        contexts: torch.Tensor,
        spacings: torch.Tensor,
        labels: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
    ):
        self.columns = {"latent": latents, "context": contexts, "spacing_mm": spacings}
        if labels is not None:
            self.columns["labels"] = labels
        if control is not None:
            self.columns["control"] = control

    @classmethod
    def from_cache(
        cls,
        cached: dict[str, torch.Tensor],
        records: Sequence[VolumeConditions],
        config: ModelConfig,
    ) -> LatentSet:
        """The diffusion stages' data: a latent cache (`training.caches`,
        latents already scaled), the records' labels when the config has the
        label condition, and each record's mask occupancy (float16: K classes
        at latent size) when it has a ControlNet."""
        labels = torch.tensor([r.labels for r in records]) if config.label_condition else None
        control = None
        if config.control is not None:
            missing = [i for i, r in enumerate(records) if r.mask is None]
            if missing:
                raise ValueError(
                    f"volumes {missing[:5]} have no label map to train a ControlNet on"
                )
            control = torch.stack(
                [
                    class_occupancy(
                        to_class_index(r.mask, config.control),
                        config.control.num_classes,
                        config.vae.downsample,
                    ).half()
                    for r in records
                ]
            )
        return cls(cached["latents"], cached["contexts"], cached["spacings"], labels, control)

    def __len__(self) -> int:
        return len(self.columns["latent"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: column[index] for name, column in self.columns.items()}


class MaskedLatents(Dataset):
    """The ControlNet stage's data at paper scale: a latent shard cache
    (`training.data.shards.LatentShards`, read without control) with each
    sample's mask-class occupancy (float16, K classes at latent size) from
    its volume's label map, read from the data set volume by volume. Sample
    i, named "<volume>@<epoch>" by `training.shard_cache.build_latent_shards`,
    reads its label map from `stream` (masks=True, read as the cache's stream
    was: same seed and spacing) at that epoch, so at the spacing its latent
    was encoded at; a spacing that differs is refused, as is a volume that is
    not in the stream or has no label map."""

    def __init__(self, shards: Dataset, stream: Dataset, config: ModelConfig) -> None:
        if config.control is None:
            raise ValueError("config has no control (ControlConfig): no mask classes to read")
        if not getattr(stream, "masks", False):
            raise ValueError("the stream must read the label maps (masks=True)")
        self.shards, self.stream, self.config = shards, stream, config
        self.columns = (*shards.columns, "control")
        positions = {record.name: i for i, record in enumerate(stream.records)}
        self.keys: list[tuple[int, int]] = []
        for i in range(len(shards)):
            name, _, epoch = shards.name(i).rpartition("@")
            if name not in positions:
                raise ValueError(
                    f"{name}: in the latent cache {shards.source} but not in the data set "
                    f"{stream.root}: give the data set the LDM run was trained on"
                )
            self.keys.append((int(epoch), positions[name]))
        missing = [stream.records[i].name for _, i in self.keys if not stream.records[i].has_mask]
        if missing:
            raise ValueError(
                f"volumes {missing[:5]} have no label map (masks/) to train a ControlNet on"
            )

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.shards[index]
        read = self.stream[self.keys[index]]
        if not torch.equal(read["spacing_mm"].float(), item["spacing_mm"].float()):
            raise ValueError(
                f"{read['name']}: its label map reads at {read['spacing_mm'].tolist()} mm, its "
                f"latent was encoded at {item['spacing_mm'].tolist()} mm: the stream is not "
                "read as the latent cache's was (seed, spacing)"
            )
        control = self.config.control
        item["control"] = class_occupancy(
            to_class_index(read["mask"].numpy(), control),
            control.num_classes,
            self.config.vae.downsample,
        ).half()
        return item


class LDMLoss:
    def __init__(self, cond_dropout: float, label_dropout: float = 0.5):
        self.loss = RectifiedFlowLoss(cond_dropout=cond_dropout, label_dropout=label_dropout)

    @classmethod
    def for_model(cls, config: ModelConfig) -> LDMLoss:
        return cls(config.cond_dropout, config.label_dropout)

    def __call__(self, engine, batch, generators) -> torch.Tensor:
        # Each sample draws its noise from its own generator (one batched
        # forward still), so its noise does not depend on how the global
        # batch is split over ranks.
        return self.loss(
            engine,
            batch["latent"],
            batch["context"],
            batch["spacing_mm"],
            labels=batch.get("labels"),
            control=batch.get("control"),
            generator=generators,
        )


def train_ldm(
    config: ModelConfig, data: LatentSet, train_config: TrainConfig, out_dir: Path, **kwargs
) -> tuple[Denoiser, TrainResult]:
    """The denoiser (UNet, and the label token when the config has one).
    `data` is a `LatentSet` or any data set with its items, e.g.
    `training.data.shards.LatentShards.for_model(cache, config)` streamed
    from a shard cache (`training.shard_cache`)."""
    denoiser = Denoiser.for_model(dataclasses.replace(config, control=None))
    loss = LDMLoss.for_model(config)
    result = train(denoiser, loss, data, train_config, out_dir, **{"name": "ldm", **kwargs})
    denoiser.float().load_state_dict(result.ema)
    return denoiser, result


def train_controlnet(
    config: ModelConfig,
    trained: Denoiser,
    data: LatentSet,
    train_config: TrainConfig,
    out_dir: Path,
    *,
    loss_fn=None,
    **kwargs,
) -> tuple[Denoiser, TrainResult]:
    """The ControlNet branch of `config.control` on top of a trained
    denoiser, which stays frozen (its fp32 weights are kept: DeepSpeed's bf16
    copy of them is never exported). `loss_fn` defaults to the LDM's loss."""
    if config.control is None:
        raise ValueError("config has no control (ControlConfig): nothing to train")
    if "control" not in data.columns:
        raise ValueError("the data set has no masks (control occupancy) to train on")
    frozen = {k: v.detach().float().clone() for k, v in trained.state_dict().items()}
    denoiser = Denoiser.for_model(config)
    denoiser.load_state_dict(frozen, strict=False)
    denoiser.init_controlnet_from_unet()
    denoiser.unet.requires_grad_(False)
    if denoiser.label_embedding is not None:
        denoiser.label_embedding.requires_grad_(False)
    loss_fn = loss_fn or LDMLoss.for_model(config)
    kwargs = {"name": "controlnet", **kwargs}
    result = train(denoiser, loss_fn, data, train_config, out_dir, **kwargs)
    denoiser = Denoiser.for_model(config)
    denoiser.load_state_dict({**result.ema, **frozen})
    return denoiser, result
