"""The generation worker: a Ray Data actor (one per GPU) that loads the bundle
once and turns batches of validated records into committed volumes.

    plan    expand records into volume tasks; drop those already committed
    claim   one try per volume (bounded: out of tries fails it)
    batch   group the rest by output grid, mask or not and guidance
    prepare resolve masks (CPU)
    sample  one `draw()` call per batch, holding the accelerator lock
            (the only step that uses the device); the volumes come to the
            host as int16 after the lock is released
    write   every output of a volume under its attempt's own folder
    commit  the commit marker, written last and once (factory.commit)

Ray Data runs `factory.job.PIPELINE_DEPTH` (2) calls of one actor at once, so
one batch is written while the next samples: a bounded pipeline, and a call
still returns only when its volumes are committed (or failed), so Ray Data's
accounting of a batch is unchanged. A call holding a retry runs alone in its
actor (`Slots`), so a volume's later tries are never ended by another
volume's death (docs/guarantees.md).

It keeps no per-record state: everything a record needs travels with it, and
every decision (skip a committed key, write a fresh attempt, commit or lose)
is made against storage, so a restarted actor or a retried batch is safe.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from factory import commit, verify
from factory.manifest import ManifestRecord
from factory.outputs import VolumeOutput, outputs_for, write_all
from factory.records import IndexEntry, Outcome, VolumeTask
from factory.storage import Storage, local_copy, open_storage
from report2ct.labels import CTRATE_LABELS
from report2ct.pipeline import SamplingOptions, VolumeRequest

log = logging.getLogger(__name__)

# Test hook, see `_maybe_die`: "kill_before_commit=3" or "die_on_key=<key>".
FAULTS_ENV = "CTFACTORY_FAULTS"


@dataclass(frozen=True)
class WorkerOptions:
    bundle: str  # local directory or s3:// prefix
    run_root: str  # <out>/<run>
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    verify: verify.VerifyOptions | None = None  # --verify: score, redraw, flag or drop
    batch_size: int = 1
    nifti: bool = False
    preview: bool = False
    # A volume whose worker died this many times in this job (a volume that
    # kills its process, a node lost again and again) fails into the errors
    # instead of being retried forever; a rerun (a new job_id) tries again.
    max_tries: int = 4
    job_id: str = "local"
    allow_remote_code: bool = False  # the bundle's encoders may run the code they ship
    speed: dict[str, bool] = field(default_factory=dict)  # load_bundle's speed options
    extra_provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Prepared:
    """A task whose request is ready to sample (its mask resolved)."""

    task: VolumeTask
    request: VolumeRequest
    labels: dict[str, int]  # all 18 names: what the volume was asked to show
    mask_provenance: dict[str, Any] | None = None
    # --verify: filled by the sample step (factory.verify.sample_step)
    verification: dict[str, Any] = field(default_factory=dict)


class Slots:
    """The calls in flight in one actor. A call holds a shared slot, so two
    can overlap (one samples while the other writes), or the whole actor
    (`alone=True`): it waits until no other call is in flight and keeps new
    ones out until it is done. A call waiting alone goes before new shared
    ones, so a retry is not starved by the calls that keep arriving."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._shared = 0  # calls holding a shared slot
        self._alone = False  # a call holds the whole actor
        self._waiting_alone = 0
        self._waiting = 0  # calls waiting for a slot, of either kind

    @property
    def waiting(self) -> int:
        return self._waiting

    def wait_for_waiting(self, count: int, timeout: float | None = None) -> bool:
        """Block until `count` calls wait for a slot (for tests)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._waiting >= count, timeout)

    @contextmanager
    def hold(self, *, alone: bool) -> Iterator[None]:
        with self._changed:
            self._waiting += 1
            self._waiting_alone += alone
            self._changed.notify_all()
            if alone:
                self._changed.wait_for(lambda: not self._alone and self._shared == 0)
                self._alone = True
            else:
                self._changed.wait_for(lambda: not self._alone and self._waiting_alone == 0)
                self._shared += 1
            self._waiting -= 1
            self._waiting_alone -= alone
        try:
            yield
        finally:
            with self._changed:
                if alone:
                    self._alone = False
                else:
                    self._shared -= 1
                self._changed.notify_all()


def _assigned_gpus() -> list[str]:
    """The GPU ids Ray gave this actor ([] outside Ray or with none)."""
    try:
        import ray

        return [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:
        return []


def _device() -> str:
    """The GPU Ray assigned this actor (Ray sets CUDA_VISIBLE_DEVICES to it,
    so it is `cuda` here), else the CPU: never a GPU the actor did not ask
    for (Ray no longer hides those from actors that asked for none). Outside
    Ray (a notebook, a bench), any visible GPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    if _in_ray_actor():
        return "cuda" if _assigned_gpus() else "cpu"
    return "cuda"


