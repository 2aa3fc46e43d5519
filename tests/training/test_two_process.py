"""Two training processes under torchrun: ZeRO-2 shards the optimizer, both
ranks step in lockstep and rank 0 writes the log and checkpoint."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.services import free_port

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from tests.training.test_engine import fixed_latents, tiny_denoiser
    from training.engine import TrainConfig, train
    from training.stages import LDMLoss
    out = sys.argv[1]
    result = train(tiny_denoiser(), LDMLoss(0.15), fixed_latents(n=8),
                   TrainConfig(steps=4, micro_batch=2, warmup_steps=1, checkpoint_every=2, log_every=1), out)
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"steps": result.steps, "losses": result.losses}, f)
    import torch.distributed as dist
    dist.destroy_process_group()
""")


def test_torchrun_two_processes(tmp_path):
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
    log = (tmp_path / "out/log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["step"] == 4  # rank 0 logs for both (global batch of 2 x 2)
    assert (tmp_path / "out/checkpoints/step-4/client.json").exists()
