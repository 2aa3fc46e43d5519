"""Real local services for tests: an S3 endpoint (moto's server, over HTTP on
loopback) and a local Ray. Kept apart from conftest so fault-injection tests
can drive them (pause the endpoint, restart it) directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

# Fake credentials: tests grep job outputs for these to prove secrets never leak.
TEST_ACCESS_KEY = "AKIATESTFACTORYKEY01"
TEST_SECRET_KEY = "testFactorySecretKey/DoNotLeak+0123456789"
TEST_REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalS3:
    """moto's S3 server in a child process on 127.0.0.1.

    A separate process (not moto's in-process thread) so that Ray workers reach
    it over the network like any S3, and so that tests can freeze it
    (`pause`/`resume`, SIGSTOP/SIGCONT) to simulate an endpoint outage without
    losing its in-memory data.
    """

    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS settings that point any client at this endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            "AWS_DEFAULT_REGION": TEST_REGION,
        }

    def start(self, timeout_s: float = 30.0) -> LocalS3:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}")
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self  # an HTTP answer of any status: the server is up
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"moto server did not answer on {self.endpoint_url}")

    def pause(self) -> None:
        """Freeze the endpoint: connections hang as with an unreachable S3."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=TEST_ACCESS_KEY,
            aws_secret_access_key=TEST_SECRET_KEY,
            region_name=TEST_REGION,
        )

    def new_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def export_env(env: dict[str, str]) -> None:
    os.environ.update(env)


@dataclass
class LocalRayHead:
    """A Ray head started the way a cluster starts one (`ray start --head`),
    with a dashboard on loopback for the Job Submission API.

    It runs in its own process group and temp dir, so stopping it never
    touches another Ray on the machine (the in-process `ray_local` fixture).
    """

    num_cpus: int = 2
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    temp_dir: str = field(default_factory=lambda: f"/tmp/ray-head-{uuid.uuid4().hex[:8]}")
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 90.0) -> LocalRayHead:
        bin_dir = os.path.dirname(sys.executable)
        env = {
            **os.environ,
            **self.env,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Job entry points run `python -m jobs.<kind>`: this environment's python.
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.process = subprocess.Popen(
            [
                os.path.join(bin_dir, "ray"),
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={self.port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                "--include-dashboard=true",
                # Every agent port free, not Ray's defaults: the in-process
                # `ray_local` cluster of the same test session holds those,
                # and a head whose job agent cannot bind answers every
                # submission with "No available agent to submit job".
                *(
                    f"--{name}={free_port()}"
                    for name in (
                        "dashboard-agent-listen-port",
                        "dashboard-agent-grpc-port",
                        "metrics-export-port",
                        "runtime-env-agent-port",
                        "ray-client-server-port",
                    )
                ),
                f"--num-cpus={self.num_cpus}",
                "--num-gpus=0",
                "--disable-usage-stats",
                f"--temp-dir={self.temp_dir}",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}")
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"Ray dashboard did not answer on {self.address}")

    def stop(self) -> None:
        if self.process is None:
            return
        pgid = os.getpgid(self.process.pid)
        self.process.terminate()  # Ray drains, then stops its own processes...
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        # ...but a test need not wait out the drain: end the whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.process = None
        subprocess.run(["rm", "-rf", self.temp_dir], check=False)
