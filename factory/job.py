"""The generation job: manifest in, committed volumes + index + summary out.

    list commits/ once -> validate (stream): rejections to the errors,
    committed records to the index, the rest into parts grouped by shape
    -> Ray Data: parts -> records -> map_batches(GenerateWorker, ActorPool)
    -> driver streams outcomes into index and error parts (factory.index)
    -> summary.json (refreshed while running), exit code

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory import commit
from factory.index import RunIndex
from factory.manifest import IdSet, ManifestRecord, Rejection, read_manifest
from factory.options import GenerateOptions
from factory.records import IndexEntry, Outcome, VolumeTask
from factory.sources import manifest_rows
from factory.storage import Storage, join, local_copy, open_storage

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FATAL, EXIT_PARTIAL = 0, 2, 3
BUNDLES = Path(__file__).resolve().parents[1] / "report2ct" / "bundles"
# Report text, CT-RATE labels and label maps (its ControlNet) -> CT.
DEFAULT_BUNDLE = BUNDLES / "demo"
RECORDS_PER_PART = 1000
# Calls of one generation actor in flight at once: one batch samples on the
# accelerator while the last one is written (factory.worker holds a lock
# around sampling only; bench/bench_overlap.py measures the overlap). Each
# call returns when its volumes are committed, so a batch's outcomes reach
# the driver as with one call; a call that retries a volume runs alone in its
# actor, so another volume's death can end at most a volume's first try
# (docs/guarantees.md).
PIPELINE_DEPTH = 2
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


@dataclass
class Plan:
    """What a manifest asks of a run, before any volume is generated."""

    volumes: int = 0  # volumes requested by the valid records
    already_committed: int = 0  # of those, committed by an earlier run
    rejected: int = 0
    grids: Counter = field(default_factory=Counter)  # (shape, spacing_mm) -> volumes


def committed_keys(run: Storage) -> IdSet:
    """The keys with a commit marker: one paged listing of commits/."""
    keys, batch = IdSet(), []
    for name in run.list(commit.COMMITS + "/"):
        batch.append(name.removeprefix(commit.COMMITS + "/").removesuffix(".json"))
        if len(batch) >= 4096:
            keys.add_many(batch)
            batch = []
    keys.add_many(batch)
    return keys


def validated(options: GenerateOptions, config, committed: IdSet) -> Iterator[tuple]:
    """(line, record or Rejection, keys, committed flags) for every row of
    the manifest, streamed."""
    rows = manifest_rows(options.manifest, labels=options.labels)
    for line, result in read_manifest(rows, config=config):
        if isinstance(result, Rejection):
            yield line, result, [], []
            continue
        keys = [task.key for task in VolumeTask.for_record(line, result)]
        yield line, result, keys, committed.contains(keys)


def plan_generate(
    options: GenerateOptions, *, on_rejection: Callable[[Rejection], None] | None = None
) -> Plan:
    """Validate the manifest against the bundle and count what a run would
    do; writes nothing (`ctfactory generate --dry-run`)."""
    config = read_bundle_config(options)[1]
    committed = committed_keys(open_storage(join(options.output, options.run_name())))
    plan = Plan()
    for _, result, keys, done in validated(options, config, committed):
        if isinstance(result, Rejection):
            plan.rejected += 1
            if on_rejection:
                on_rejection(result)
            continue
        shape = tuple(result.shape or config.default_shape)
        spacing = tuple(result.spacing_mm or config.default_spacing_mm)
        plan.grids[(shape, spacing)] += len(keys)
        plan.volumes += len(keys)
        plan.already_committed += sum(done)
    return plan


def _schedule(
    options: GenerateOptions, config, run: Storage, sink: RunIndex, scratch: Path
) -> list[str]:
    """Stream the manifest: rejections to the errors, records committed by an
    earlier run to the index (listed once), the rest into parts of validated
    records (one series per output shape) under the run's scratch space for
    the workers; returns the part keys."""
    open_parts: dict[tuple, tuple[Path, Any]] = {}  # shape -> (file, handle)
    in_part: Counter = Counter()
    series: Counter = Counter()
    parts = []

    def flush(shape):
        path, handle = open_parts.pop(shape)
        handle.close()
        key = f"_work/parts/{path.name}"
        run.write_bytes(key, path.read_bytes())
        parts.append(key)
        in_part[shape] = 0

    for line, result, keys, done in validated(options, config, committed_keys(run)):
        if isinstance(result, Rejection):
            sink.error({**result.to_json(), "status": "rejected"})
            continue
        sink.requested += len(keys)
        if all(done) and _list_committed(run, sink, keys):
            continue  # committed by an earlier run: never reaches an actor
        shape = tuple(result.shape or config.default_shape)
        if shape not in open_parts:
            series[shape] += 1
            path = scratch / f"part-{'x'.join(map(str, shape))}-{series[shape]:06d}.jsonl"
            open_parts[shape] = (path, path.open("w"))
        open_parts[shape][1].write(
            json.dumps({"line": line, "record": result.model_dump(mode="json")}) + "\n"
        )
        in_part[shape] += 1
        if in_part[shape] >= RECORDS_PER_PART:
            flush(shape)
    for shape in list(open_parts):
        flush(shape)
    return parts


def _list_committed(run: Storage, sink: RunIndex, keys: list[str]) -> bool:
    """Count a record's committed volumes as skipped, listing those the index
    lacks (a driver killed between their commit and its next part) from
    their markers. False, counting nothing, if a marker is missing after all
    (two keys sharing a 64-bit digest): the workers then decide."""
    listed = sink.listed.contains(keys)
    markers = {
        k: commit.read_commit(run, k) for k, seen in zip(keys, listed, strict=True) if not seen
    }
    if any(marker is None for marker in markers.values()):
        return False
    sink.skipped_listed(len(keys) - len(markers))
    for marker in markers.values():
        sink.committed("skipped", IndexEntry.from_json(marker["index"]))
    return True


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
        # log_to_driver: an actor's warnings and errors (a refused mask, a
        # failed write, a traceback) reach the job's own log.
        ray.init(
            runtime_env={"env_vars": _forwarded_env()}, log_to_driver=True, configure_logging=False
        )
    # The job reports its own progress (per volume, not per block).
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ...and Ray Data warns once that its bars are off, which we chose: a
    # line the user can do nothing with.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return ray


def _gpus_per_worker(ray, options: GenerateOptions) -> float:
    """One GPU per actor when the cluster has GPUs: an actor that asked for
    none would still see every GPU (Ray no longer hides them) and land on
    cuda:0 unaccounted."""
    if options.gpus_per_worker is not None:
        return options.gpus_per_worker
    return 1.0 if ray.cluster_resources().get("GPU", 0.0) >= 1 else 0.0


def _cpus_per_worker(ray, options: GenerateOptions) -> float:
    """Actors that take every CPU starve Ray Data's read tasks and the job
    hangs silently (a small or CPU-only cluster): leave room for them."""
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


def read_bundle_config(options: GenerateOptions):
    """(bundle URI, model config, sha256) of the job's bundle, verified."""
    from report2ct.bundle import read_config, verify_bundle

    bundle_uri = options.bundle or str(DEFAULT_BUNDLE)
    bundle_dir = local_copy(bundle_uri)
    return bundle_uri, read_config(bundle_dir), verify_bundle(bundle_dir)