def _in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:
        return False


def _worker_identity(device: str) -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": device,
        "gpu_ids": _assigned_gpus(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


class GenerateWorker:
    """Callable class for `Dataset.map_batches(..., compute=ActorPoolStrategy)`."""

    def __init__(self, options: WorkerOptions) -> None:
        from report2ct.bundle import load_bundle

        self.options = options
        device = _device()
        start = time.perf_counter()
        self.model = load_bundle(
            local_copy(options.bundle),
            device=device,
            allow_remote_code=options.allow_remote_code,
            **options.speed,
        )
        self.load_s = time.perf_counter() - start
        self.run = open_storage(options.run_root)
        self.outputs = outputs_for(nifti=options.nifti, preview=options.preview)
        self.identity = _worker_identity(device)
        self.model_provenance = self.model.provenance()
        control = self.model.config.control
        self.mask_classes = control.display_classes() if control is not None else {}
        # Ray Data runs PIPELINE_DEPTH calls of this actor at once
        # (factory.job): each samples under this lock, then writes, encodes,
        # uploads and commits outside it, so the next batch can sample while
        # the last one is written.
        self.accelerator = threading.Lock()
        self.slots = Slots()

    # -- Ray Data entry point --------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        tasks = []
        for text in batch["item"]:
            item = json.loads(text)
            record = ManifestRecord.model_validate(item["record"])
            tasks.extend(VolumeTask.for_record(item["line"], record))
        outcomes, todo = self._plan(tasks)
        if not todo:
            return self._results(outcomes)
        # A volume tried before in this job lost that try to a death: its
        # own, or that of a volume beside it in the actor. Every later try
        # runs alone, so only the volume itself (or its node) can end it.
        alone = any(self._tried(task) for task in todo)
        with self.slots.hold(alone=alone):
            failed, todo = self._claim(todo, alone=alone)
            outcomes.extend(failed)
            for group in self._batches(todo):
                outcomes.extend(self._generate(group))
        return self._results(outcomes)

    @staticmethod
    def _results(outcomes: list[Outcome]) -> dict[str, list[str]]:
        return {"result": [json.dumps(outcome.to_json()) for outcome in outcomes]}

    def _plan(self, tasks: list[VolumeTask]) -> tuple[list[Outcome], list[VolumeTask]]:
        """Outcomes for the tasks already committed (skipped: by an earlier
        run; generated: by an earlier try in this job), and the tasks still
        to generate."""
        done, todo = [], []
        for task in tasks:
            marker = commit.read_commit(self.run, task.key)
            if marker is not None:
                # Committed by this job: by a try whose actor died before its
                # call returned, so its outcome never reached the driver.
                mine = marker.get("job_id") == self.options.job_id
                entry = IndexEntry.from_json(marker["index"])
                done.append(Outcome.committed("generated" if mine else "skipped", task.line, entry))
            else:
                todo.append(task)
        return done, todo

    def _claim(
        self, tasks: list[VolumeTask], *, alone: bool
    ) -> tuple[list[Outcome], list[VolumeTask]]:
        """Claim a try of each task (in its slot, so a call waiting for the
        actor has claimed nothing); fail those out of tries in this job."""
        failed, todo = [], []
        for task in tasks:
            if self._claim_try(task, alone=alone) > self.options.max_tries:
                failed.append(
                    task.failed(
                        f"gave up after {self.options.max_tries} tries: the worker died during "
                        "each (see the job's log); a rerun tries again"
                    )
                )
            else:
                todo.append(task)
        return failed, todo

    def _tries_folder(self, task: VolumeTask) -> str:
        return f"_work/tries/{self.options.job_id}/{task.key}"

    def _tried(self, task: VolumeTask) -> bool:
        """Whether a try of the task was claimed before in this job."""
        return self.run.exists(f"{self._tries_folder(task)}/1")

    def _claim_try(self, task: VolumeTask, *, alone: bool) -> int:
        """Number this try of the task within this job (1, 2, ...), claimed
        with a conditional put, so concurrent and restarted workers count
        each try once. The claim says which process tried, and whether
        alone in its actor."""
        folder = self._tries_folder(task)
        claim = json.dumps({"pid": os.getpid(), "alone": alone}).encode()
        for number in range(1, self.options.max_tries + 2):
            if self.run.put_if_absent(f"{folder}/{number}", claim):
                return number
        return self.options.max_tries + 1

    def _batches(self, tasks: list[VolumeTask]) -> Iterator[list[VolumeTask]]:
        """Tasks that can sample together, `batch_size` at a time: the same
        output grid, all with masks or all without (the ControlNet runs per
        batch), the same guidance scale."""
        groups: dict[tuple, list[VolumeTask]] = {}
        default_shape = self.model.config.default_shape
        for task in tasks:
            record = task.record
            shape = tuple(record.shape or default_shape)
            groups.setdefault((shape, record.has_mask, record.guidance_scale), []).append(task)
        size = self.options.batch_size
        for group in groups.values():
            for start in range(0, len(group), size):
                yield group[start : start + size]

    # -- one batch ---------------------------------------------------------
    def _generate(self, tasks: list[VolumeTask]) -> list[Outcome]:
        """Prepare, sample, then write and commit each volume of one batch."""
        shape = tuple(tasks[0].record.shape or self.model.config.default_shape)
        ready, outcomes = self._prepare(tasks, shape)
        if not ready:
            return outcomes
        try:
            result = self._sample(ready, shape, tasks[0].record.guidance_scale)
        except Exception as error:
            log.exception("generation failed for %s", [item.task.key for item in ready])
            return outcomes + [item.task.failed(_reason(error)) for item in ready]
        per_volume = {name: value / len(ready) for name, value in result.timings_s.items()}
        for item, volume in zip(ready, result.volumes_hu, strict=True):
            try:
                outcomes.append(self._write_and_commit(item, volume, result.sampler, per_volume))
            except Exception as error:
                log.exception("writing %s failed", item.task.key)
                outcomes.append(item.task.failed(_reason(error)))
        return outcomes

    def _sample(self, ready: list[Prepared], shape, guidance: float | None):
        """One `draw()` for the batch, holding the accelerator: the only step
        that uses the device (another call writes meanwhile). The volumes
        come to the host (int16) after the lock is released, while the next
        batch samples; --verify scores them on the device, so it finishes
        them inside."""
        from report2ct.pipeline import draw

        sampling = self.options.sampling

        def drawn(requests: list[VolumeRequest]):
            return draw(
                self.model,
                requests,
                shape=shape,
                num_steps=sampling.num_steps,
                guidance_scale=sampling.guidance_scale if guidance is None else guidance,
                precision=sampling.precision,
                method=sampling.method,
            )

        if self.options.verify is None:
            with self.accelerator:
                result = drawn([item.request for item in ready])
            return result.finish()
        with self.accelerator:
            # --verify: score, redraw failures with derived seeds (factory.verify)
            return verify.sample_step(
                lambda requests: drawn(requests).finish(),
                ready,
                self.options.verify,
                self.model.device,
            )

    def _prepare(self, tasks: list[VolumeTask], shape) -> tuple[list[Prepared], list[Outcome]]:
        """The requests of the tasks whose mask (if any) resolved on the
        output grid, and failures (with the reason) for the rest."""
        from factory.masks import resolve_mask

        config = self.model.config
        ready, failed = [], []
        for task in tasks:
            record = task.record
            spacing = tuple(record.spacing_mm or config.default_spacing_mm)
            request = VolumeRequest(
                seed=task.seed,
                findings=record.findings,
                impression=record.impression,
                labels=record.labels if config.label_condition else None,
                spacing_mm=spacing,
            )
            labels, mask_provenance = dict(record.labels), None
            if record.has_mask:
                try:
                    mask = resolve_mask(record, task.seed, shape, spacing, config.control)
                except Exception as error:
                    log.warning("mask of %s refused: %s", record.id, error)
                    failed.append(task.failed(f"ValueError: mask: {error}"))
                    continue
                # A phantom mask says which findings it drew: those are the labels.
                labels = mask.labels if mask.labels is not None else labels
                request = dataclasses.replace(
                    request,
                    mask=mask.values,
                    mask_index=mask.index,
                    labels=labels if config.label_condition else None,
                )
                mask_provenance = mask.provenance
            all_labels = {name: int(labels.get(name, 0)) for name in CTRATE_LABELS}
            ready.append(Prepared(task, request, all_labels, mask_provenance))
        return ready, failed

    # -- one volume: write, then commit --------------------------------------
    def _write_and_commit(
        self, item: Prepared, volume: np.ndarray, sampler: dict, timings: dict[str, float]
    ) -> Outcome:
        task, record = item.task, item.task.record
        seed, verification = verify.delivered(
            task.key, item.verification, self.options.verify, task.seed
        )
        start = time.perf_counter()
        attempt = commit.new_attempt()
        prefix = commit.attempt_prefix(task.key, attempt)
        provenance = {
            **self.model_provenance,
            "sampler": sampler,
            "seed": seed,
            "record": record.model_dump(mode="json"),
            "report": {"findings": record.findings, "impression": record.impression},
            "labels": item.labels,
            "mask": item.mask_provenance,
            "worker": self.identity,
            "timings_s": timings,
            "attempt": attempt,
            **self.options.extra_provenance,
        }
        output = VolumeOutput(
            key=task.key,
            title=record.id,
            volume_xyz=volume,
            spacing_mm=item.request.spacing_mm,
            attributes={
                "provenance": provenance,
                "labels": item.labels,
                **({"verification": verification} if verification else {}),
            },
            mask_xyz=item.request.mask,
            mask_classes=self.mask_classes,
        )
        written = write_all(self.outputs, self.run, prefix, output)
        entry = IndexEntry(
            id=record.id,
            sample=task.sample,
            key=task.key,
            labels=item.labels,
            seed=seed,
            spacing_mm=item.request.spacing_mm,
            shape=tuple(volume.shape),
            findings=record.findings,
            impression=record.impression,
            timings_s={**timings, "write": time.perf_counter() - start},
            verification=verification,
            **written.index,
        )
        _maybe_die(self.run, task.key)
        return self._commit(task, attempt, prefix, written.files, entry)

    def _commit(
        self, task: VolumeTask, attempt: str, prefix: str, files: dict[str, str], entry: IndexEntry
    ) -> Outcome:
        marker = {
            "key": task.key,
            "attempt": attempt,
            "job_id": self.options.job_id,
            "files": files,
            "index": entry.to_json(),
            "worker": self.identity,
            "committed_at": time.time(),
        }
        if not commit.try_commit(self.run, task.key, marker):
            winner = commit.read_commit(self.run, task.key)
            if winner["attempt"] != attempt:
                # Another attempt (a retry of this batch elsewhere) won: ours never counted.
                self.run.delete_prefix(prefix)
                return Outcome.committed(
                    "skipped", task.line, IndexEntry.from_json(winner["index"])
                )
            # Our own put landed but its answer was lost (a retry then saw 412): ours counts.
        return Outcome.committed("generated", task.line, entry)


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _maybe_die(run: Storage, key: str) -> None:
    """Fault injection for tests, after writing a volume and before
    committing it, the whole process dying as a preempted node would:
    CTFACTORY_FAULTS=kill_before_commit=N kills up to N workers of the job
    (each kill claimed with a conditional put, so exactly N per run);
    CTFACTORY_FAULTS=die_on_key=K kills every worker that writes volume K (a
    volume that always takes its process down)."""
    kind, _, value = os.environ.get(FAULTS_ENV, "").partition("=")
    if kind == "die_on_key" and value == key:
        log.warning("fault injection: worker %d dies writing %s", os.getpid(), key)
        os._exit(137)
    if kind != "kill_before_commit":
        return
    for number in range(int(value)):
        if run.put_if_absent(f"_work/faults/kill-{number}", str(os.getpid()).encode()):
            log.warning(
                "fault injection: worker %d dies before commit (kill %d)", os.getpid(), number
            )
            os._exit(137)
