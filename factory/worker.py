"""The generation worker: a Ray Data actor (one per GPU) that loads the bundle
once and turns batches of validated records into committed volumes.

It keeps no per-record state: everything a record needs travels with it, and
every decision (skip a committed key, write a fresh attempt, commit or lose)
is made against storage, so a restarted actor or a retried batch is safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from factory import commit
from factory.manifest import ManifestRecord
from factory.storage import Storage, is_s3
from factory.writer import MASK_LABEL
from report2ct.labels import CTRATE_LABELS

log = logging.getLogger(__name__)

FAULTS_ENV = "CTFACTORY_FAULTS"  # e.g. "kill_before_commit=3": test hook, see `_maybe_die`


@dataclass(frozen=True)
class WorkerOptions:
    bundle: str  # local directory or s3:// prefix
    run_root: str  # <out>/<run>
    precision: str = "bf16"
    num_steps: int | None = None
    guidance_scale: float | None = None
    batch_size: int = 1
    nifti: bool = False
    preview: bool = False
    extra_provenance: dict[str, Any] = field(default_factory=dict)


def materialize_bundle(uri: str) -> Path:
    """A local directory holding the bundle: itself, or a cached download of
    an s3:// bundle (verified again by load_bundle either way)."""
    if not is_s3(uri):
        return Path(uri)
    cache = Path(os.environ.get("CTFACTORY_CACHE", Path.home() / ".cache" / "ct-factory"))
    target = cache / "bundles" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (target / "SHA256SUMS").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=target.parent))
        Storage(uri).download_prefix("", scratch)
        try:
            scratch.rename(target)
        except OSError:  # another worker on this node finished first
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def mask_classes(control) -> dict[int, tuple[str, tuple[int, int, int, int]]]:
    """value -> (name, rgba) of the model's mask legend: the phantom world's
    colours for its classes, a fixed colour derived from the name otherwise."""
    if control is None:
        return {}
    from phantom.legend import BY_NAME

    def colour(name: str) -> tuple[int, int, int, int]:
        if name in BY_NAME:
            return BY_NAME[name].rgba
        r, g, b = hashlib.sha256(name.encode()).digest()[:3]
        return (r, g, b, 255)

    return {value: (name, colour(name)) for value, name in control.legend}


def _worker_identity() -> dict[str, Any]:
    import torch

    try:
        import ray

        gpu_ids = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:
        gpu_ids = []
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": device,
        "gpu_ids": gpu_ids,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


