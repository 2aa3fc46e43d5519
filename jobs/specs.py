"""Job specs: one pydantic model per job kind, read from YAML or JSON.

A spec is validated completely before anything starts; an invalid one fails
with the file and the dotted field path. The spec's canonical JSON is also
what makes a submission id deterministic (see `jobs.submit`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from factory.options import GenerateOptions, Uri


class SpecError(ValueError):
    """A spec that cannot run; the message names the file and the field."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def canonical_json(self) -> str:
        """Field order and formatting fixed, defaults included: two specs that
        mean the same job serialise to the same bytes."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


class GenerateSpec(_Spec, GenerateOptions):
    """Generate one volume per manifest record with a model bundle: the
    generate job's options (factory.options.GenerateOptions), plus `kind`."""

    kind: Literal["generate"]


# The stages a train job runs, and what each reads besides `data`.
TRAIN_STAGES = ("vae", "ldm", "controlnet", "demo-bundle")
_STAGE_INPUTS = {"vae": (), "ldm": ("vae_run",), "controlnet": ("ldm_run",), "demo-bundle": ()}


class TrainSpec(_Spec):
    """Train one stage (`vae`, `ldm`, `controlnet`) into a run directory, or
    build the whole demo bundle, under DeepSpeed; over `num_workers` Ray
    Train workers when more than one (or `use_gpu`)."""

    kind: Literal["train"]
    stage: str = Field(description="vae | ldm | controlnet | demo-bundle")
    preset: Literal["tiny", "demo", "paper"] = "demo"
    data: Uri = Field(description="a CT-RATE-layout data set (local directory or s3://)")
    output: Uri = Field(
        description="the stage's run directory (local or s3://); demo-bundle: the bundle"
    )
    vae_run: Uri | None = Field(
        None, description="ldm: a `vae` run (or an imported MAISI VAE) whose EMA weights encode"
    )
    ldm_run: Uri | None = Field(
        None, description="controlnet: the `ldm` run whose cache and frozen UNet it trains on"
    )
    encoders: dict[str, str] = Field(
        default_factory=dict,
        description="ldm: a preset encoder's name -> a local directory or a cached hub id",
    )
    encoders_dir: Uri | None = Field(
        None, description="ldm: the directory holding the preset's bundle: encoders"
    )
    allow_remote_code: bool = Field(
        False, description="let encoders that ship their own code (CXR-BERT) run it"
    )
    hu_rule: Literal["auto", "metadata", "stored"] = Field(
        "auto", description="how stored values become HU (training.data.ctrate)"
    )
    deepspeed_config: Uri | dict[str, Any] | None = Field(
        None,
        description="a DeepSpeed JSON (path or s3://) or an inline dict for every stage: its "
        "batch shape, clipping, ZeRO stage (0-2) and precision replace the recipe's, the rest "
        "goes to the engine; no optimizer or scheduler (the loop builds them); default: the "
        "recipe's",
    )
    num_workers: int = Field(1, ge=1, le=1024, description="training processes (one per GPU)")
    use_gpu: bool = False
    max_failures: int = Field(
        3,
        ge=0,
        description="Ray Train restarts of the worker group (each resumes from the "
        "last checkpoint)",
    )
    resume: bool = Field(
        True, description="continue from the last checkpoints; false: every stage starts afresh"
    )
    model: dict[str, Any] = Field(
        default_factory=dict,
        description="vae, ldm, controlnet: the preset's ModelConfig fields replaced (vae and "
        "unet as mappings of their fields), e.g. a smaller default_shape",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="vae, ldm, controlnet: TrainConfig fields of the stage (vae also `crop`); "
        "demo-bundle: recipe fields, a stage's (vae, ldm, control) as TrainConfig fields",
    )

    @model_validator(mode="after")
    def _runnable(self) -> TrainSpec:
        """Everything the entry would refuse after submission, refused now."""
        if self.stage not in TRAIN_STAGES:
            hint = (
                " (the demo's report BERT trains inside demo-bundle; pretrained encoders are "
                "imported with `ctfactory bundle init --encoder`)"
                if self.stage == "encoder"
                else ""
            )
            raise ValueError(
                f"stage {self.stage!r}: a train job runs {', '.join(TRAIN_STAGES)}{hint}"
            )
        for name in ("vae_run", "ldm_run"):
            needed = name in _STAGE_INPUTS[self.stage]
            if needed and getattr(self, name) is None:
                raise ValueError(f"stage {self.stage} needs {name}")
            if not needed and getattr(self, name) is not None:
                raise ValueError(f"{name} is read by stage {_reader(name)} only, not {self.stage}")
        if self.stage != "ldm" and (self.encoders or self.encoders_dir):
            raise ValueError("encoders and encoders_dir: stage ldm imports encoders, not this one")
        if self.stage == "demo-bundle":
            if self.num_workers > 1:
                raise ValueError(
                    "stage demo-bundle builds on one worker; num_workers > 1 runs vae, ldm "
                    "and controlnet"
                )
            if self.model:
                raise ValueError("model: demo-bundle takes its preset whole")
        else:
            self.model_settings()
            self.train_config()
            self.crop()
        if isinstance(self.deepspeed_config, dict):
            from training.engine import TrainConfig, with_deepspeed

            with_deepspeed(TrainConfig(), self.deepspeed_config).deepspeed_config()
        return self

    def model_settings(self):
        """The preset with `model` applied (stages vae, ldm, controlnet)."""
        import dataclasses

        from report2ct.config import ModelConfig, preset

        base = preset(self.preset).to_dict()
        unknown = sorted(set(self.model) - set(base) - {"name"})
        if unknown:
            raise ValueError(f"model: unknown ModelConfig fields {unknown}")
        merged = dict(base)
        for key, value in self.model.items():
            merged[key] = {**base[key], **value} if isinstance(base[key], dict) else value
        config = ModelConfig.from_dict(merged)
        try:  # the default grid must be one the model can make
            config.check_output(config.default_shape, config.default_spacing_mm)
        except ValueError as error:
            raise ValueError(f"model: {error}") from None
        return dataclasses.replace(config, name=self.preset)

    def train_config(self):
        """The stage's TrainConfig: its defaults, `overrides`, then the
        inline DeepSpeed config (a file's is applied when the job reads it)."""
        import dataclasses

        from training.engine import TrainConfig
        from training.runs import STAGE_DEFAULTS

        fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"deepspeed"}
        allowed = fields | ({"crop"} if self.stage == "vae" else set())
        unknown = sorted(set(self.overrides) - allowed)
        if unknown:
            raise ValueError(
                f"overrides: {unknown} are not settings of stage {self.stage} "
                f"({', '.join(sorted(allowed))})"
            )
        given = {k: v for k, v in self.overrides.items() if k != "crop"}
        config = dataclasses.replace(STAGE_DEFAULTS[self.stage], **given)
        if config.steps < 1 or config.micro_batch < 1 or config.grad_accum < 1:
            raise ValueError("overrides: steps, micro_batch and grad_accum must be at least 1")
        if config.zero_stage not in (0, 1, 2):
            raise ValueError(f"overrides: zero_stage {config.zero_stage}: the loop runs 0, 1, 2")
        return config

    def crop(self) -> tuple[int, int, int]:
        crop = tuple(self.overrides.get("crop", (32, 32, 32)))
        if len(crop) != 3 or not all(isinstance(c, int) and c > 0 for c in crop):
            raise ValueError(f"overrides: crop {crop} is not three positive voxel counts")
        return crop


