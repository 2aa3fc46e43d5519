"""The generation job: manifest in, committed volumes + index + summary out.

    validate (stream) -> parts of validated records, grouped by output shape
    -> Ray Data: parts -> records -> map_batches(GenerateWorker, ActorPool)
    -> driver streams results: progress, index.jsonl, errors.jsonl
    -> summary.json, exit code

Exit codes: 0 every record committed; 3 partial (some rejected or failed);
2 fatal (the job could not run).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory import commit
from factory.manifest import ManifestRecord, Rejection, read_manifest
from factory.options import GenerateOptions
from factory.records import Outcome
from factory.storage import Storage, join, local_copy, open_storage, storage_for

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FATAL, EXIT_PARTIAL = 0, 2, 3
BUNDLES = Path(__file__).resolve().parents[1] / "report2ct" / "bundles"
DEFAULT_BUNDLE = BUNDLES / "demo"  # report text -> CT
# The same recipe with the label token and a ControlNet (masks, labels alone).
CONTROL_BUNDLE = BUNDLES / "demo-control"
RECORDS_PER_PART = 1000
# Ray Data's read and repartition tasks each ask for one CPU; on a CPU-only
# cluster the actors leave that much free (their torch threads still use the
# cores: a CPU request is a scheduling label, not a limit).
RESERVED_CPUS = 1.0
# Settings a worker needs to reach storage the way the driver does; never
# credentials (on a cluster those come from the node's role, not the job).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "CTFACTORY_FAULTS",
    "CTFACTORY_CACHE",
)


@dataclass
class JobResult:
    run_uri: str
    exit_code: int
    counts: dict[str, int]
    summary: dict[str, Any] = field(default_factory=dict)


def _validate(
    options: GenerateOptions, config, run: Storage, scratch: Path
) -> tuple[list[str], list[dict], int]:
    """Stream the manifest; write validated records into parts (one series
    per output shape) under the run's scratch space; return part keys,
    rejections and the number of volumes requested."""
    manifest_store, manifest_key = storage_for(options.manifest)
    open_parts: dict[tuple, tuple[Path, Any]] = {}  # shape -> (file, handle)
    in_part: Counter = Counter()
    series: Counter = Counter()
    parts, rejections, volumes = [], [], 0

    def flush(shape):
        path, handle = open_parts.pop(shape)
        handle.close()
        key = f"_work/parts/{path.name}"
        run.write_bytes(key, path.read_bytes())
        parts.append(key)
        in_part[shape] = 0

    for line, result in read_manifest(manifest_store.iter_lines(manifest_key), config=config):
        if isinstance(result, Rejection):
            rejections.append({**result.to_json(), "status": "rejected"})
            continue
        shape = tuple(result.shape or config.default_shape)
        if shape not in open_parts:
            series[shape] += 1
            path = scratch / f"part-{'x'.join(map(str, shape))}-{series[shape]:06d}.jsonl"
            open_parts[shape] = (path, path.open("w"))
        open_parts[shape][1].write(
            json.dumps({"line": line, "record": result.model_dump(mode="json")}) + "\n"
        )
        in_part[shape] += 1
        volumes += result.num_samples
        if in_part[shape] >= RECORDS_PER_PART:
            flush(shape)
    for shape in list(open_parts):
        flush(shape)
    return parts, rejections, volumes


def _read_part(row: dict[str, Any], *, run_root: str) -> list[dict[str, str]]:
    data = open_storage(run_root).read_bytes(row["part"]).decode()
    return [{"item": line} for line in data.splitlines() if line]


def _forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}


def _ensure_ray(options: GenerateOptions):
    import ray

    if not ray.is_initialized():
        # Inside `ray job submit` or with RAY_ADDRESS set, this joins that
        # cluster; otherwise it starts a local one on this machine.
        ray.init(
            runtime_env={"env_vars": _forwarded_env()}, log_to_driver=False, configure_logging=False
        )
    # The job reports its own progress (per volume, not per block).
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def _cpus_per_worker(ray, options: GenerateOptions) -> float:
    """On CPU-only clusters, actors that take every CPU starve Ray Data's read
    tasks and the job hangs silently: leave room for them."""
    if options.gpus_per_worker:
        return options.cpus_per_worker
    available = ray.cluster_resources().get("CPU", 0.0)
    if options.workers * options.cpus_per_worker > available - RESERVED_CPUS:
        fitted = max(0.05, round((available - RESERVED_CPUS) / options.workers, 3))
        log.info(
            "cpus_per_worker %.3f -> %.3f so %d workers leave CPU for reads",
            options.cpus_per_worker,
            fitted,
            options.workers,
        )
        return fitted
    return options.cpus_per_worker


def run_generate(
    options: GenerateOptions,
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> JobResult:
    """Run a generate job to completion (or resume one: committed volumes are
    skipped). `on_progress` receives every result row as it arrives."""
    from factory.worker import GenerateWorker, WorkerOptions
    from report2ct.bundle import read_config, verify_bundle

    started = time.time()
    run_uri = join(options.output, options.run_name())
    run = open_storage(run_uri)
    bundle_uri = options.bundle or str(DEFAULT_BUNDLE)
    bundle_dir = local_copy(bundle_uri)
    bundle_sha = verify_bundle(bundle_dir)
    config = read_config(bundle_dir)

    with tempfile.TemporaryDirectory() as scratch:
        parts, rejections, volumes = _validate(options, config, run, Path(scratch))
    validated_s = time.time() - started
    log.info("%s: %d volumes requested, %d records rejected", run_uri, volumes, len(rejections))
    if on_total:
        on_total(volumes)

    outcomes: list[Outcome] = []
    if parts:
        ray = _ensure_ray(options)
        worker_options = WorkerOptions(
            bundle=bundle_uri,
            run_root=run_uri,
            sampling=options.sampling(),
            batch_size=options.batch_size,
            max_tries=options.max_task_retries + 1,
            job_id=commit.new_attempt(),
            nifti=options.nifti,
            preview=options.preview,
            extra_provenance={"job": {"manifest": options.manifest, "run": run_uri}},
        )
        dataset = (
            ray.data.from_items([{"part": key} for key in parts])
            .flat_map(_read_part, fn_kwargs={"run_root": run_uri})
            # One block per batch, so batches spread over every actor of the pool.
            .repartition(target_num_rows_per_block=options.batch_size)
            .map_batches(
                GenerateWorker,
                fn_constructor_kwargs={"options": worker_options},
                batch_size=options.batch_size,
                compute=ray.data.ActorPoolStrategy(size=options.workers),
                num_gpus=options.gpus_per_worker or None,
                num_cpus=_cpus_per_worker(ray, options),
                # Ray Data restarts dead actors and retries their batches
                # without bound; the workers bound the tries per volume
                # themselves (WorkerOptions.max_tries), against storage.
                runtime_env={"env_vars": _forwarded_env()},
            )
        )
        for item in dataset.iter_rows():
            outcome = Outcome.from_json(json.loads(item["result"]))
            outcomes.append(outcome)
            if on_progress:
                on_progress(outcome)

    return _finish(
        run,
        options,
        bundle_sha=bundle_sha,
        outcomes=outcomes,
        rejections=rejections,
        volumes=volumes,
        seconds={"total": time.time() - started, "validate": validated_s},
    )


def _finish(
    run: Storage,
    options: GenerateOptions,
    *,
    bundle_sha: str,
    outcomes: list[Outcome],
    rejections: list[dict[str, Any]],
    volumes: int,
    seconds: dict[str, float],
) -> JobResult:
    """Write index.jsonl, errors.jsonl and summary.json; the exit code."""
    committed = [o for o in outcomes if o.entry is not None]
    failed = [o.error_row() for o in outcomes if o.status == "failed"]
    committed.sort(key=lambda o: (o.id, o.sample))
    run.write_bytes(
        "index.jsonl", "".join(json.dumps(o.entry.to_json()) + "\n" for o in committed).encode()
    )
    errors = sorted(
        rejections + failed, key=lambda row: (row.get("line") or 0, row.get("id") or "")
    )
    run.write_bytes("errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors).encode())

    elapsed = seconds["total"]
    generated = [o for o in committed if o.status == "generated"]
    split = Counter()
    for outcome in generated:
        split.update(outcome.entry.timings_s)
    counts = {
        "volumes_requested": volumes,
        "committed": len(committed),
        "generated": len(generated),
        "skipped_already_committed": len(committed) - len(generated),
        "failed": len(failed),
        "records_rejected": len(rejections),
    }
    missing = volumes - len(committed)
    exit_code = EXIT_OK if not errors and missing == 0 else EXIT_PARTIAL
    summary = {
        "run": run.root,
        "manifest": options.manifest,
        "bundle_sha256": bundle_sha,
        "options": options.model_dump(mode="json"),
        "counts": counts,
        "exit_code": exit_code,
        # time_split: seconds per stage summed over every generated volume
        # (workers run in parallel, so the sum exceeds the wall time).
        "seconds": {**seconds, "time_split": dict(split)},
        "volumes_per_hour": len(generated) / elapsed * 3600 if elapsed > 0 else 0.0,
        "index": run.uri("index.jsonl"),
        "errors": run.uri("errors.jsonl"),
    }
    run.write_bytes("summary.json", json.dumps(summary, indent=2).encode())
    return JobResult(run_uri=run.root, exit_code=exit_code, counts=counts, summary=summary)


def cleanup_run(run_uri: str) -> dict[str, int]:
    return commit.cleanup(open_storage(run_uri))


__all__ = [
    "EXIT_FATAL",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "GenerateOptions",
    "JobResult",
    "ManifestRecord",
    "cleanup_run",
    "run_generate",
]
