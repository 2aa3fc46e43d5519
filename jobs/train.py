"""Entry point: a train job (`kind: train`).

    ray job submit -- python -m jobs.train --spec train.yaml

Stages `vae`, `ldm` and `controlnet` train into a run directory, the same
run `ctfactory train vae|ldm|controlnet` makes (`training.runs`); stage
`demo-bundle` builds the whole demo bundle on one worker.

On a cluster (`num_workers` > 1 or `use_gpu`), the stage runs under Ray
Train's TorchTrainer: Ray places one worker per GPU across the nodes and
sets up torch.distributed in each (RANK, WORLD_SIZE, the process group),
which `deepspeed.initialize` then uses as is. We chose Ray Train over
launching the `deepspeed` CLI over a hostfile because the job already runs
on the Ray cluster: Ray's autoscaler provides the GPU nodes, gang-schedules
the workers, and restarts them (FailureConfig) while our checkpoints make
the restart resume exactly. A single CPU process needs neither.

Where the run lives:
- a local `output` is the run directory itself; with workers on several
  nodes it must be a file system they share (each rank writes its own
  optimizer shard, rank 0 the rest);
- an s3:// `output` is mirrored: each worker trains in its own scratch
  directory (first filled from the prefix's latest checkpoint when
  resuming) and uploads each checkpoint as it completes, rank 0 everything
  but the other ranks' optimizer shards, which their ranks upload; rank 0
  puts the checkpoint's client.json last, so a checkpoint on S3 counts
  (`training.engine.latest_checkpoint`) only once all of it is there.
- `vae_run` / `ldm_run` on s3:// are fetched (their latest EMA weights, the
  LDM's encoders and its latent cache's index); a ControlNet reads an s3://
  LDM run's latent shards where they are, sample by sample. `data` on s3://
  is read where it is too, volume by volume (`training.data.stream`), but
  for the ControlNet's mask legend (masks/legend.json, fetched).
- The LDM stage's latent cache goes beside the run: under an s3:// `output`
  to `<output>/latents/` directly, built by rank 0 and read by every rank,
  so no rank encodes the split again in its own scratch directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from pathlib import Path

from jobs._entry import main

log = logging.getLogger(__name__)

# An optimizer shard of one rank (ZeRO 1/2, or the bf16 optimizer's): that rank's to upload.
_SHARD = re.compile(r"zero_pp_rank_(\d+)_")
# What a fetched LDM run brings besides its EMA weights.
# (latents/index.json: the latent scale and how the volumes were read; an older
# run's cache.safetensors instead.)
LDM_RUN_FILES = (
    "latents/index.json",
    "cache.safetensors",
    "encoders.json",
    "encoders/",
    "model.json",
)
SUMMARY = "summary.json"  # a stage's run: what the job did (steps, final loss, ranks)
MODEL = "model.json"  # a stage's run: the model config it trained (the preset with `model`)


def run(spec) -> int:
    in_process = spec.num_workers == 1 and not spec.use_gpu
    summary = run_stage(spec) if in_process else _fit(spec)
    print(json.dumps(summary))
    return 0


def _fit(spec) -> dict:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs import train as module  # importable on every worker (not __main__)

    trainer = TorchTrainer(
        module.train_worker,
        train_loop_config={"spec": spec.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu),
        run_config=RunConfig(
            name=f"ct-factory-{spec.stage}-{spec.digest()[:12]}",
            failure_config=FailureConfig(max_failures=spec.max_failures),
        ),
    )
    trainer.fit()  # raises when the workers failed (after max_failures restarts)
    # Ray Train keeps metrics only beside its own checkpoints: the job's
    # summary is what rank 0 left in the output.
    from factory.storage import open_storage

    output = open_storage(spec.output)
    if spec.stage == "demo-bundle":
        return {"bundle_sha256": hashlib.sha256(output.read_bytes("SHA256SUMS")).hexdigest()}
    return json.loads(output.read_bytes(SUMMARY))


def train_worker(config: dict) -> None:
    """One Ray Train worker: the stage on this rank, its summary reported."""
    import ray.train

    from jobs.specs import parse_spec

    spec = parse_spec(config["spec"])
    if spec.use_gpu:
        _pin_gpu()
    ray.train.report(run_stage(spec))


def _pin_gpu() -> None:
    """DeepSpeed takes its device from LOCAL_RANK; under Ray the worker's GPU
    is the one Ray assigned (its index among the visible devices)."""
    import os

    import torch
    from ray.train.torch import get_device

    device = get_device()
    torch.cuda.set_device(device)
    os.environ["LOCAL_RANK"] = str(device.index)


def run_stage(spec) -> dict:
    """The spec's stage on this process (one of several ranks, or alone);
    returns the summary the job prints."""
    if spec.stage == "demo-bundle":
        return _demo_bundle(spec)
    from training.engine import process_rank, read_deepspeed_config, with_deepspeed
    from training.runs import train_controlnet_run, train_ldm_run, train_vae_run

    config = spec.model_settings()
    train_config = spec.train_config()
    if spec.deepspeed_config is not None:
        train_config = with_deepspeed(train_config, read_deepspeed_config(spec.deepspeed_config))
    with tempfile.TemporaryDirectory(prefix="ct-factory-train-") as scratch:
        scratch = Path(scratch)
        run_dir = RunDirectory(spec.output, scratch / "run", resume=spec.resume)
        data = spec.data  # streamed from where it is, local or s3://
        options = {
            "hu_rule": spec.hu_rule,
            "resume": spec.resume,
            "on_checkpoint": run_dir.checkpointed,
        }
        summary: dict = {"stage": spec.stage, "output": spec.output}
        if spec.stage == "vae":
            result = train_vae_run(
                data, run_dir.path, config, train_config, crop=spec.crop(), **options
            )
        elif spec.stage == "ldm":
            vae_run = fetch_run(spec.vae_run, scratch / "vae_run")
            encoders_dir = _local_data(spec.encoders_dir) if spec.encoders_dir else None
            summary["latent_scale"], result = train_ldm_run(
                data,
                vae_run,
                run_dir.path,
                config,
                train_config,
                encoders_dir=encoders_dir,
                encoders=spec.encoders,
                allow_remote_code=spec.allow_remote_code,
                latents=_beside(spec.output, "latents") if run_dir.mirrored else None,
                **options,
            )
        else:
            ldm_run = fetch_run(spec.ldm_run, scratch / "ldm_run", LDM_RUN_FILES)
            fetched = ldm_run == scratch / "ldm_run"  # from s3://: its shards stay there
            remote = fetched and (ldm_run / "latents/index.json").is_file()
            result = train_controlnet_run(
                data,
                ldm_run,
                run_dir.path,
                config,
                train_config,
                latents=_beside(spec.ldm_run, "latents") if remote else None,
                **options,
            )
        rank, world = process_rank()
        summary.update(
            steps=result.steps,
            final_loss=result.losses[-1] if result.losses else None,
            world_size=world,
        )
        if rank == 0:
            (run_dir.path / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
            (run_dir.path / MODEL).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        run_dir.finish()
    return summary


def _demo_bundle(spec) -> dict:
    from training.demo_bundle import build_demo_bundle, recipe_for
    from training.engine import read_deepspeed_config

    deepspeed = None
    if spec.deepspeed_config is not None:
        deepspeed = read_deepspeed_config(spec.deepspeed_config)
    recipe = recipe_for(spec.preset, spec.overrides, deepspeed)
    sha = build_demo_bundle(
        spec.output, f"{spec.output}.work", recipe, resume=spec.resume, phantoms=spec.data
    )
    return {"bundle_sha256": sha}


def _beside(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


def _local_data(uri: str) -> Path:
    """A data set as a local directory: itself, or a copy made once per node."""
    from factory.storage import local_copy

    return local_copy(uri)


def fetch_run(uri: str, scratch: Path, extra: tuple[str, ...] = ()) -> Path:
    """A finished run as a local directory: itself when local; from s3://,
    its latest complete checkpoint's EMA weights (and `extra` keys: files,
    or prefixes ending in /) downloaded into `scratch`."""
    from factory.storage import open_storage

    storage = open_storage(uri)
    local = storage.local_path()
    if local is not None:
        return local
    keys = list(storage.list(""))
    steps = sorted(
        int(match.group(1))
        for key in keys
        if (match := re.fullmatch(r"checkpoints/step-(\d+)/client\.json", key))
    )
    if not steps:
        raise FileNotFoundError(f"{uri}: no checkpoints/step-*/client.json (not a run)")
    folder = f"checkpoints/step-{steps[-1]}/"
    wanted = [folder + "client.json", folder + "ema.safetensors"]
    wanted += [k for k in keys for e in extra if k == e or (e.endswith("/") and k.startswith(e))]
    for key in wanted:
        target = scratch / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(key))
    return scratch


def run_model(run: Path):
    """The model config a train job's run recorded (None for a run made
    without one, e.g. by `ctfactory train ldm`): its architecture and grid,
    with the preset's encoders (the LDM run's own are in encoders.json)."""
    from report2ct.config import ModelConfig

    recorded = Path(run) / MODEL
    return ModelConfig.from_dict(json.loads(recorded.read_text())) if recorded.is_file() else None


class RunDirectory:
    """Where a stage trains: the output directory itself, or (s3://) a
    scratch directory mirrored to the output prefix (module docstring)."""

    def __init__(self, uri: str, scratch: Path, *, resume: bool) -> None:
        from factory.storage import open_storage
        from training.engine import process_rank

        self.storage = open_storage(uri)
        self.rank, self.world = process_rank()
        local = self.storage.local_path()
        self.mirrored = local is None
        self.path = Path(local) if local is not None else scratch
        self._sent: dict[str, tuple[int, int]] = {}
        if not self.mirrored:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if resume:
            self._download()
        elif self.rank == 0:
            # What training.engine drops when a run starts afresh, dropped here too.
            for stale in ("checkpoints/", "log.jsonl", "loss.png"):
                self.storage.delete_prefix(stale)
        self._barrier()

    def _download(self) -> None:
        keys = list(self.storage.list(""))
        complete = {key.removesuffix("client.json") for key in keys if key.endswith("/client.json")}
        steps = sorted(complete, key=lambda k: int(k.split("/")[1].removeprefix("step-")))
        latest = steps[-1] if steps else None
        for key in keys:
            if key.startswith("checkpoints/") and not (latest and key.startswith(latest)):
                continue  # only the checkpoint the engine resumes from
            shard = _SHARD.search(key.rsplit("/", 1)[-1])
            if shard and int(shard.group(1)) != self.rank:
                continue  # another rank's optimizer state
            target = self.path / key
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.storage.read_bytes(key))
            stat = target.stat()
            self._sent[key] = (stat.st_size, stat.st_mtime_ns)

    def _mine(self, relative: str) -> bool:
        shard = _SHARD.search(relative.rsplit("/", 1)[-1])
        if shard:
            return int(shard.group(1)) == self.rank
        return self.rank == 0

    def _upload(self, *, hold: str | None = None) -> None:
        """This rank's new or changed files, `hold` (a key) left for later."""
        for path in sorted(p for p in self.path.rglob("*") if p.is_file()):
            key = path.relative_to(self.path).as_posix()
            if key == hold or key.endswith(".partial") or not self._mine(key):
                continue
            stat = path.stat()
            if self._sent.get(key) == (stat.st_size, stat.st_mtime_ns):
                continue
            self.storage.write_bytes(key, path.read_bytes())
            self._sent[key] = (stat.st_size, stat.st_mtime_ns)

    def checkpointed(self, folder: Path) -> None:
        """A checkpoint is complete on this rank's disk: on S3, every rank's
        part first, its client.json (rank 0's) last."""
        if not self.mirrored:
            return
        client = (folder / "client.json").relative_to(self.path).as_posix()
        self._upload(hold=client)
        self._barrier()
        if self.rank == 0:
            self._upload()
        log.info("checkpoint %s uploaded to %s", folder.name, self.storage.uri(""))

    def finish(self) -> None:
        """What the run wrote after its last checkpoint (loss.png, the log)."""
        if self.mirrored:
            self._upload()
            self._barrier()

    def _barrier(self) -> None:
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            dist.barrier()


if __name__ == "__main__":
    raise SystemExit(main("train", run))