def _reader(name: str) -> str:
    return next(stage for stage, inputs in _STAGE_INPUTS.items() if name in inputs)


class EvaluateSpec(_Spec):
    """Measure a generated set against a phantom reference set."""

    kind: Literal["evaluate"]
    generated: Uri = Field(description="a generate job's index")
    reference: Uri = Field(description="a phantom dataset in CT-RATE layout (a local directory)")
    output: Uri
    epochs: int = Field(20, ge=1, description="epochs for the evaluation networks trained here")


class ShardSpec(_Spec):
    """Split a large manifest into N shards (by a stable hash of the record id)."""

    kind: Literal["shard"]
    manifest: Uri
    output: Uri = Field(
        description="prefix; shards are written as <output>/shard-00000-of-00008.jsonl"
    )
    num_shards: int = Field(ge=1, le=100_000)

    @model_validator(mode="after")
    def _distinct(self) -> ShardSpec:
        if self.output.rstrip("/") == self.manifest.rstrip("/"):
            raise ValueError("output must differ from manifest")
        return self


JobSpec = Annotated[
    GenerateSpec | TrainSpec | EvaluateSpec | ShardSpec, Field(discriminator="kind")
]
_ADAPTER: TypeAdapter[JobSpec] = TypeAdapter(JobSpec)
KINDS = ("generate", "train", "evaluate", "shard")


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid job spec"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  field '{where}': {item['msg']}")
    return "\n".join(lines)


def parse_spec(
    data: Any, *, source: str = "<spec>"
) -> GenerateSpec | TrainSpec | EvaluateSpec | ShardSpec:
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: a job spec is a mapping with a 'kind' field, got {type(data).__name__}"
        )
    if data.get("kind") not in KINDS:
        raise SpecError(
            f"{source}: field 'kind' must be one of {', '.join(KINDS)}, got {data.get('kind')!r}"
        )
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as error:
        # Drop the discriminator's tag from the path: 'generate.workers' -> 'workers'.
        raise SpecError(_describe(error, source).replace(f"'{data['kind']}.", "'")) from None


def load_spec(path: str | Path) -> GenerateSpec | TrainSpec | EvaluateSpec | ShardSpec:
    """Read a YAML or JSON spec file (JSON is YAML) and validate it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SpecError(f"{path}: cannot read the spec: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML/JSON: {error}") from None
    return parse_spec(data, source=str(path))
