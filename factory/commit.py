"""Exactly-once outputs on storage that has no rename.

Layout of a run (`<out>/<run>/`):

    volumes/<key>/<attempt>/            everything one attempt wrote, never shared
    commits/<key>.json                  the commit marker: written last, once
    index/  errors/  summary.json       (factory.index)

An attempt writes its volume under its own fresh prefix, then tries to create
the commit marker with a conditional put (S3 `If-None-Match: *`, O_EXCL
locally). Exactly one attempt per key wins; a loser deletes its own prefix.
Readers, the index and reruns trust only committed outputs, so a worker killed
between writing and committing leaves an invisible leftover, which `cleanup`
removes. (An S3 prefix cannot be renamed atomically, which is why the final
path names the attempt instead of being `<run>/<id>.ome.zarr`.)
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from factory.storage import Storage

VOLUMES = "volumes"
COMMITS = "commits"


def volume_key(record_id: str, sample: int, num_samples: int) -> str:
    """One output volume's key: the id, or `<id>~<k>` for several samples
    ('~' cannot occur in an id, so keys never collide)."""
    return record_id if num_samples == 1 else f"{record_id}~{sample}"


def new_attempt() -> str:
    return uuid.uuid4().hex[:16]


def attempt_prefix(key: str, attempt: str) -> str:
    return f"{VOLUMES}/{key}/{attempt}"


def commit_path(key: str) -> str:
    return f"{COMMITS}/{key}.json"


def read_commit(run: Storage, key: str) -> dict[str, Any] | None:
    if not run.exists(commit_path(key)):
        return None
    return json.loads(run.read_bytes(commit_path(key)))


def try_commit(run: Storage, key: str, marker: dict[str, Any]) -> bool:
    """Create the commit marker; False if another attempt committed first."""
    data = json.dumps(marker, sort_keys=True).encode()
    return run.put_if_absent(commit_path(key), data)


def committed_attempts(run: Storage) -> dict[str, str]:
    """{key: winning attempt} for every commit marker in the run."""
    out = {}
    for name in run.list(COMMITS + "/"):
        if name.endswith(".json"):
            marker = json.loads(run.read_bytes(name))
            out[marker["key"]] = marker["attempt"]
    return out


def find_leftovers(run: Storage) -> list[str]:
    """Attempt prefixes that no commit marker names (killed or lost attempts)."""
    winners = committed_attempts(run)
    leftovers = set()
    for name in run.list(VOLUMES + "/"):
        parts = name.split("/")
        if len(parts) < 3:
            continue
        key, attempt = parts[1], parts[2].split(".", 1)[0]
        if winners.get(key) != attempt:
            leftovers.add(f"{VOLUMES}/{key}/{parts[2]}")
    return sorted(leftovers)


def cleanup(run: Storage) -> dict[str, int]:
    """Delete uncommitted leftovers and the run's scratch space."""
    removed = sum(run.delete_prefix(prefix) for prefix in find_leftovers(run))
    scratch = run.delete_prefix("_work")
    return {"leftover_objects_removed": removed, "scratch_objects_removed": scratch}
