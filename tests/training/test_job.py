"""A `kind: train` job at tiny scale: its DeepSpeed config reaches every
stage's engine, `data` holds the phantom set, and `resume: false` rebuilds."""

import json

import pytest

pytestmark = pytest.mark.slow

STAGE = {"steps": 2, "micro_batch": 2, "warmup_steps": 1, "checkpoint_every": 100, "log_every": 1}


def test_train_job_builds_under_its_deepspeed_config_and_restarts_on_request(tmp_path, capsys):
    from jobs.specs import parse_spec
    from jobs.train import run

    spec = {
        "kind": "train",
        "stage": "demo-bundle",
        "preset": "tiny",
        "data": str(tmp_path / "phantoms"),
        "output": str(tmp_path / "bundle"),
        "deepspeed_config": {"gradient_clipping": 0.5, "zero_optimization": {"stage": 1}},
        "overrides": {
            "phantoms": 6,
            "bert_steps": 3,
            "vae_crop": [16, 16, 16],
            **{stage: STAGE for stage in ("vae", "ldm", "labels", "control")},
        },
    }
    assert run(parse_spec(spec)) == 0
    assert "bundle_sha256" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    work = tmp_path / "bundle.work"
    for stage in ("vae", "ldm", "labels", "controlnet"):
        saved = json.loads((work / stage / "train_config.json").read_text())
        assert saved["deepspeed"]["zero_optimization"] == {"stage": 1}, stage
        assert saved["deepspeed"]["gradient_clipping"] == 0.5, stage
    assert (tmp_path / "phantoms/masks/legend.json").exists()

    more = {**spec["overrides"], "ldm": {**STAGE, "steps": 3}}
    assert run(parse_spec({**spec, "overrides": more})) == 0  # resumes: one more LDM step
    log = (work / "ldm/log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3]
    assert run(parse_spec({**spec, "resume": False})) == 0  # afresh: steps 1, 2 again
    log = (work / "ldm/log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2]
    assert [p.name for p in (work / "ldm/checkpoints").glob("step-*")] == ["step-2"]
