"""Fault injection for the factory: a TCP proxy in front of the S3 endpoint
that can refuse connections for a while (an outage, not a slowdown), a
`ctfactory generate` subprocess that can be SIGKILLed, and bucket snapshots.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.services import free_port


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target port. `outage(seconds)` closes
    the listener and every open connection, so clients see connection
    refused/reset, then listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.refused_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed for an outage
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.close()

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
                except OSError:
                    pass
            self._conns.clear()

    def outage(self, seconds: float) -> None:
        self.stop()
        time.sleep(seconds)
        self.refused_s += seconds
        self.start()


def generate_cli(
    manifest: str,
    out: str,
    bundle: str,
    *,
    env: dict[str, str],
    extra: tuple[str, ...] = (),
    log: Path | None = None,
) -> subprocess.Popen:
    """`ctfactory generate` in its own process group (so a kill takes its Ray too)."""
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "generate",
        "--manifest",
        manifest,
        "--out",
        out,
        "--model",
        bundle,
        "--workers",
        "2",
        "--steps",
        "2",
        *extra,
    ]
    handle = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        command,
        env={**os.environ, **env},
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgid(process.pid), signal.SIGKILL)
    process.wait(timeout=30)


def objects(client, bucket: str, prefix: str = "") -> dict[str, dict]:
    """{key: {etag, last_modified}} of every object under prefix."""
    out: dict[str, dict] = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"]] = {"etag": item["ETag"], "last_modified": item["LastModified"]}
    return out


def wait_for(predicate, *, timeout_s: float, poll_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return False


def settle(listing, *, quiet_s: float = 5.0, timeout_s: float = 120.0) -> dict:
    """Poll `listing()` until it has not changed for `quiet_s`; return it.
    After a driver is killed, a Ray worker that was mid-record may still
    finish and commit it (it is not in the killed process group)."""
    last, since = listing(), time.monotonic()
    deadline = since + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = listing()
        if current != last:
            last, since = current, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


def manifest_lines(n: int, prefix: str = "c") -> Iterator[str]:
    for i in range(n):
        yield json.dumps(
            {
                "id": f"{prefix}{i:03d}",
                "findings": f"Finding {i}: right pleural effusion.",
                "impression": "Effusion.",
            }
        )
