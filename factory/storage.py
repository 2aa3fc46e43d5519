"""One small storage interface over local directories and s3:// prefixes.

`Storage` is the protocol every caller annotates with; `open_storage(uri)` is
the one place that looks at a URI's scheme and picks the implementation
(`LocalStorage` for a path or file://, `S3Storage` for s3://). Callers that
need a real directory ask `local_path()` (None on object storage) instead of
parsing URIs themselves.

S3 goes through boto3 with the standard AWS settings (AWS_ENDPOINT_URL,
credentials chain, region), so the same code talks to AWS, MinIO or moto's
server. Transient failures (connection errors, timeouts, 5xx, throttling) are
retried with bounded exponential backoff and logged; nothing here ever logs
credentials or signed URLs (URIs are `s3://bucket/key` only).

The one operation with real semantics is `put_if_absent`: S3's conditional
write (`If-None-Match: *`) or an atomic create-once (`os.link`) locally. The
commit protocol is built on it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from zarr.abc.store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ATTEMPTS = 8  # ~1 + 2 + 4 + 8 + 8 + 8 + 8 s: rides out a short endpoint outage
RETRY_MAX_SLEEP_S = 8.0
# Files of one volume move concurrently; below botocore's default pool of 10
# connections per client, so threads never wait for a connection.
TRANSFER_THREADS = 8
LINE_CHUNK_BYTES = 1 << 20
S3_SCHEME = "s3://"
FILE_SCHEME = "file://"


class StorageError(RuntimeError):
    pass


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


@runtime_checkable
class Storage(Protocol):
    """Byte-level access to keys under one root (a local directory or an S3
    prefix). Keys are '/'-separated and relative to the root."""

    @property
    def root(self) -> str: ...

    def uri(self, key: str) -> str:
        """The URI of `key` (the root itself for "")."""
        ...

    def local_path(self) -> Path | None:
        """The root as a local directory; None for object storage."""
        ...

    def read_bytes(self, key: str) -> bytes: ...

    def write_bytes(self, key: str, data: bytes) -> None:
        """Replace `key` atomically: a reader sees the old or the new bytes."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if it does not exist; False if it already did.
        A retried create whose first answer was lost also reads False: the
        caller tells its own object from another's by reading it."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under `prefix` (the object itself, or everything below it as a
        directory), recursively, relative to the root, sorted."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under `prefix`; returns the number of objects."""
        ...

    def upload_dir(self, local_dir: Path, key: str) -> dict[str, str]:
        """Copy a local directory tree under `key`; returns {relative path: sha256}."""
        ...

    def download_prefix(self, key: str, local_dir: Path) -> None:
        """Copy everything under `key` into `local_dir`, keeping relative paths."""
        ...

    def iter_lines(self, key: str = "") -> Iterator[bytes]:
        """Raw lines (bytes, without LF or CRLF) streamed from an object: a
        multi-GB manifest never sits whole in memory."""
        ...

    def zarr_store(self, key: str = "", *, mode: str = "r") -> Store:
        """A zarr store over the group at `key`."""
        ...


def _parallel(call: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
    """`call` over `items` on a few threads (results in order; the first
    error propagates after the others finish)."""
    items = list(items)
    if len(items) <= 1:
        return [call(item) for item in items]
    with ThreadPoolExecutor(min(TRANSFER_THREADS, len(items))) as pool:
        return list(pool.map(call, items))


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines of a byte stream split on LF, each without its LF or CRLF; one
    rule for every backend, so line numbers in errors never depend on where
    a manifest is stored."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r")
    if pending:
        yield pending.removesuffix(b"\r")


def _relative(key: str, prefix: str) -> str:
    return key[len(prefix.rstrip("/")) + 1 :] if prefix else key


class _Transfers:
    """What both backends build from their single-object operations."""

    def uri(self, key: str) -> str:
        return join(self.root, key) if key else self.root

    def upload_dir(self, local_dir: Path, key: str) -> dict[str, str]:
        paths = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())

        def upload(path: Path) -> tuple[str, str]:
            relative = path.relative_to(local_dir).as_posix()
            data = path.read_bytes()
            self.write_bytes(join(key, relative) if key else relative, data)
            return relative, hashlib.sha256(data).hexdigest()

        return dict(_parallel(upload, paths))

    def download_prefix(self, key: str, local_dir: Path) -> None:
        def download(item: str) -> None:
            target = Path(local_dir) / _relative(item, key)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(item))

        _parallel(download, self.list(key))


@dataclass(frozen=True)
class LocalStorage(_Transfers):
    """Keys are files under a local directory."""

    root: str

    def _path(self, key: str) -> Path:
        return Path(self.uri(key))

    def local_path(self) -> Path:
        return Path(self.root)

    def _scratch_for(self, path: Path) -> Path:
        # Hidden (list skips it) and unique per call, so concurrent writers of
        # one key never share a temporary file.
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        return Path(name)

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._scratch_for(path)
        try:
            tmp.write_bytes(data)
            tmp.replace(path)  # atomic: a reader never sees half a file
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._scratch_for(path)
        try:
            tmp.write_bytes(data)
            os.link(tmp, path)  # fails if path exists: an atomic create-once
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix)
        if base.is_file():
            yield prefix
        elif base.is_dir():
            root = Path(self.root)
            # Sorted as strings, as S3 lists, not as path parts.
            yield from sorted(
                path.relative_to(root).as_posix()
                for path in base.rglob("*")
                if path.is_file() and not path.name.startswith(".")
            )

    def delete_prefix(self, prefix: str) -> int:
        path = self._path(prefix)
        if not path.exists():
            return 0
        if not path.is_dir():
            path.unlink()
            return 1
        count = sum(1 for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path)
        return count

    def iter_lines(self, key: str = "") -> Iterator[bytes]:
        with open(self._path(key), "rb") as handle:
            yield from _split_lines(iter(lambda: handle.read(LINE_CHUNK_BYTES), b""))

    def zarr_store(self, key: str = "", *, mode: str = "r") -> Store:
        from zarr.storage import LocalStore

        return LocalStore(self._path(key), read_only=mode == "r")


