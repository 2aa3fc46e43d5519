"""The storage contract, run alike against a local directory and a real S3
endpoint (moto's server): what the commit protocol, the reader and the jobs
rely on, whichever backend `open_storage` picks."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr

from factory import storage
from factory.storage import (
    LocalStorage,
    S3Storage,
    Storage,
    StorageError,
    local_copy,
    open_storage,
    storage_for,
    with_retries,
)


@pytest.fixture
def fresh_s3_client(monkeypatch):
    # The per-process client caches its endpoint: make one for this test's.
    monkeypatch.setattr(storage, "_clients", {})


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    request.getfixturevalue("fresh_s3_client")
    return open_storage(f"s3://{bucket}/root")


@pytest.fixture
def s3_root(s3_bucket, fresh_s3_client) -> str:
    return f"s3://{s3_bucket}/root"


def test_open_storage_picks_the_implementation_by_scheme(tmp_path):
    assert type(open_storage("s3://bucket/prefix")) is S3Storage
    assert type(open_storage(str(tmp_path))) is LocalStorage
    assert type(open_storage("relative/dir")) is LocalStorage
    via_file = open_storage(f"file://{tmp_path}")
    assert type(via_file) is LocalStorage and via_file.local_path() == tmp_path
    assert open_storage(str(tmp_path)).local_path() == tmp_path
    assert open_storage("s3://bucket/prefix").local_path() is None
    with pytest.raises(StorageError):
        open_storage("gs://bucket/prefix")
    with pytest.raises(StorageError):
        open_storage("s3://")


def test_storage_for_splits_an_object_uri():
    for uri, root, key in [
        ("s3://b/run/index.jsonl", "s3://b/run", "index.jsonl"),
        ("/data/m.jsonl", "/data", "m.jsonl"),
        ("/m.jsonl", "/", "m.jsonl"),
        ("m.jsonl", ".", "m.jsonl"),
        ("file:///data/m.nii.gz", "/data", "m.nii.gz"),
    ]:
        store, name = storage_for(uri)
        assert (store.root, name) == (root, key), uri
    store, name = storage_for("/m.jsonl")
    assert store.uri(name) == "/m.jsonl"


def test_round_trip(store):
    assert isinstance(store, Storage)
    assert not store.exists("a/b.bin")
    store.write_bytes("a/b.bin", b"\x00one")
    store.write_bytes("a/b.bin", b"\x00two")  # a plain write replaces
    assert store.exists("a/b.bin") and store.read_bytes("a/b.bin") == b"\x00two"
    assert store.uri("a/b.bin") == f"{store.root}/a/b.bin" and store.uri("") == store.root


def test_list_is_recursive_relative_and_sorted_as_strings(store):
    for key in ["b", "a/c/d", "a-c", "a/b", "ab/x"]:
        store.write_bytes(key, key.encode())
    assert list(store.list()) == ["a-c", "a/b", "a/c/d", "ab/x", "b"]
    assert list(store.list("a")) == ["a/b", "a/c/d"]  # a directory, never the "a-c" string
    assert list(store.list("a/")) == ["a/b", "a/c/d"]
    assert list(store.list("a/b")) == ["a/b"]  # an object lists itself
    assert list(store.list("missing")) == []


@pytest.mark.integration
def test_s3_list_follows_continuation_pages(s3_root, monkeypatch):
    store = open_storage(s3_root)
    keys = [f"k/{i:02d}" for i in range(7)]
    for key in reversed(keys):
        store.write_bytes(key, b"x")
    client, pages = storage.s3_client(), []
    original = client.list_objects_v2

    def counted(**kwargs):
        pages.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(client, "list_objects_v2", counted)
    assert list(store.list("k", page_size=3)) == keys
    assert len(pages) == 3 and "ContinuationToken" in pages[-1]


def test_put_if_absent_creates_once(store):
    assert store.put_if_absent("commits/k.json", b"first") is True
    assert store.put_if_absent("commits/k.json", b"second") is False
    assert store.read_bytes("commits/k.json") == b"first"
    assert list(store.list("commits")) == ["commits/k.json"]  # no temporary files left


def test_concurrent_put_if_absent_has_one_winner(store):
    barrier = threading.Barrier(6)

    def attempt(i: int) -> bool:
        barrier.wait()
        return store.put_if_absent("commits/race.json", f"attempt {i}".encode())

    with ThreadPoolExecutor(6) as pool:
        wins = list(pool.map(attempt, range(6)))
    assert wins.count(True) == 1
    assert store.read_bytes("commits/race.json") == f"attempt {wins.index(True)}".encode()


@pytest.mark.integration
def test_s3_conditional_put_whose_answer_was_lost_reads_false(s3_root, monkeypatch):
    """The retry of a put that succeeded but whose answer never came back sees
    412: put_if_absent says False, and the object is ours (the worker reads
    the marker to tell)."""
    from botocore.exceptions import EndpointConnectionError

    monkeypatch.setattr(storage.time, "sleep", lambda _s: None)
    store = open_storage(s3_root)
    client = storage.s3_client()
    original, calls = client.put_object, []

    def lose_first_answer(**kwargs):
        calls.append(kwargs)
        answer = original(**kwargs)
        if len(calls) == 1:
            raise EndpointConnectionError(endpoint_url="http://lost")
        return answer

    monkeypatch.setattr(client, "put_object", lose_first_answer)
    assert store.put_if_absent("commits/k.json", b"ours") is False
    assert len(calls) == 2 and all(c["IfNoneMatch"] == "*" for c in calls)
    assert store.read_bytes("commits/k.json") == b"ours"


def test_delete_prefix_counts_what_it_removed(store):
    for key in ["v/x/1", "v/x/2/3", "v/x/2/4", "v/xy/5", "v/z"]:
        store.write_bytes(key, b"x")
    assert store.delete_prefix("v/x") == 3
    assert list(store.list()) == ["v/xy/5", "v/z"]
    assert store.delete_prefix("v/z") == 1
    assert store.delete_prefix("nothing/here") == 0


@pytest.mark.parametrize("chunk_bytes", [3, 1 << 20])
def test_iter_lines_strips_lf_and_crlf(store, chunk_bytes, monkeypatch):
    # A 3-byte chunk puts CR and LF into different reads.
    monkeypatch.setattr(storage, "LINE_CHUNK_BYTES", chunk_bytes)
    store.write_bytes("m.jsonl", b'{"id": "a"}\r\n{"id": "b"}\n\r\n{"id": "c"}\n' + b"tail")
    assert list(store.iter_lines("m.jsonl")) == [
        b'{"id": "a"}',
        b'{"id": "b"}',
        b"",
        b'{"id": "c"}',
        b"tail",
    ]
    object_store, key = storage_for(store.uri("m.jsonl"))
    assert list(object_store.iter_lines(key))[-1] == b"tail"


def write_tree(root: Path) -> dict[str, bytes]:
    files = {f"z/{i}.bin": bytes([i]) * (i + 1) for i in range(12)}
    files |= {"zarr.json": b"{}", "a/b/c.txt": b"deep"}
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return files


def test_upload_dir_returns_digests_and_downloads_back(store, tmp_path):
    files = write_tree(tmp_path / "src")
    sums = store.upload_dir(tmp_path / "src", "vol/a.ome.zarr")
    assert sums == {k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())}
    assert list(sums) == sorted(files)
    assert list(store.list("vol")) == sorted(f"vol/a.ome.zarr/{k}" for k in files)
    store.download_prefix("vol/a.ome.zarr", tmp_path / "back")
    assert {
        p.relative_to(tmp_path / "back").as_posix(): p.read_bytes()
        for p in (tmp_path / "back").rglob("*")
        if p.is_file()
    } == files


def test_zarr_store_reads_a_group(store, tmp_path):
    local = zarr.open_group(zarr.storage.LocalStore(tmp_path / "g.zarr"), mode="w")
    local.attrs["kind"] = "test"
    local.create_array("image", shape=(4, 5), chunks=(2, 5), dtype="int16")[...] = np.arange(
        20, dtype=np.int16
    ).reshape(4, 5)
    store.upload_dir(tmp_path / "g.zarr", "out/g.zarr")
    group = zarr.open_group(store=store.zarr_store("out/g.zarr"), mode="r")
    assert group.attrs["kind"] == "test"
    assert group["image"][...].tolist() == np.arange(20).reshape(4, 5).tolist()


def test_local_copy_of_a_local_directory_is_the_directory(tmp_path):
    assert local_copy(str(tmp_path)) == tmp_path
    assert local_copy(f"file://{tmp_path}") == tmp_path


@pytest.mark.integration
def test_local_copy_downloads_once_per_node(s3_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CTFACTORY_CACHE", str(tmp_path / "cache"))
    files = write_tree(tmp_path / "bundle")
    bundle = open_storage(f"{s3_root}/bundles/b1")
    bundle.upload_dir(tmp_path / "bundle", "")
    downloads = []
    original = S3Storage.download_prefix

    def counted(self, key, local_dir):
        downloads.append(local_dir)
        original(self, key, local_dir)

    monkeypatch.setattr(S3Storage, "download_prefix", counted)
    barrier = threading.Barrier(4)

    def first_use(_):
        barrier.wait()
        return local_copy(bundle.root)

    with ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(first_use, range(4)))
    assert len(paths) == 1 and len(downloads) == 1
    (path,) = paths
    assert path.is_relative_to(tmp_path / "cache" / "bundles")
    assert {
        p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()
    } == files
    assert local_copy(bundle.root) == path and len(downloads) == 1  # reused
    assert [p.name for p in path.parent.iterdir() if p.is_dir()] == [path.name]


@pytest.mark.integration
def test_local_copy_leaves_nothing_in_place_when_a_download_fails(s3_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CTFACTORY_CACHE", str(tmp_path / "cache"))
    bundle = open_storage(f"{s3_root}/bundles/b2")
    write_tree(tmp_path / "bundle")
    bundle.upload_dir(tmp_path / "bundle", "")
    original = S3Storage.read_bytes

    def broken(self, key):
        if key.endswith("c.txt"):
            raise StorageError("simulated failure mid-download")
        return original(self, key)

    monkeypatch.setattr(S3Storage, "read_bytes", broken)
    with pytest.raises(StorageError):
        local_copy(bundle.root)
    assert [p for p in (tmp_path / "cache" / "bundles").iterdir() if p.is_dir()] == []
    monkeypatch.setattr(S3Storage, "read_bytes", original)
    assert (local_copy(bundle.root) / "a/b/c.txt").read_bytes() == b"deep"


def test_with_retries_retries_transient_errors_only(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda _s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "ok"

    assert with_retries("flaky", flaky) == "ok" and len(calls) == 3

    def broken():
        calls.append(1)
        raise ValueError("not transient")

    calls.clear()
    with pytest.raises(ValueError):
        with_retries("broken", broken)
    assert len(calls) == 1
