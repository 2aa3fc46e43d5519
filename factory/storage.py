"""One small storage interface over local paths and s3:// URIs.

S3 goes through boto3 with the standard AWS settings (AWS_ENDPOINT_URL,
credentials chain, region), so the same code talks to AWS, MinIO or moto's
server. Transient failures (connection errors, timeouts, 5xx, throttling) are
retried with bounded exponential backoff and logged; nothing here ever logs
credentials or signed URLs (URIs are `s3://bucket/key` only).

The one operation with real semantics is `put_if_absent`: S3's conditional
write (`If-None-Match: *`) or an O_EXCL create locally. The commit protocol is
built on it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ATTEMPTS = 8  # ~1 + 2 + 4 + 8 + 8 + 8 + 8 s: rides out a short endpoint outage
RETRY_MAX_SLEEP_S = 8.0


class StorageError(RuntimeError):
    pass


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the S3 URI")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', for local paths and s3:// alike."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _is_transient(error: Exception) -> bool:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(
        error,
        EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError | ConnectionClosedError,
    ):
        return True
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = error.response.get("Error", {}).get("Code", "")
        return status >= 500 or code in {
            "SlowDown",
            "Throttling",
            "RequestTimeout",
            "InternalError",
        }
    return isinstance(error, ConnectionError | TimeoutError)


def with_retries(what: str, call: Callable[[], T], *, attempts: int = RETRY_ATTEMPTS) -> T:
    """Run `call`, retrying transient failures with exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:
            if attempt == attempts or not _is_transient(error):
                raise
            sleep_s = min(RETRY_MAX_SLEEP_S, 0.5 * 2 ** (attempt - 1))
            log.warning(
                "%s: transient error (%s), retry %d/%d in %.1f s",
                what,
                type(error).__name__,
                attempt,
                attempts - 1,
                sleep_s,
            )
            time.sleep(sleep_s)
    raise AssertionError("unreachable")


_clients: dict[int, object] = {}


def s3_client():
    """One boto3 client per process (thread-safe), with short timeouts so an
    unreachable endpoint fails fast into our retry loop."""
    pid = os.getpid()
    if pid not in _clients:
        import boto3
        from botocore.config import Config

        _clients[pid] = boto3.client(
            "s3",
            config=Config(
                connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"}
            ),
        )
    return _clients[pid]


@dataclass(frozen=True)
class Storage:
    """Byte-level access to keys under one root URI (local dir or s3 prefix)."""

    root: str

    @property
    def remote(self) -> bool:
        return is_s3(self.root)

    def uri(self, key: str) -> str:
        return join(self.root, key) if key else self.root

    def _local(self, key: str) -> Path:
        return Path(self.uri(key))

    # --- whole objects -------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        if not self.remote:
            return self._local(key).read_bytes()
        bucket, name = split_s3(self.uri(key))
        return with_retries(
            f"read {self.uri(key)}",
            lambda: s3_client().get_object(Bucket=bucket, Key=name)["Body"].read(),
        )

    def write_bytes(self, key: str, data: bytes) -> None:
        if not self.remote:
            path = self._local(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(path)  # atomic: a reader never sees half a file
            return
        bucket, name = split_s3(self.uri(key))
        with_retries(
            f"write {self.uri(key)}",
            lambda: s3_client().put_object(Bucket=bucket, Key=name, Body=data),
        )

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if it does not exist; False if it already did."""
        if not self.remote:
            path = self._local(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_bytes(data)
            try:
                os.link(tmp, path)  # fails if path exists: an atomic create-once
                return True
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
        from botocore.exceptions import ClientError

        bucket, name = split_s3(self.uri(key))

        def put() -> bool:
            try:
                s3_client().put_object(Bucket=bucket, Key=name, Body=data, IfNoneMatch="*")
                return True
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                if code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                    return False
                raise

        return with_retries(f"conditional write {self.uri(key)}", put)

    def exists(self, key: str) -> bool:
        if not self.remote:
            return self._local(key).exists()
        from botocore.exceptions import ClientError

        bucket, name = split_s3(self.uri(key))

        def head() -> bool:
            try:
                s3_client().head_object(Bucket=bucket, Key=name)
                return True
            except ClientError as error:
                if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return False
                raise

        return with_retries(f"stat {self.uri(key)}", head)

    # --- prefixes ------------------------------------------------------
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys (relative to root) under `prefix`, recursively, sorted for S3."""
        if not self.remote:
            base = self._local(prefix)
            if base.is_file():
                yield prefix
            elif base.is_dir():
                root = Path(self.root)
                for path in sorted(base.rglob("*")):
                    if path.is_file() and not path.name.startswith("."):
                        yield path.relative_to(root).as_posix()
            return
        bucket, name = split_s3(self.uri(prefix))
        root_key = split_s3(self.root)[1].rstrip("/")
        token = None
        while True:
            kwargs = {"Bucket": bucket, "Prefix": name}
            if token:
                kwargs["ContinuationToken"] = token
            page = with_retries(
                f"list {self.uri(prefix)}", lambda kw=kwargs: s3_client().list_objects_v2(**kw)
            )
            for item in page.get("Contents", []):
                key = item["Key"]
                yield key[len(root_key) + 1 :] if root_key else key
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under `prefix`; returns the number of objects."""
        if not self.remote:
            path = self._local(prefix)
            if not path.exists():
                return 0
            count = sum(1 for p in path.rglob("*") if p.is_file()) if path.is_dir() else 1
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            return count
        bucket, _ = split_s3(self.root)
        keys = [split_s3(self.uri(k))[1] for k in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            with_retries(
                f"delete {self.uri(prefix)}",
                lambda c=chunk: s3_client().delete_objects(Bucket=bucket, Delete={"Objects": c}),
            )
        return len(keys)

    def upload_dir(self, local_dir: Path, key: str) -> dict[str, str]:
        """Copy a local directory tree under `key`; returns {relative path: sha256}."""
        import hashlib

        sums = {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            relative = path.relative_to(local_dir).as_posix()
            data = path.read_bytes()
            sums[relative] = hashlib.sha256(data).hexdigest()
            self.write_bytes(join(key, relative) if key else relative, data)
        return sums

    def download_prefix(self, key: str, local_dir: Path) -> None:
        for item in self.list(key):
            relative = item[len(key.rstrip("/")) + 1 :] if key else item
            target = local_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(item))

    # --- streaming text ------------------------------------------------
    def iter_lines(self, key: str = "") -> Iterator[bytes]:
        """Raw lines (bytes, without the newline) streamed from an object or
        file: a multi-GB manifest never sits whole in memory."""
        if not self.remote:
            with open(self._local(key), "rb") as handle:
                for line in handle:
                    yield line.rstrip(b"\r\n")
            return
        bucket, name = split_s3(self.uri(key))
        body = with_retries(
            f"read {self.uri(key)}", lambda: s3_client().get_object(Bucket=bucket, Key=name)["Body"]
        )
        for line in body.iter_lines(chunk_size=1 << 20, keepends=False):
            yield line


def storage_for(uri: str) -> tuple[Storage, str]:
    """(storage rooted at the parent, key) for a single object's URI."""
    base, _, name = uri.rstrip("/").rpartition("/")
    return Storage(base or "."), name
