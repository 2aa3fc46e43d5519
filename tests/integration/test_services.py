"""The session fixtures are real services, not mocks."""

import urllib.request

import pytest

pytestmark = pytest.mark.integration


def test_s3_endpoint_is_real_http(s3_server, s3_bucket):
    import boto3

    # boto3 finds the endpoint through the standard setting alone.
    client = boto3.client("s3")
    assert client.meta.endpoint_url == s3_server.endpoint_url
    client.put_object(Bucket=s3_bucket, Key="hello/world.txt", Body=b"chest ct")

    # An independent HTTP client reads the object back over the socket
    # (through a signed URL, since the endpoint checks authorisation).
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": "hello/world.txt"}, ExpiresIn=60
    )
    assert url.startswith(s3_server.endpoint_url)
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == b"chest ct"


def test_s3_conditional_put_is_enforced(s3_server, s3_bucket):
    from botocore.exceptions import ClientError

    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="marker", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as excinfo:
        client.put_object(Bucket=s3_bucket, Key="marker", Body=b"2", IfNoneMatch="*")
    assert excinfo.value.response["Error"]["Code"] == "PreconditionFailed"


def test_ray_actors_are_pinned_to_distinct_logical_gpus(ray_local):
    ray = ray_local

    @ray.remote(num_gpus=1, num_cpus=0)
    class Probe:
        def where(self):
            import os

            return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

    probes = [Probe.remote() for _ in range(2)]
    answers = ray.get([probe.where.remote() for probe in probes])
    gpu_ids = [tuple(ids) for ids, _ in answers]
    visible = [cvd for _, cvd in answers]
    assert all(len(ids) == 1 for ids in gpu_ids)
    assert len(set(gpu_ids)) == 2, gpu_ids
    assert sorted(visible) == ["0", "1"]
    for probe in probes:
        ray.kill(probe)