def run_generate(
    options: GenerateOptions,
    *,
    on_progress: Callable[[Outcome], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> JobResult:
    """Run a generate job to completion (or resume one: committed volumes are
    skipped). `on_progress` receives every volume's outcome as it arrives."""
    run_uri = join(options.output, options.run_name())
    run = open_storage(run_uri)
    bundle_uri, config, bundle_sha = read_bundle_config(options)
    about = {
        "run": run_uri,
        "manifest": options.manifest,
        "bundle_sha256": bundle_sha,
        "options": options.model_dump(mode="json"),
    }
    with RunIndex(run, about=about) as sink:
        with tempfile.TemporaryDirectory() as scratch:
            parts = _schedule(options, config, run, sink, Path(scratch))
        sink.seconds["validate"] = time.time() - sink.started
        log.info("%s: %d volumes requested", run_uri, sink.requested)
        if on_total:
            on_total(sink.requested)
        if parts:
            for outcome in _generate(options, bundle_uri, run_uri, parts):
                if outcome.entry is not None:
                    sink.committed(outcome.status, outcome.entry)
                else:
                    sink.error(outcome.error_row())
                if on_progress:
                    on_progress(outcome)
        summary = sink.close()
    return JobResult(
        run_uri=run_uri, exit_code=summary["exit_code"], counts=summary["counts"], summary=summary
    )


def _generate(
    options: GenerateOptions, bundle_uri: str, run_uri: str, parts: list[str]
) -> Iterator[Outcome]:
    """The workers' outcomes, as they arrive, for the records in `parts`."""
    from factory.worker import GenerateWorker, WorkerOptions

    ray = _ensure_ray(options)
    worker_options = WorkerOptions(
        bundle=bundle_uri,
        run_root=run_uri,
        sampling=options.sampling(),
        verify=options.verification(),
        batch_size=options.batch_size,
        max_tries=options.max_task_retries + 1,
        job_id=commit.new_attempt(),
        allow_remote_code=options.allow_remote_code,
        speed=options.speed(),
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
            compute=ray.data.ActorPoolStrategy(
                size=options.workers,
                max_concurrent_calls_per_actor=PIPELINE_DEPTH,
                enable_true_multi_threading=True,
            ),
            num_gpus=_gpus_per_worker(ray, options) or None,
            num_cpus=_cpus_per_worker(ray, options),
            # Ray Data restarts dead actors and retries their batches
            # without bound; the workers bound the tries per volume
            # themselves (WorkerOptions.max_tries), against storage.
            runtime_env={"env_vars": _forwarded_env()},
        )
    )
    for item in dataset.iter_rows():
        yield Outcome.from_json(json.loads(item["result"]))


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
