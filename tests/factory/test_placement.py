"""Where actors land: one GPU each when the cluster has GPUs, CPUs left for
Ray Data's reads on a small cluster."""

from types import SimpleNamespace

from factory.job import GenerateOptions, _cpus_per_worker, _gpus_per_worker


def cluster(**resources):
    return SimpleNamespace(cluster_resources=lambda: resources)


def options(**kwargs):
    return GenerateOptions(manifest="m.jsonl", output="out", **kwargs)


def test_one_gpu_per_actor_by_default_when_the_cluster_has_gpus():
    assert _gpus_per_worker(cluster(CPU=64, GPU=8), options()) == 1.0
    assert _gpus_per_worker(cluster(CPU=64), options()) == 0.0
    assert _gpus_per_worker(cluster(CPU=64, GPU=8), options(gpus_per_worker=0.5)) == 0.5
    assert _gpus_per_worker(cluster(CPU=64, GPU=8), options(gpus_per_worker=0)) == 0.0


def test_actors_leave_a_cpu_for_reads_on_a_small_cluster_with_or_without_gpus():
    assert _cpus_per_worker(cluster(CPU=2, GPU=2), options(workers=2)) == 0.5
    assert _cpus_per_worker(cluster(CPU=64, GPU=8), options(workers=8)) == 1.0
