"""Submit job specs to a Ray cluster through Ray's Job Submission API.

The submission id is derived from the spec's canonical JSON, so submitting the
same spec twice is one job: the second call finds the first and reports it.
Re-running a job that failed or was stopped is an explicit choice (`retry`),
and safe, since the factory and the trainer resume where they stopped.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.storage import open_storage
from jobs.specs import EvaluateSpec, GenerateSpec, ShardSpec, TrainSpec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
Spec = GenerateSpec | TrainSpec | EvaluateSpec | ShardSpec
URI_FIELDS = ("manifest", "output", "bundle", "data", "generated", "reference", "deepspeed_config")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class Submission:
    submission_id: str
    status: str
    created: bool  # False when an identical job already existed


def submission_id(spec: Spec, *, attempt: int = 0) -> str:
    base = f"ctfactory-{spec.kind}-{spec.digest()[:16]}"
    return base if attempt == 0 else f"{base}-retry{attempt}"


def entrypoint(spec: Spec, *, log_format: str = "text") -> str:
    """The shell command the job runs on the head node: the job kind's thin
    entry module, with the whole spec inline (no file to ship)."""
    command = f"python -m jobs.{spec.kind} --spec-json {shlex.quote(spec.canonical_json())}"
    return command if log_format == "text" else f"{command} --log-format {log_format}"


def summary_uri(spec: Spec) -> str | None:
    """Where a job keeps its live summary (generate jobs), for `status`."""
    if isinstance(spec, GenerateSpec):
        return f"{spec.output.rstrip('/')}/{spec.run_name()}/summary.json"
    return None


def absolutize(spec: Spec, *, base: Path) -> Spec:
    """Make relative local paths absolute (against `base`), so the job means
    the same files wherever its driver starts. s3:// URIs are left alone."""
    updates: dict[str, Any] = {}
    for name in URI_FIELDS:
        value = getattr(spec, name, None)
        local = isinstance(value, str) and open_storage(value).local_path() is not None
        if local and not Path(value).is_absolute():
            updates[name] = str((base / value).resolve())
    return spec.model_copy(update=updates) if updates else spec


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _existing_status(client, job_id: str) -> str | None:
    try:
        return str(client.get_job_info(job_id).status)
    except RuntimeError as error:
        # The SDK raises RuntimeError for an unknown id (HTTP 404) and for a
        # failed request alike; only the first means "not submitted yet".
        if "404" in str(error):
            return None
        raise


def submit(
    spec: Spec,
    *,
    address: str = DEFAULT_ADDRESS,
    retry: bool = False,
    runtime_env: dict[str, Any] | None = None,
    agent_wait_s: float = 60.0,
    log_format: str = "text",
) -> Submission:
    """Submit `spec` once. An identical spec already submitted is returned as
    is; with `retry`, a failed or stopped one is submitted again under the
    next attempt id (a running or succeeded one never is). A cluster whose job
    agent is still starting is waited for, up to `agent_wait_s`."""
    client = _client(address)
    attempt = 0
    while True:
        job_id = submission_id(spec, attempt=attempt)
        status = _existing_status(client, job_id)
        if status is None:
            break
        if not retry or status not in {"FAILED", "STOPPED"}:
            return Submission(job_id, status, created=False)
        attempt += 1
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            metadata = {"ctfactory.kind": spec.kind, "ctfactory.spec_sha256": spec.digest()}
            if summary_uri(spec):
                metadata["ctfactory.summary"] = summary_uri(spec)
            client.submit_job(
                entrypoint=entrypoint(spec, log_format=log_format),
                submission_id=job_id,
                runtime_env=runtime_env,
                metadata=metadata,
            )
            break
        except RuntimeError as error:
            if "already exists" in str(error):
                # Two submitters raced: the other one created it, which is the same job.
                return Submission(job_id, str(client.get_job_info(job_id).status), created=False)
            # A head that has just started answers before its job agent is up
            # (HTTP 500 "No available agent"): wait for it rather than fail.
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    return Submission(job_id, str(client.get_job_info(job_id).status), created=True)


def status(job_id: str, *, address: str = DEFAULT_ADDRESS) -> dict[str, Any]:
    """The job's status, its exit code once it ended, and for a generate job
    its live summary (counts, rate, ETA) as the job last wrote it."""
    info = _client(address).get_job_info(job_id)
    out = {
        "submission_id": job_id,
        "status": str(info.status),
        "exit_code": exit_code(info),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "metadata": info.metadata,
    }
    uri = (info.metadata or {}).get("ctfactory.summary")
    if uri:
        out["summary"] = _read_summary(uri)
    return out


def _read_summary(uri: str) -> dict[str, Any] | None:
    from factory.storage import storage_for

    store, key = storage_for(uri)
    if not store.exists(key):
        return None  # not written yet: the job is still validating
    summary = json.loads(store.read_bytes(key))
    keep = ("state", "counts", "volumes_per_hour", "eta_s", "exit_code", "index", "errors")
    return {name: summary[name] for name in keep if name in summary}


def exit_code(info) -> int | None:
    """The job's exit code, the same as the CLI's and the entry module's (0
    all done, 3 partial, 2 could not run); None while it runs."""
    state = str(info.status)
    if state not in TERMINAL:
        return None
    if state == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if code in (2, 3) else 2  # stopped, or died some other way: it did not run


def logs(job_id: str, *, address: str = DEFAULT_ADDRESS) -> str:
    return _client(address).get_job_logs(job_id)


def follow_logs(job_id: str, *, address: str = DEFAULT_ADDRESS) -> Iterator[str]:
    """The job's log as it is written, until the job ends (the SDK's tail is
    async; it is stepped here on a loop of its own)."""
    import asyncio

    loop = asyncio.new_event_loop()
    chunks = _client(address).tail_job_logs(job_id).__aiter__()
    try:
        while True:
            try:
                yield loop.run_until_complete(chunks.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def wait(
    job_id: str,
    *,
    address: str = DEFAULT_ADDRESS,
    timeout_s: float | None = None,
    poll_s: float = 2.0,
) -> Any:
    """Block until the job reaches a terminal status (no limit unless
    `timeout_s`); returns its JobInfo."""
    client = _client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while deadline is None or time.monotonic() < deadline:
        info = client.get_job_info(job_id)
        if str(info.status) in TERMINAL:
            return info
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} not finished after {timeout_s:.0f} s")
