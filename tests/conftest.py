"""Session fixtures: a real local S3 endpoint and a real local Ray.

Both bind to loopback only. Tests that use either are integration tests and
say so with `@pytest.mark.integration`.
"""

from __future__ import annotations

import os

import pytest

from tests.services import LocalRayHead, LocalS3, export_env

# Offline, quiet and CPU-only, for every test and every process they start.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray runs its workers at niceness 15, so on a machine busy with other work
# (another job, a benchmark) they get a few percent of a core and a 40 s job
# takes over 6 min: the chaos suite's deadlines then fail on load, not on a
# fault. At niceness 0 the tests' workers slow down with the load like
# everything else (the kill test: 109 s with four busy loops beside it).
os.environ.setdefault("RAY_worker_niceness", "0")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 at a free port; the standard AWS settings
    (AWS_ENDPOINT_URL and test credentials) point boto3 and friends at it."""
    server = LocalS3().start()
    saved = {key: os.environ.get(key) for key in server.env}
    export_env(server.env)
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's endpoint."""
    return s3_server.new_bucket()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray with 2 CPUs and 2 *logical* GPUs, so that GPU pinning
    (num_gpus=1 per actor -> distinct CUDA_VISIBLE_DEVICES) is testable here.
    Started after the S3 endpoint, so its workers see the same AWS settings."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head(s3_server):
    """A Ray head started with `ray start --head` on loopback, with the Job
    Submission API at `ray_head.address`; it sees the S3 endpoint through the
    standard AWS settings, as a cluster's nodes would."""
    head = LocalRayHead(env=s3_server.env).start()
    yield head
    head.stop()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A randomly initialised `tiny` bundle (seconds per volume), built once."""
    from report2ct.bundle import build_random_bundle

    path = tmp_path_factory.mktemp("bundles") / "tiny"
    build_random_bundle(path, preset_name="tiny", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_mask_bundle(tmp_path_factory):
    """A random `tiny` bundle with the label token and a ControlNet on the
    phantom world's legend: every mask path runs, in seconds."""
    import dataclasses

    from phantom.legend import LABELS
    from report2ct.bundle import build_random_bundle
    from report2ct.config import ControlConfig, preset

    legend = tuple((label.value, label.name) for label in LABELS if label.value)
    config = dataclasses.replace(preset("tiny"), control=ControlConfig(legend=legend))
    path = tmp_path_factory.mktemp("bundles") / "tiny-masks"
    build_random_bundle(path, config=config, seed=0)
    return path
