"""The options of a generate job, defined once.

`GenerateOptions` is what `ctfactory generate` builds from its flags, what a
`kind: generate` job spec is (jobs.specs.GenerateSpec adds only `kind`), and
what `run_generate` takes; the flags are named after its fields. The worker
receives the subset it needs: `SamplingOptions` and the outputs to write.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from report2ct.config import Precision, SamplerMethod

Uri = Annotated[str, Field(min_length=1, description="a local path or an s3:// URI")]
RUN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class GenerateOptions(BaseModel):
    """Generate one volume per manifest record with a model bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: Uri = Field(
        description="manifest (local path or s3://): JSONL, JSONL.gz, Parquet, or CT-RATE's "
        "reports CSV (with --labels)"
    )
    output: Uri = Field(description="output root: a local directory or s3://bucket/prefix")
    labels: Uri | None = Field(
        None,
        description="CT-RATE labels CSV, joined by VolumeName to a CT-RATE reports CSV manifest",
    )
    bundle: Uri | None = Field(
        None, description="model bundle (local dir or s3://); default: the committed demo bundle"
    )
    run: str | None = Field(
        None,
        pattern=RUN_PATTERN,
        description="run name under output (default: the manifest's file name)",
    )
    workers: int = Field(1, ge=1, le=4096, description="generation actors (one per GPU)")
    gpus_per_worker: float | None = Field(
        None,
        ge=0,
        le=8,
        description="GPUs per actor (default: 1 when the cluster has GPUs, 0 on a CPU-only one)",
    )
    cpus_per_worker: float = Field(1.0, gt=0, le=256, description="CPUs per actor")
    precision: Precision = Field("bf16", description="autocast precision: bf16, fp16 or fp32")
    num_steps: int | None = Field(
        None, ge=1, le=1000, description="sampling steps (default: the bundle's)"
    )
    guidance_scale: float | None = Field(
        None, ge=0, le=50, description="classifier-free guidance scale (default: the bundle's)"
    )
    method: SamplerMethod | None = Field(
        None, description="sampler: euler or heun (default: the bundle's)"
    )
    batch_size: int = Field(1, ge=1, le=64, description="volumes sampled together per actor call")
    nifti: bool = Field(False, description="also write NIfTI (.nii.gz) with the true affine")
    preview: bool = Field(False, description="also write a PNG preview per volume")
    allow_remote_code: bool = Field(
        False,
        description="let the bundle's text encoders run the code they ship (CXR-BERT does); "
        "the code is inside the bundle, checked by its SHA256SUMS",
    )
    torch_compile: bool = Field(
        False, description="compile the UNet and the decoder with torch.compile (GPU workers)"
    )
    channels_last: bool = Field(False, description="channels-last 3-D memory format (GPU workers)")
    cudnn_benchmark: bool = Field(
        False, description="let cuDNN pick the fastest convolutions for the shape (GPU workers)"
    )
    max_task_retries: int = Field(
        3, ge=0, le=100, description="retries of a batch whose actor died before it finished"
    )
    verify: Uri | None = Field(
        None,
        description="score every volume with a label verifier bundle (local dir or s3://; "
        "'default': the committed report2ct/bundles/verifier) against the labels its record "
        "specifies; the scores go into its index row and attributes",
    )
    resample: int = Field(
        0,
        ge=0,
        le=32,
        description="with --verify: draw a volume that fails again, with the next derived "
        "seed, up to this many times",
    )
    drop_unverified: bool = Field(
        False,
        description="with --verify: a volume that passes none of its draws goes to the errors "
        "with its scores (default: committed, flagged passed: false)",
    )

    @model_validator(mode="after")
    def _verification_needs_a_verifier(self) -> GenerateOptions:
        if self.verify is None and (self.resample or self.drop_unverified):
            raise ValueError("resample and drop_unverified need verify (a verifier bundle)")
        if self.verify == "default":
            from factory.verify import DEFAULT_VERIFIER  # checked here: not in every worker

            if not (DEFAULT_VERIFIER / "SHA256SUMS").is_file():
                raise ValueError(
                    f"verify 'default': no committed verifier at {DEFAULT_VERIFIER}; build it "
                    "with `ctfactory train-verifier --out <dir>` and pass that directory"
                )
        return self

    def run_name(self) -> str:
        """The run's folder under `output`: `run`, or the manifest's file stem."""
        if self.run:
            return self.run
        stem = self.manifest.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
        return re.sub(r"[^A-Za-z0-9._-]", "-", stem) or "run"

    def speed(self) -> dict[str, bool]:
        """The load options of report2ct.bundle.load_bundle."""
        return {
            "torch_compile": self.torch_compile,
            "channels_last": self.channels_last,
            "cudnn_benchmark": self.cudnn_benchmark,
        }

    def sampling(self):
        """The sampling subset the workers receive."""
        from report2ct.pipeline import SamplingOptions  # torch: only where sampling happens

        return SamplingOptions(
            num_steps=self.num_steps,
            guidance_scale=self.guidance_scale,
            precision=self.precision,
            method=self.method,
        )

    def verification(self):
        """How the workers verify each volume (None: no --verify)."""
        if self.verify is None:
            return None
        from factory.verify import VerifyOptions

        return VerifyOptions(
            bundle=self.verify, resample=self.resample, drop_unverified=self.drop_unverified
        )
