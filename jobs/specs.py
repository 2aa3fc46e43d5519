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


class TrainSpec(_Spec):
    """Train one stage (or build the whole demo bundle) with DeepSpeed."""

    kind: Literal["train"]
    stage: Literal["encoder", "vae", "ldm", "demo-bundle"]
    preset: Literal["tiny", "demo", "paper"] = "demo"
    data: Uri
    output: Uri
    deepspeed_config: Uri | dict[str, Any] | None = Field(
        None,
        description="a DeepSpeed JSON (path) or an inline dict for every stage: its batch "
        "shape, clipping, ZeRO stage (0-2) and precision replace the recipe's, the rest goes "
        "to the engine; no optimizer or scheduler (the loop builds them); default: the recipe's",
    )
    num_workers: int = Field(1, ge=1, le=1024, description="training processes (one per GPU)")
    use_gpu: bool = False
    resume: bool = Field(
        True, description="continue from the last checkpoints; false: every stage starts afresh"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="recipe fields; a stage's (vae, ldm, control) as TrainConfig fields",
    )


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
