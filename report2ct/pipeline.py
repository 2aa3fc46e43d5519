"""The model as one object, and the one sampling entry point.

    model = load_bundle("bundles/demo")
    result = generate(model, findings=[...], impressions=[...],
                      spacings_mm=[(4, 4, 5)], seeds=[7], precision="bf16")
    result.volumes_hu  # (B, X, Y, Z) int16 HU, RAS+ axes

`generate` = text encoding (cached) -> per-sample noise -> guided sampling of
latents under autocast -> decode (tiled when large) -> int16 HU.
A record may give its report, its CT-RATE labels, or both (when the model has
the label condition), and a label map on the output grid (when the model has
a ControlNet): `labels=[{"Pleural effusion": 1}]`, `masks=[label_map]`.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from report2ct.codec import LatentCodec
from report2ct.config import ModelConfig, Shape, Spacing
from report2ct.control import MaskError, class_occupancy, to_class_index
from report2ct.denoiser import Denoiser
from report2ct.flow import SAMPLERS, Condition, linear_times, shifted_times
from report2ct.labels import signed_labels
from report2ct.rng import per_sample_randn
from report2ct.text import TextConditioner

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"ct-factory {version('ct-factory')}"
    except PackageNotFoundError:
        return "ct-factory (not installed)"


class Report2CT(nn.Module):
    """Text conditioner + latent codec + denoiser, built from a ModelConfig."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        bundle_dir: Path | None = None,
        bundle_sha256: str | None = None,
        device: torch.device | str = "cpu",
        allow_remote_code: bool = False,
        with_text: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.bundle_dir = bundle_dir
        self.bundle_sha256 = bundle_sha256
        self.codec = LatentCodec(config.vae, latent_scale=config.latent_scale)
        self.denoiser = Denoiser.for_model(config)
        self.to(device)
        self.conditioner = (
            TextConditioner(
                config.encoders,
                bundle_dir=bundle_dir,
                device=device,
                allow_remote_code=allow_remote_code,
            )
            if with_text
            else None
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def weight_modules(self) -> dict[str, nn.Module]:
        """The modules a bundle stores, by weight-file name (the UNet alone in
        `denoiser`, keyed as MAISI's checkpoints are)."""
        return weight_modules(self.codec, self.denoiser)

    def provenance(self) -> dict[str, Any]:
        """Facts about the model that go into every output's provenance."""
        conditioner = self.conditioner
        return {
            "bundle_sha256": self.bundle_sha256,
            "config": self.config.to_dict(),
            "encoders": [
                {"name": spec.name, "source": spec.source, "revision": revision}
                for spec, revision in zip(
                    self.config.encoders,
                    conditioner.revisions if conditioner else ["-"] * len(self.config.encoders),
                    strict=True,
                )
            ],
            "code_version": code_version(),
        }


def weight_modules(codec: LatentCodec, denoiser: Denoiser) -> dict[str, nn.Module]:
    modules = {"vae": codec.vae, "denoiser": denoiser.unet}
    if denoiser.label_embedding is not None:
        modules["label_embedding"] = denoiser.label_embedding
    if denoiser.controlnet is not None:
        modules["controlnet"] = denoiser.controlnet
    return modules


@dataclass
class GenerationResult:
    volumes_hu: np.ndarray  # (B, X, Y, Z) int16
    timings_s: dict[str, float]  # text, sample, decode
    shape: Shape
    spacings_mm: list[Spacing]
    seeds: list[int]
    sampler: dict[str, Any] = field(default_factory=dict)


def autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def schedule(config: ModelConfig, num_steps: int, latent_shape: Sequence[int]) -> torch.Tensor:
    if config.sampler.timestep_transform:
        return shifted_times(
            num_steps,
            latent_numel=int(np.prod(latent_shape[1:])),
            base_latent_numel=config.sampler.base_latent_numel,
            num_train_timesteps=config.num_train_timesteps,
        )
    return linear_times(num_steps)


@torch.inference_mode()
def generate(
    model: Report2CT,
    *,
    findings: Sequence[str | None],
    impressions: Sequence[str | None],
    spacings_mm: Sequence[Spacing],
    seeds: Sequence[int],
    shape: Shape | None = None,
    guidance_scale: float | None = None,
    num_steps: int | None = None,
    precision: str = "bf16",
    labels: Sequence[Mapping[str, int] | None] | None = None,
    masks: Sequence[np.ndarray] | None = None,
    mask_mappings: Sequence[Mapping[int, str] | None] | None = None,
    method: str | None = None,
    decode_tile_latent: int = 32,
) -> GenerationResult:
    """Sample one HU volume per report. Each volume depends only on the
    model, its own report (None: no such section), labels ({name: 0/1},
    names not given left to the model), mask, spacing and seed (not on the
    batch). `masks` are (X, Y, Z) integer label maps on the output grid, in
    the model's legend or in one `mask_mappings` declares."""
    config = model.config
    batch = len(findings)
    if not (len(impressions) == len(spacings_mm) == len(seeds) == batch) or batch == 0:
        raise ValueError("findings, impressions, spacings_mm and seeds need one entry per volume")
    shape = tuple(shape or config.default_shape)
    for spacing in spacings_mm:
        config.check_output(shape, tuple(spacing))
    label_rows = [signed_labels(row) for row in (labels or [None] * batch)]
    if len(label_rows) != batch:
        raise ValueError("labels need one entry per volume")
    if any(any(row) for row in label_rows) and not config.label_condition:
        raise ValueError(f"model {config.name!r} has no label condition: ask by text")
    for i, (finding, impression, row) in enumerate(
        zip(findings, impressions, label_rows, strict=True)
    ):
        if finding is None and impression is None and not any(row):
            raise ValueError(f"volume {i}: neither a report nor labels to generate from")
    control = _control(config, masks, mask_mappings, shape, batch)
    guidance_scale = config.sampler.guidance_scale if guidance_scale is None else guidance_scale
    num_steps = num_steps or config.sampler.num_steps
    method = method or config.sampler.method
    device = model.device
    timings: dict[str, float] = {}

    start = time.perf_counter()
    if model.conditioner is None:
        raise RuntimeError("this Report2CT was built without text encoders")
    context = model.conditioner.encode(list(findings), list(impressions)).to(device)  # (B, 2, D)
    cond = Condition(
        context=context,
        null_context=model.conditioner.null_context(batch).to(device),
        spacing_mm=torch.tensor(spacings_mm, dtype=torch.float32, device=device),  # (B, 3)
        labels=torch.tensor(label_rows, device=device) if config.label_condition else None,
        control=None if control is None else control.to(device),
    )
    timings["text"] = time.perf_counter() - start

    start = time.perf_counter()
    latent_shape = config.latent_shape(shape)  # (C, x, y, z)
    noise = per_sample_randn(latent_shape, seeds, device=device)  # (B, C, x, y, z)
    times = schedule(config, num_steps, latent_shape)
    with autocast(device, precision):
        latents = SAMPLERS[method](
            model.denoiser, noise, cond, times, guidance_scale=guidance_scale
        )
    timings["sample"] = time.perf_counter() - start

    start = time.perf_counter()
    volumes = np.empty((batch, *shape), dtype=np.int16)
    tiled = max(latent_shape[1:]) > decode_tile_latent
    with autocast(device, precision):
        for i in range(batch):  # one at a time: bounded memory, batch-independent numerics
            latent = latents[i : i + 1]
            hu = (
                model.codec.decode_tiled(latent, tile_latent=decode_tile_latent)
                if tiled
                else model.codec.decode(latent)
            )
            volumes[i] = hu[0, 0].float().round().clamp(-32768, 32767).to(torch.int16).cpu().numpy()
    timings["decode"] = time.perf_counter() - start

    return GenerationResult(
        volumes_hu=volumes,
        timings_s=timings,
        shape=shape,
        spacings_mm=[tuple(float(v) for v in s) for s in spacings_mm],
        seeds=[int(s) for s in seeds],
        sampler={
            "method": method,
            "num_steps": num_steps,
            "guidance_scale": guidance_scale,
            "precision": precision,
            "timestep_transform": config.sampler.timestep_transform,
            "device": str(device),
            "host": socket.gethostname(),
        },
    )


def _control(config, masks, mappings, shape, batch) -> torch.Tensor | None:
    """(B, K, x, y, z) mask-class occupancy, or None without masks."""
    if masks is None:
        return None
    if config.control is None:
        raise ValueError(f"model {config.name!r} has no mask condition (no ControlNet)")
    if len(masks) != batch:
        raise ValueError("masks need one label map per volume")
    mappings = mappings or [None] * batch
    out = []
    for i, (mask, mapping) in enumerate(zip(masks, mappings, strict=True)):
        if tuple(mask.shape) != tuple(shape):
            raise MaskError(f"volume {i}: mask shape {tuple(mask.shape)} is not the output {shape}")
        index = to_class_index(np.asarray(mask), config.control, mapping)
        out.append(class_occupancy(index, config.control.num_classes, config.vae.downsample))
    return torch.stack(out)
