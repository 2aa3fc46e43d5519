"""A `kind: train` spec that the entry cannot run is refused when it is
validated (before submission), with the field and the reason; what it can
run resolves to the stage's model and training settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.specs import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
LDM = {"kind": "train", "stage": "ldm", "data": "d", "output": "o", "vae_run": "v"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stage": "encoder"}, r"stage 'encoder': a train job runs vae, ldm, controlnet"),
        ({"stage": "sample"}, r"stage 'sample'"),
        ({"vae_run": None}, r"stage ldm needs vae_run"),
        ({"ldm_run": "l"}, r"ldm_run is read by stage controlnet only"),
        ({"stage": "vae"}, r"vae_run is read by stage ldm only, not vae"),
        ({"stage": "controlnet", "vae_run": None}, r"stage controlnet needs ldm_run"),
        ({"stage": "demo-bundle", "vae_run": None, "num_workers": 2}, r"demo-bundle builds on one"),
        ({"overrides": {"stpes": 10}}, r"overrides: \['stpes'\] are not settings of stage ldm"),
        ({"overrides": {"crop": [16, 16, 16]}}, r"\['crop'\]"),
        ({"overrides": {"zero_stage": 3}}, r"zero_stage 3"),
        ({"model": {"unet_size": 3}}, r"unknown ModelConfig fields \['unet_size'\]"),
        ({"model": {"default_shape": [100, 96, 64]}}, r"model: shape x=100 unsupported"),
        ({"model": {"unet": {"channels": [8]}}}, r"unknown UNetConfig fields"),
        ({"deepspeed_config": {"optimizer": {"type": "Adam"}}}, r"'optimizer' is built by"),
        ({"deepspeed_config": {"zero_optimization": {"stage": 3}}}, r"ZeRO stage 3"),
        ({"encoders": {"x": "y"}, "stage": "vae", "vae_run": None}, r"stage ldm imports"),
        ({"hu_rule": "guess"}, r"field 'hu_rule'"),
    ],
)
def test_a_spec_the_entry_cannot_run_is_refused_at_validation(change, message):
    spec = {k: v for k, v in {**LDM, **change}.items() if v is not None}
    with pytest.raises(SpecError, match=message) as refused:
        parse_spec(spec, source="train.yaml")
    assert str(refused.value).startswith("train.yaml")


def test_a_stage_resolves_to_its_settings():
    spec = parse_spec(
        {
            **LDM,
            "preset": "paper",
            "model": {"default_shape": [64, 64, 32], "unet": {"num_channels": [8, 16, 16, 32]}},
            "overrides": {"steps": 7, "micro_batch": 2},
        }
    )
    config = spec.model_settings()
    assert config.name == "paper" and config.default_shape == (64, 64, 32)
    assert config.unet.num_channels == (8, 16, 16, 32)
    assert config.unet.attention_levels == (False, False, True, True)  # the rest: the preset's
    assert [e.dim for e in config.encoders] == [768, 1024, 768]
    train = spec.train_config()
    assert (train.steps, train.micro_batch, train.lr) == (7, 2, 3e-4)  # lr: the ldm default
    vae = parse_spec({**LDM, "stage": "vae", "vae_run": None, "overrides": {"crop": [8, 8, 8]}})
    assert vae.crop() == (8, 8, 8) and vae.train_config().lr == 2e-4


def test_every_example_train_spec_validates_and_names_files_that_exist():
    """`examples/jobs/train-*.yaml` as written: valid, their DeepSpeed
    configs in the repository, the paper LDM on 8 GPUs under ZeRO-2 bf16."""
    from training.engine import read_deepspeed_config, with_deepspeed

    examples = sorted((ROOT / "examples/jobs").glob("train-*.yaml"))
    specs = {path.name: load_spec(path) for path in examples}
    assert {"train-ldm.yaml", "train-demo-bundle.yaml"} <= set(specs)
    for name, spec in specs.items():
        assert (ROOT / spec.deepspeed_config).is_file(), name
    ldm = specs["train-ldm.yaml"]
    assert (ldm.stage, ldm.preset, ldm.num_workers, ldm.use_gpu) == ("ldm", "paper", 8, True)
    assert ldm.allow_remote_code  # CXR-BERT ships its code
    assert ldm.model_settings().context_dim == 2560
    train = with_deepspeed(ldm.train_config(), read_deepspeed_config(ROOT / ldm.deepspeed_config))
    ds = train.deepspeed_config(world_size=ldm.num_workers)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    assert ds["train_batch_size"] == 4 * 2 * 8
    json.dumps(ds)  # what deepspeed.initialize receives is plain JSON
