"""The cluster and Kubernetes manifests are valid for the tools that read them."""

import json
from pathlib import Path

import yaml

from jobs.specs import GenerateSpec, parse_spec

ROOT = Path(__file__).resolve().parents[2]


def test_ray_cluster_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(config)  # the raw file
    prepared = prepare_config(config)  # as `ray up` fills it with AWS defaults
    validate_config(prepared)
    nodes = prepared["available_node_types"]
    head = nodes[prepared["head_node_type"]]
    workers = {name: node for name, node in nodes.items() if name != prepared["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0
    assert workers and all(node["resources"]["GPU"] == 1 for node in workers.values())
    assert all(node["min_workers"] == 0 and node["max_workers"] >= 1 for node in workers.values())
    assert prepared["docker"]["image"]


def _docs(name):
    return list(yaml.safe_load_all((ROOT / "infra" / "kuberay" / name).read_text()))


def _gpu_group_limits(cluster_spec):
    (group,) = cluster_spec["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    return group, container["resources"]["limits"]


def test_kuberay_raycluster_has_gpu_limits():
    (cluster,) = _docs("raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    group, limits = _gpu_group_limits(cluster["spec"])
    assert limits["nvidia.com/gpu"] == 1
    assert group["rayStartParams"]["num-gpus"] == "1"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_kuberay_rayjob_runs_a_valid_generate_spec():
    config_map, job = _docs("rayjob-generate.yaml")
    assert job["kind"] == "RayJob"
    _, limits = _gpu_group_limits(job["spec"]["rayClusterSpec"])
    assert limits["nvidia.com/gpu"] == 1
    assert job["spec"]["entrypoint"].startswith("python -m jobs.generate --spec /etc/ct-factory/")
    spec = parse_spec(yaml.safe_load(config_map["data"]["generate.yaml"]))
    assert isinstance(spec, GenerateSpec) and spec.gpus_per_worker == 1


def test_deepspeed_configs_are_explicit():
    for path in (ROOT / "infra" / "deepspeed").glob("*.json"):
        config = json.loads(path.read_text())
        assert config["bf16"]["enabled"] is True
        assert "gradient_clipping" in config  # its default changed in 0.19.3
        assert config["zero_optimization"]["stage"] in (2, 3)
