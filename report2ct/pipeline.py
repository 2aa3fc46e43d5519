"""The model as one object, and the one sampling entry point.

    model = load_bundle("bundles/demo")
    result = generate(model, [VolumeRequest(seed=7, findings="...", impression="...",
                                            spacing_mm=(4, 4, 5))], precision="bf16")
    result.volumes_hu  # (B, X, Y, Z) int16 HU, RAS+ axes

`generate` = text encoding (cached) -> per-sample noise -> guided sampling of
latents under autocast -> decode (tiled when large, by the codec) -> int16 HU.
It is `draw` (the device's part) then `Drawn.finish` (int16 HU on the host),
for callers that overlap the two (the factory's worker).
A request may give its report, its CT-RATE labels, or both (when the model
has the label condition), and a label map on the output grid (when the model
has a ControlNet): `VolumeRequest(..., labels={"Pleural effusion": 1},
mask=label_map)`.
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
from report2ct.condition import Condition
from report2ct.config import PRECISIONS, ModelConfig, Precision, SamplerMethod, Shape, Spacing
from report2ct.control import MaskError, class_occupancy, to_class_index
from report2ct.denoiser import Denoiser
from report2ct.flow import SAMPLERS, linear_times, shifted_times
from report2ct.labels import signed_labels
from report2ct.rng import per_sample_randn
from report2ct.text import TextConditioner

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


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


@dataclass(frozen=True, eq=False)
class VolumeRequest:
    """One volume to sample. It depends only on the model and these fields,
    never on the batch it rides in.

    A request asks by its report (a missing section is None), by CT-RATE
    labels ({name: 0/1}; names not given are left to the model), or both,
    and optionally follows a label map on the output grid (`mask`, (X, Y, Z)
    integers in the model's legend, or in one `mask_mapping` declares).
    `spacing_mm` None is the model's default spacing."""

    seed: int
    findings: str | None = None
    impression: str | None = None
    labels: Mapping[str, int] | None = None
    spacing_mm: Spacing | None = None
    mask: np.ndarray | None = None
    mask_mapping: Mapping[int, str] | None = None
    # The mask as class indices 0..K, when the caller has mapped it already
    # (the factory does, once per record): generate() then skips the mapping.
    mask_index: np.ndarray | None = None

    def spacing(self, config: ModelConfig) -> Spacing:
        return tuple(float(v) for v in (self.spacing_mm or config.default_spacing_mm))


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample; None takes the bundle's default (config.sampler)."""

    num_steps: int | None = None
    guidance_scale: float | None = None
    precision: Precision = "bf16"
    method: SamplerMethod | None = None


@dataclass
class GenerationResult:
    volumes_hu: np.ndarray  # (B, X, Y, Z) int16
    timings_s: dict[str, float]  # text, sample, decode (on the device), host (to int16 there)
    shape: Shape
    spacings_mm: list[Spacing]
    seeds: list[int]
    sampler: dict[str, Any] = field(default_factory=dict)


class NonFiniteOutput(ValueError):
    """The model produced NaN or Inf: the volumes would be meaningless (a
    model whose training diverged), so they are refused, never cast to 0 HU."""


def autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = AUTOCAST_DTYPES[precision]
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


@dataclass
class Drawn:
    """Volumes as the device decoded them (float HU, still on the device):
    what `draw` returns while it holds the accelerator. `finish()` does the
    rest (finiteness check, rounding to int16, the copy to the host), so a
    caller that pipelines can run it while the next batch samples."""

    decoded: list[torch.Tensor]  # per volume (X, Y, Z) float HU, on the model's device
    timings_s: dict[str, float]  # text, sample, decode
    shape: Shape
    spacings_mm: list[Spacing]
    seeds: list[int]
    sampler: dict[str, Any] = field(default_factory=dict)

    @torch.inference_mode()
    def finish(self) -> GenerationResult:
        """The int16 HU volumes on the host; NonFiniteOutput names any
        volume the model turned to NaN/Inf."""
        start = time.perf_counter()
        volumes = np.empty((len(self.decoded), *self.shape), dtype=np.int16)
        for i, hu in enumerate(self.decoded):
            _check_finite(hu[None], "decoded volume", first_index=i)
            # The codec keeps HU inside its window, well within int16.
            volumes[i] = hu.round().to(torch.int16).cpu().numpy()
        self.decoded = []  # the device memory goes with the last reference
        return GenerationResult(
            volumes_hu=volumes,
            timings_s={**self.timings_s, "host": time.perf_counter() - start},
            shape=self.shape,
            spacings_mm=self.spacings_mm,
            seeds=self.seeds,
            sampler=self.sampler,
        )


def generate(
    model: Report2CT,
    requests: Sequence[VolumeRequest],
    *,
    shape: Shape | None = None,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    precision: Precision = "bf16",
    method: SamplerMethod | None = None,
) -> GenerationResult:
    """Sample one int16 HU volume of `shape` (default: the model's) per
    request. Steps, guidance and method default to the bundle's sampler."""
    return draw(
        model,
        requests,
        shape=shape,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        precision=precision,
        method=method,
    ).finish()


@torch.inference_mode()
def draw(
    model: Report2CT,
    requests: Sequence[VolumeRequest],
    *,
    shape: Shape | None = None,
    num_steps: int | None = None,
    guidance_scale: float | None = None,
    precision: Precision = "bf16",
    method: SamplerMethod | None = None,
) -> Drawn:
    """The device's part of `generate`: condition, sample and decode, the
    volumes left on the device (see `Drawn.finish`)."""
    config = model.config
    if not requests:
        raise ValueError("generate needs at least one request")
    shape = tuple(shape or config.default_shape)
    spacings = [request.spacing(config) for request in requests]
    for spacing in spacings:
        config.check_output(shape, spacing)
    guidance_scale = config.sampler.guidance_scale if guidance_scale is None else guidance_scale
    num_steps = num_steps or config.sampler.num_steps
    method = method or config.sampler.method
    device = model.device

    start = time.perf_counter()
    cond = _condition(model, requests, shape, spacings)
    timings = {"text": _elapsed(start, device)}

    start = time.perf_counter()
    latent_shape = config.latent_shape(shape)  # (C, x, y, z)
    seeds = [int(request.seed) for request in requests]
    noise = per_sample_randn(latent_shape, seeds, device=device)  # (B, C, x, y, z)
    times = schedule(config, num_steps, latent_shape)
    with autocast(device, precision):
        latents = SAMPLERS[method](
            model.denoiser, noise, cond, times, guidance_scale=guidance_scale
        )
    _check_finite(latents, "latents")
    timings["sample"] = _elapsed(start, device)

    start = time.perf_counter()
    with autocast(device, precision):
        # One at a time: bounded memory, batch-independent.
        decoded = [
            model.codec.decode_volume(latents[i : i + 1])[0, 0].float()
            for i in range(len(requests))
        ]
    timings["decode"] = _elapsed(start, device)

    return Drawn(
        decoded=decoded,
        timings_s=timings,
        shape=shape,
        spacings_mm=spacings,
        seeds=seeds,
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


def _condition(model: Report2CT, requests, shape, spacings) -> Condition:
    """The requests' report, labels, mask and spacing, on the model's device."""
    config, device = model.config, model.device
    label_rows = [signed_labels(request.labels) for request in requests]
    if any(any(row) for row in label_rows) and not config.label_condition:
        raise ValueError(f"model {config.name!r} has no label condition: ask by text")
    for i, (request, row) in enumerate(zip(requests, label_rows, strict=True)):
        if request.findings is None and request.impression is None and not any(row):
            raise ValueError(f"volume {i}: neither a report nor labels to generate from")
    control = _control(config, requests, shape, device)
    if model.conditioner is None:
        raise RuntimeError("this Report2CT was built without text encoders")
    context = model.conditioner.encode(
        [request.findings for request in requests], [request.impression for request in requests]
    )  # (B, 2, D)
    return Condition(
        context=context.to(device),
        spacing_mm=torch.tensor(spacings, dtype=torch.float32, device=device),  # (B, 3)
        labels=torch.tensor(label_rows, device=device) if config.label_condition else None,
        control=None if control is None else control.to(device),
    )


def _check_finite(values: torch.Tensor, what: str, *, first_index: int = 0) -> None:
    """Raise NonFiniteOutput naming the volumes (by index in the batch)
    whose `values` (B, ...) hold NaN or Inf."""
    finite = torch.isfinite(values.float()).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = [first_index + int(i) for i in torch.nonzero(~finite).flatten()]
        raise NonFiniteOutput(f"the model produced NaN/Inf {what} (volume {bad} of the batch)")


def _elapsed(start: float, device: torch.device) -> float:
    """Seconds since `start`, after the device has finished its queued work
    (CUDA runs asynchronously: without the sync, the time lands elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _control(config: ModelConfig, requests, shape, device) -> torch.Tensor | None:
    """(B, K, x, y, z) mask-class occupancy, or None without masks. A batch
    is all with masks or all without (the ControlNet runs per batch)."""
    with_mask = [request.mask is not None for request in requests]
    if not any(with_mask):
        return None
    if config.control is None:
        raise ValueError(f"model {config.name!r} has no mask condition (no ControlNet)")
    if not all(with_mask):
        raise ValueError("a batch is all with masks or all without: split it")
    out = []
    for i, request in enumerate(requests):
        if tuple(request.mask.shape) != tuple(shape):
            raise MaskError(
                f"volume {i}: mask shape {tuple(request.mask.shape)} is not the output {shape}"
            )
        index = request.mask_index
        if index is None:
            index = to_class_index(np.asarray(request.mask), config.control, request.mask_mapping)
        occupancy = class_occupancy(
            index, config.control.num_classes, config.vae.downsample, device=device
        )
        out.append(occupancy)
    return torch.stack(out)