class GenerateWorker:
    """Callable class for `Dataset.map_batches(..., compute=ActorPoolStrategy)`."""

    def __init__(self, options: WorkerOptions) -> None:
        import torch

        from report2ct.bundle import load_bundle

        self.options = options
        device = "cuda" if torch.cuda.is_available() else "cpu"
        start = time.perf_counter()
        self.model = load_bundle(materialize_bundle(options.bundle), device=device)
        self.load_s = time.perf_counter() - start
        self.run = Storage(options.run_root)
        self.identity = _worker_identity()
        self.model_provenance = self.model.provenance()
        self.mask_classes = mask_classes(self.model.config.control)

    # -- Ray Data entry point --------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        items = [json.loads(text) for text in batch["item"]]
        tasks = []  # (line, record, sample, key)
        results: list[dict[str, Any]] = []
        for item in items:
            record = ManifestRecord.model_validate(item["record"])
            for sample in range(record.num_samples):
                key = commit.volume_key(record.id, sample, record.num_samples)
                marker = commit.read_commit(self.run, key)
                if marker is not None:  # committed by an earlier run or attempt
                    results.append({**marker["index"], "status": "skipped"})
                else:
                    tasks.append((item["line"], record, sample, key))
        # Records sharing an output grid (and all with masks, or all without:
        # the ControlNet runs per batch) sample together, batch_size at a time.
        groups: dict[tuple, list] = {}
        config = self.model.config
        for task in tasks:
            shape = tuple(task[1].shape or config.default_shape)
            groups.setdefault((shape, task[1].has_mask), []).append(task)
        for (shape, _), group in groups.items():
            for start in range(0, len(group), self.options.batch_size):
                results.extend(
                    self._generate(shape, group[start : start + self.options.batch_size])
                )
        return {"result": [json.dumps(row) for row in results]}

    def _masks(self, shape, tasks, spacings, seeds) -> tuple[list, list]:
        """(task, spacing, seed, mask or None) for each task without a mask or
        whose mask resolved on the output grid, and failure rows (record id
        and reason) for the rest."""
        from factory.masks import resolve_mask

        control = self.model.config.control
        ready, failed = [], []
        for task, spacing, seed in zip(tasks, spacings, seeds, strict=True):
            record = task[1]
            if not record.has_mask:
                ready.append((task, spacing, seed, None))
                continue
            try:
                mask = resolve_mask(record, seed, shape, spacing, control)
            except Exception as error:
                log.warning("mask of %s refused: %s", record.id, error)
                failed.append(self._failure(*task, ValueError(f"mask: {error}")))
                continue
            ready.append((task, spacing, seed, mask))
        return ready, failed

    # -- one batch of volumes of the same shape -------------------------
    def _generate(self, shape: tuple[int, int, int], tasks: list) -> list[dict[str, Any]]:
        from report2ct.pipeline import generate

        config = self.model.config
        # Per-record guidance overrides: records of one batch must agree, so
        # a batch with mixed overrides is split.
        guidance = {task[1].guidance_scale for task in tasks}
        if len(guidance) > 1:
            return [row for task in tasks for row in self._generate(shape, [task])]
        record_guidance = guidance.pop()
        spacings = [tuple(task[1].spacing_mm or config.default_spacing_mm) for task in tasks]
        seeds = [task[1].resolved_seed() + task[2] for task in tasks]
        ready, rows = self._masks(shape, tasks, spacings, seeds)
        if not ready:
            return rows
        tasks, spacings, seeds, masks = (list(column) for column in zip(*ready, strict=True))
        records = [record for _, record, _, _ in tasks]
        # A phantom mask says which findings it drew: those are the labels.
        labels = [
            mask.labels if mask is not None and mask.labels is not None else r.labels
            for r, mask in zip(records, masks, strict=True)
        ]
        try:
            result = generate(
                self.model,
                findings=[r.findings for r in records],
                impressions=[r.impression for r in records],
                spacings_mm=spacings,
                seeds=seeds,
                shape=shape,
                guidance_scale=record_guidance
                if record_guidance is not None
                else self.options.guidance_scale,
                num_steps=self.options.num_steps,
                precision=self.options.precision,
                labels=labels if config.label_condition else None,
                masks=[m.values for m in masks] if masks[0] is not None else None,
            )
        except Exception as error:
            log.exception("generation failed for %s", [r.id for r in records])
            return rows + [
                self._failure(line, record, sample, key, error)
                for line, record, sample, key in tasks
            ]
        per_volume = {name: value / len(tasks) for name, value in result.timings_s.items()}
        for index, (line, record, sample, key) in enumerate(tasks):
            try:
                rows.append(
                    self._write_and_commit(
                        line,
                        record,
                        sample,
                        key,
                        result.volumes_hu[index],
                        spacings[index],
                        seeds[index],
                        result.sampler,
                        dict(per_volume),
                        labels[index],
                        masks[index],
                    )
                )
            except Exception as error:
                log.exception("writing %s failed", key)
                rows.append(self._failure(line, record, sample, key, error))
        return rows

    def _failure(self, line, record, sample, key, error) -> dict[str, Any]:
        return {
            "status": "failed",
            "line": line,
            "id": record.id,
            "sample": sample,
            "key": key,
            "reason": f"{type(error).__name__}: {error}",
        }

    def _write_and_commit(
        self,
        line,
        record: ManifestRecord,
        sample,
        key,
        volume,
        spacing,
        seed,
        sampler,
        timings,
        labels,
        mask,
    ) -> dict[str, Any]:
        from factory.preview import render_preview
        from factory.writer import write_nifti, write_ome_zarr

        start = time.perf_counter()
        attempt = commit.new_attempt()
        prefix = commit.attempt_prefix(key, attempt)
        zarr_key = f"{prefix}.ome.zarr"
        index_row = {
            "id": record.id,
            "sample": sample,
            "key": key,
            "uri": self.run.uri(zarr_key),
            "labels": {name: int(labels.get(name, 0)) for name in CTRATE_LABELS},
            "seed": seed,
            "spacing_mm": list(spacing),
            "shape": list(volume.shape),
            "findings": record.findings,
            "impression": record.impression,
        }
        if mask is not None:
            index_row["mask"] = f"{self.run.uri(zarr_key)}/labels/{MASK_LABEL}"
        provenance = {
            **self.model_provenance,
            "sampler": sampler,
            "seed": seed,
            "record": record.model_dump(mode="json"),
            "report": {"findings": record.findings, "impression": record.impression},
            "labels": index_row["labels"],
            "mask": None if mask is None else mask.provenance,
            "worker": self.identity,
            "timings_s": timings,
            "attempt": attempt,
            **self.options.extra_provenance,
        }
        with tempfile.TemporaryDirectory() as scratch:
            local = write_ome_zarr(
                Path(scratch) / "volume.ome.zarr",
                volume,
                spacing,
                attributes={"provenance": provenance, "labels": index_row["labels"]},
                mask_xyz=None if mask is None else mask.values,
                mask_classes=self.mask_classes,
            )
            files = {
                f"{zarr_key}/{name}": digest
                for name, digest in self.run.upload_dir(local, zarr_key).items()
            }
            if self.options.nifti:
                nifti = write_nifti(Path(scratch) / "volume.nii.gz", volume, spacing)
                nifti_key = f"{prefix}.nii.gz"
                self.run.write_bytes(nifti_key, nifti.read_bytes())
                index_row["nifti_uri"] = self.run.uri(nifti_key)
        if self.options.preview:
            preview_key = f"previews/{key}.png"
            self.run.write_bytes(preview_key, render_preview(volume, spacing, title=record.id))
            index_row["preview_uri"] = self.run.uri(preview_key)
        timings["write"] = time.perf_counter() - start
        index_row["timings_s"] = timings
        _maybe_die(self.run)
        marker = {
            "key": key,
            "attempt": attempt,
            "files": files,
            "index": index_row,
            "worker": self.identity,
            "committed_at": time.time(),
        }
        if not commit.try_commit(self.run, key, marker):
            winner = commit.read_commit(self.run, key)
            if winner["attempt"] != attempt:
                # Another attempt (a retry of this batch elsewhere) won: ours never counted.
                self.run.delete_prefix(prefix + ".ome.zarr")
                self.run.delete_prefix(prefix + ".nii.gz")
                return {**winner["index"], "status": "skipped"}
            # Our own put landed but its answer was lost (a retry then saw 412): ours counts.
        return {**index_row, "status": "generated", "line": line}


def _maybe_die(run: Storage) -> None:
    """Fault injection for tests: with CTFACTORY_FAULTS=kill_before_commit=N,
    up to N workers of the job die (the whole process, as a preempted node
    would) after writing a volume and before committing it. Each kill is
    claimed with a conditional put, so there are exactly N kills per run."""
    spec = os.environ.get(FAULTS_ENV, "")
    if not spec.startswith("kill_before_commit="):
        return
    kills = int(spec.split("=", 1)[1])
    for number in range(kills):
        if run.put_if_absent(f"_work/faults/kill-{number}", str(os.getpid()).encode()):
            log.warning(
                "fault injection: worker %d dies before commit (kill %d)", os.getpid(), number
            )
            os._exit(137)
