"""Entry point: a train job (`kind: train`).

    ray job submit -- python -m jobs.train --spec train.yaml

On a cluster (`num_workers` > 1 or `use_gpu`), the DeepSpeed stage runs under
Ray Train's TorchTrainer: Ray places one worker per GPU across the nodes and
sets up torch.distributed (MASTER_ADDR/RANK/WORLD_SIZE), which
`deepspeed.initialize` then uses as is. We chose Ray Train over launching the
`deepspeed` CLI over a hostfile because the job already runs on the Ray
cluster: Ray's autoscaler provides the GPU nodes, gang-schedules the workers,
and restarts them (FailureConfig) while our checkpoints make the restart
resume exactly. A single process needs neither.
"""

import json

from jobs._entry import main


def _stage(spec) -> dict:
    from training.demo_bundle import build_demo_bundle, recipe_for
    from training.engine import read_deepspeed_config

    if spec.stage != "demo-bundle":
        raise SystemExit(
            f"stage {spec.stage!r}: run it with `ctfactory train {spec.stage}`; "
            "the job entry builds whole bundles"
        )
    deepspeed = None
    if spec.deepspeed_config is not None:
        deepspeed = read_deepspeed_config(spec.deepspeed_config)
    recipe = recipe_for(spec.preset, spec.overrides, deepspeed)
    sha = build_demo_bundle(
        spec.output, f"{spec.output}.work", recipe, resume=spec.resume, phantoms=spec.data
    )
    return {"bundle_sha256": sha}


def run(spec) -> int:
    if spec.num_workers == 1 and not spec.use_gpu:
        print(json.dumps(_stage(spec)))
        return 0
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        lambda config: _stage(spec),
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu),
        run_config=RunConfig(
            name=f"ct-factory-{spec.stage}", failure_config=FailureConfig(max_failures=3)
        ),
    )
    result = trainer.fit()
    print(json.dumps({"result": str(result.metrics)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main("train", run))
