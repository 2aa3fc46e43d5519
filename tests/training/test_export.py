"""The whole training path at tiny scale: phantoms -> report BERT -> VAE ->
caches -> LDM -> exported bundle that the model core loads and samples."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def test_demo_path_exports_a_bundle_the_model_core_samples(tmp_path):
    from report2ct.bundle import load_bundle, verify_bundle
    from report2ct.pipeline import VolumeRequest, generate
    from training.demo_bundle import build_demo_bundle, tiny_recipe

    sha = build_demo_bundle(tmp_path / "bundle", tmp_path / "work", tiny_recipe())
    assert verify_bundle(tmp_path / "bundle") == sha
    document = json.loads((tmp_path / "bundle/config.json").read_text())
    assert document["metadata"]["trained"] is True and document["model"]["latent_scale"] != 1.0
    assert (tmp_path / "bundle/training/loss_ldm.png").exists()
    assert (
        tmp_path / "bundle/encoders/tiny-bert/model.safetensors"
    ).exists()  # the trained report BERT
    # Stored in half precision (half the bytes), loaded into fp32 modules.
    stored = load_file(tmp_path / "bundle/denoiser.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    # The label token learned in its own stage; the text model stayed frozen.
    label_token = load_file(tmp_path / "bundle/label_embedding.safetensors")["weight"]
    learned = load_file(next((tmp_path / "work/labels/checkpoints").glob("*/ema.safetensors")))
    assert learned["label_embedding.weight"].abs().sum() > 0  # zero at the start
    assert torch.equal(label_token, learned["label_embedding.weight"].half())
    text_model = load_file(next((tmp_path / "work/ldm/checkpoints").glob("*/ema.safetensors")))
    for key, value in text_model.items():
        if key.startswith("unet."):
            torch.testing.assert_close(
                stored[key.removeprefix("unet.")].float(), value, rtol=1e-3, atol=1e-4
            )
    saved = json.loads((tmp_path / "work/ldm/train_config.json").read_text())
    assert saved["train"]["steps"] == 2 and saved["deepspeed"]["zero_optimization"]["stage"] == 2
    requests = [
        VolumeRequest(seed=0, findings="Right pleural effusion.", impression="Effusion."),
        VolumeRequest(seed=1, findings="Cardiomegaly.", impression="Enlarged heart."),
    ]
    exported = generate(load_bundle(tmp_path / "bundle"), requests, num_steps=2).volumes_hu
    assert exported.shape == (2, 32, 32, 16)
    # The bundle must sample exactly what the training runs' own EMA weights,
    # latent scale and legend sample, read without it.
    work = tmp_path / "work"
    reference = generate(
        _model_from_runs(
            work / "vae",
            work / "ldm",
            work / "controlnet",
            work / "phantoms",
            work,
            cache=work / "cache.safetensors",
            stored=torch.float16,
        ),
        requests,
        num_steps=2,
    ).volumes_hu
    np.testing.assert_array_equal(exported, reference)
    assert not np.array_equal(exported[0], exported[1])  # the model responds to its input


def _model_from_runs(vae, ldm, controlnet, data, encoders_dir, *, cache=None, stored=None):
    """The trained model rebuilt from the run directories alone: each run's
    latest EMA checkpoint, the latent scale of the cache (the LDM run's), the data
    set's mask legend, the report BERT under `encoders_dir`. `cache`: the
    in-memory path's cache file; else the LDM run's shard index."""
    import dataclasses

    from report2ct.config import ControlConfig, preset
    from report2ct.pipeline import Report2CT
    from training.caches import load_latent_cache
    from training.data.ctrate import mask_legend
    from training.data.shards import read_index
    from training.engine import load_ema

    if cache is not None:
        _, scale = load_latent_cache(cache)
    else:
        scale = read_index(str(ldm / "latents"))["latent_scale"]
    config = preset("tiny")
    config = dataclasses.replace(
        config, latent_scale=scale, control=ControlConfig(legend=mask_legend(data))
    )
    model = Report2CT(config, bundle_dir=encoders_dir)
    load_ema(model.codec.vae, vae)
    load_ema(model.denoiser, ldm)  # the UNet (and the label token, trained jointly)
    if (ldm.parent / "labels").is_dir():
        load_ema(model.denoiser, ldm.parent / "labels")  # the label token, on its own
    load_ema(model.denoiser, controlnet)  # the branch on top
    with torch.no_grad():  # rounded as the bundle stores them (`stored` dtype)
        for tensor in model.state_dict().values():
            if stored is not None and tensor.is_floating_point():
                tensor.copy_(tensor.to(stored))
    return model.eval()


def test_one_encoder_recipe_keeps_only_that_encoder(tmp_path):
    import dataclasses

    from report2ct.bundle import read_config
    from training.demo_bundle import build_demo_bundle, tiny_recipe

    recipe = dataclasses.replace(tiny_recipe(), encoders=("tiny-bert",))
    build_demo_bundle(tmp_path / "bundle", tmp_path / "work", recipe)
    config = read_config(tmp_path / "bundle")
    assert [e.name for e in config.encoders] == ["tiny-bert"] and config.context_dim == 32
    with pytest.raises(ValueError, match="not all in preset"):
        build_demo_bundle(
            tmp_path / "b2", tmp_path / "w2", dataclasses.replace(recipe, encoders=("CXR-BERT",))
        )


def test_stage_commands_train_vae_ldm_controlnet_then_export(tmp_path):
    """`ctfactory train vae`, `train ldm`, `train export` chained on a tiny
    preset: the exported bundle verifies and samples."""
    from typer.testing import CliRunner

    from jobs.cli import app
    from phantom.ctrate_layout import DatasetSpec, write_dataset
    from phantom.legend import LABELS
    from phantom.world import make_mask
    from report2ct.bundle import load_bundle, write_random_bert
    from report2ct.config import preset
    from report2ct.pipeline import VolumeRequest, generate

    tiny = preset("tiny")
    write_dataset(
        tmp_path / "data",
        DatasetSpec(n=6, seed=1, shape=tiny.default_shape, spacing_mm=tiny.default_spacing_mm),
    )
    write_random_bert(tmp_path / "enc/encoders/tiny-bert", hidden_size=32)
    runner = CliRunner()
    common = ["--preset", "tiny", "--steps", "2", "--micro-batch", "2"]
    vae_args = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "vae")]
    result = runner.invoke(app, ["train", "vae", *vae_args, *common, "--crop", "16", "16", "16"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        [
            *("train", "ldm", "--data", str(tmp_path / "data"), "--vae-run", str(tmp_path / "vae")),
            *("--out", str(tmp_path / "ldm"), "--encoders-dir", str(tmp_path / "enc"), *common),
        ],
    )
    assert result.exit_code == 0, result.output
    # The latent cache as shards, one sample per training volume (5 of 6 phantoms).
    assert json.loads((tmp_path / "ldm/latents/index.json").read_text())["count"] == 5
    assert not (tmp_path / "ldm/cache.safetensors").exists()
    result = runner.invoke(
        app,
        [
            *("train", "controlnet", "--data", str(tmp_path / "data")),
            *("--ldm-run", str(tmp_path / "ldm"), "--out", str(tmp_path / "control"), *common),
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        [
            *(
                "train",
                "export",
                "--vae-run",
                str(tmp_path / "vae"),
                "--ldm-run",
                str(tmp_path / "ldm"),
            ),
            *("--out", str(tmp_path / "bundle"), "--encoders-dir", str(tmp_path / "enc")),
            *("--controlnet-run", str(tmp_path / "control"), "--data", str(tmp_path / "data")),
            *("--preset", "tiny"),
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "bundle/config.json").read_text())
    assert document["metadata"]["steps"] == {"vae": 2, "ldm": 2, "controlnet": 2}
    assert (tmp_path / "bundle/training/loss_ldm.png").exists()
    assert (tmp_path / "bundle/controlnet.safetensors").exists()
    model = load_bundle(tmp_path / "bundle")
    assert model.config.control.legend == tuple(
        (label.value, label.name) for label in LABELS if label.value
    )
    mask, _ = make_mask(3, shape=tiny.default_shape, spacing_mm=tiny.default_spacing_mm)
    request = VolumeRequest(
        seed=1,
        findings="Cardiomegaly.",
        impression="Enlarged heart.",
        labels={"Cardiomegaly": 1},
        mask=mask,
    )
    volume = generate(model, [request], num_steps=2).volumes_hu
    runs = [tmp_path / name for name in ("vae", "ldm", "control", "data", "enc")]
    reference = generate(_model_from_runs(*runs), [request], num_steps=2).volumes_hu
    np.testing.assert_array_equal(volume, reference)
