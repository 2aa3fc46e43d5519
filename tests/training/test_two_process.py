"""Two training processes under torchrun: ZeRO-2 shards the optimizer state
over the ranks, both ranks step in lockstep (the same losses, bit for bit
the same fp32 weights), rank 0 writes the log and checkpoint, and each
sample draws the same noise as in one process running the whole batch."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.services import free_port

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys, torch
    from tests.training.test_engine import fixed_latents, tiny_denoiser
    from tests.training.test_two_process import RecordingLoss, CONFIG
    from training.engine import train
    out, rank = sys.argv[1], os.environ["RANK"]
    loss = RecordingLoss()
    result = train(tiny_denoiser(), loss, fixed_latents(n=8), CONFIG, out)
    digest = hashlib.sha256()  # the fp32 EMA: every rank's, updated from its weights every step
    for key in sorted(result.ema):
        digest.update(key.encode() + result.ema[key].contiguous().numpy().tobytes())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"steps": result.steps, "losses": result.losses,
                   "weights_sha256": digest.hexdigest(), "noise": loss.seeds}, f)
    import torch.distributed as dist
    dist.destroy_process_group()
""")


class RecordingLoss:
    """The LDM loss, recording which noise (generator seed) each sample drew."""

    def __init__(self):
        from training.stages import LDMLoss

        self.loss, self.seeds = LDMLoss(0.15), []

    def __call__(self, engine, batch, generators):
        first = batch["latent"].flatten(1)[:, 0].tolist()  # identifies the sample
        self.seeds += [[x, g.initial_seed()] for x, g in zip(first, generators, strict=True)]
        return self.loss(engine, batch, generators)


def _config():
    from training.engine import TrainConfig

    return TrainConfig(steps=4, micro_batch=2, warmup_steps=1, checkpoint_every=2, log_every=1)


CONFIG = _config()


def test_torchrun_two_processes(tmp_path):
    import dataclasses

    from tests.training.test_engine import fixed_latents, tiny_denoiser
    from training.engine import train

    script = tmp_path / "two.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(script),
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rank["steps"] == 4 for rank in ranks)
    # Lockstep: every rank logs the mean loss over both ranks and ends with
    # the same fp32 weights.
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    log = (tmp_path / "out/log.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in log] == ranks[0]["losses"]
    # ZeRO-2: one optimizer-state shard per rank, each with about half the
    # fp32 master weights.
    checkpoint = tmp_path / "out/checkpoints/step-4"
    assert (checkpoint / "client.json").exists()
    shards = sorted(p.name for p in checkpoint.glob("*optim_states.pt"))
    assert shards == [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)], shards
    sizes = [_master_weights(checkpoint / shard) for shard in shards]
    weights = sum(p.numel() for p in tiny_denoiser().parameters())
    assert weights <= sum(sizes) <= weights + 1024, (sizes, weights)  # up to alignment padding
    assert abs(sizes[0] - sizes[1]) <= 1024, sizes

    # One process with the whole global batch (micro-batch 4) draws the same
    # noise for each sample, and at step 1 (same weights) the same loss.
    loss = RecordingLoss()
    whole = dataclasses.replace(CONFIG, micro_batch=4)
    single = train(tiny_denoiser(), loss, fixed_latents(n=8), whole, tmp_path / "one")
    per_rank = sorted(map(tuple, ranks[0]["noise"] + ranks[1]["noise"]))
    assert sorted(map(tuple, loss.seeds)) == per_rank
    assert single.losses[0] == pytest.approx(ranks[0]["losses"][0], rel=1e-5)


def _master_weights(path) -> int:
    import importlib

    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    # DeepSpeed pickles a few of its own classes (the loss scaler) beside the
    # tensors: allow exactly those, and nothing from anywhere else.
    names = get_unsafe_globals_in_checkpoint(path)
    assert all(name.startswith("deepspeed.") for name in names), names
    allowed = [
        getattr(importlib.import_module(module), attribute)
        for module, _, attribute in (name.rpartition(".") for name in names)
    ]
    with safe_globals(allowed):
        state = torch.load(path, map_location="cpu", weights_only=True)["optimizer_state_dict"]
    return sum(t.numel() for t in state["single_partition_of_fp32_groups"])