@dataclass(frozen=True)
class S3Storage(_Transfers):
    """Keys are objects under an s3://bucket/prefix."""

    root: str

    def __post_init__(self) -> None:
        self._split("")  # fail on a URI without a bucket now, not at first use

    def _split(self, key: str) -> tuple[str, str]:
        bucket, _, name = self.uri(key).removeprefix(S3_SCHEME).partition("/")
        if not bucket:
            raise StorageError(f"{self.uri(key)}: no bucket in the S3 URI")
        return bucket, name

    def local_path(self) -> None:
        return None

    def read_bytes(self, key: str) -> bytes:
        bucket, name = self._split(key)
        return with_retries(
            f"read {self.uri(key)}",
            lambda: s3_client().get_object(Bucket=bucket, Key=name)["Body"].read(),
        )

    def write_bytes(self, key: str, data: bytes) -> None:
        bucket, name = self._split(key)
        with_retries(
            f"write {self.uri(key)}",
            lambda: s3_client().put_object(Bucket=bucket, Key=name, Body=data),
        )

    def put_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        bucket, name = self._split(key)

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
        from botocore.exceptions import ClientError

        bucket, name = self._split(key)

        def head() -> bool:
            try:
                s3_client().head_object(Bucket=bucket, Key=name)
                return True
            except ClientError as error:
                if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return False
                raise

        return with_retries(f"stat {self.uri(key)}", head)

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[str]:
        bucket, name = self._split(prefix)
        root_key = self._split("")[1].rstrip("/")
        # S3 prefixes match strings; keep only the object itself and what lies
        # below it as a directory, as a local listing does ("a" never lists "ab").
        below = name.rstrip("/") + "/" if name else ""
        token = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": name, "MaxKeys": page_size}
            if token:
                kwargs["ContinuationToken"] = token
            page = with_retries(
                f"list {self.uri(prefix)}", lambda kw=kwargs: s3_client().list_objects_v2(**kw)
            )
            for item in page.get("Contents", []):
                key = item["Key"]
                if key == name or key.startswith(below):
                    yield _relative(key, root_key)
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def delete_prefix(self, prefix: str) -> int:
        bucket, _ = self._split("")
        keys = [self._split(k)[1] for k in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            with_retries(
                f"delete {self.uri(prefix)}",
                lambda c=chunk: s3_client().delete_objects(Bucket=bucket, Delete={"Objects": c}),
            )
        return len(keys)

    def iter_lines(self, key: str = "") -> Iterator[bytes]:
        bucket, name = self._split(key)
        body = with_retries(
            f"read {self.uri(key)}", lambda: s3_client().get_object(Bucket=bucket, Key=name)["Body"]
        )
        yield from _split_lines(body.iter_chunks(LINE_CHUNK_BYTES))

    def zarr_store(self, key: str = "", *, mode: str = "r") -> Store:
        if mode != "r":
            raise StorageError(f"{self.uri(key)}: zarr on S3 is read-only here")
        from zarr.storage import FsspecStore

        # Lazy, through fsspec's S3 (s3fs, a maintained zarr backend): a
        # region read fetches the shard index and the chunks it needs with
        # ranged GETs, never the whole volume. The endpoint and credentials
        # come from the same standard AWS settings as the factory's client.
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        options = {"endpoint_url": endpoint} if endpoint else {}
        return FsspecStore.from_url(self.uri(key), read_only=True, storage_options=options)


def open_storage(uri: str) -> Storage:
    """The storage rooted at `uri`: S3 for s3://, a local directory for a path
    or file://. The only place in the code base that reads a URI's scheme."""
    if uri.startswith(S3_SCHEME):
        return S3Storage(uri)
    if uri.startswith(FILE_SCHEME):
        return LocalStorage(uri.removeprefix(FILE_SCHEME))
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported storage (give a local path, file:// or s3://)")
    return LocalStorage(uri)


def storage_for(uri: str) -> tuple[Storage, str]:
    """(storage rooted at the parent, key) for a single object's URI."""
    base, slash, name = uri.rstrip("/").rpartition("/")
    return open_storage(base or slash or "."), name


def local_copy(uri: str) -> Path:
    """A local directory holding what `uri` holds: the directory itself, or a
    download cached per node under $CTFACTORY_CACHE (default
    ~/.cache/ct-factory)/bundles/<hash>. The download is made once per node:
    concurrent first callers wait on a lock, and it lands with a rename, so a
    process killed mid-download never leaves a partial copy in place."""
    import fcntl

    storage = open_storage(uri)
    local = storage.local_path()
    if local is not None:
        return local
    cache = Path(os.environ.get("CTFACTORY_CACHE", Path.home() / ".cache" / "ct-factory"))
    name = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache / "bundles" / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if target.is_dir():  # another process on this node finished first
            return target
        for stale in target.parent.glob(f".{name}.partial-*"):  # killed mid-download
            shutil.rmtree(stale, ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}.partial-"))
        try:
            storage.download_prefix("", scratch)
            scratch.rename(target)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return target
