"""`ctfactory train import-vae`: a pretrained MAISI VAE (random weights of
the preset's shape, saved as NVIDIA's checkpoints are) becomes a VAE run that
`train ldm --vae-run` and `train export` read like one trained here."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from jobs.cli import app
from report2ct.codec import LatentCodec, build_vae
from report2ct.config import preset
from training.engine import load_ema
from training.maisi import MaisiImportError, check_vae_state, import_maisi_vae

# MAISI's own `autoencoder_def` (config_maisi.json) at the paper's shape: the
# options that only change memory use, not the weights, as NVIDIA ran them.
MAISI_PAPER_VAE = dict(
    spatial_dims=3,
    in_channels=1,
    out_channels=1,
    latent_channels=4,
    num_channels=[64, 128, 256],
    num_res_blocks=[2, 2, 2],
    norm_num_groups=32,
    norm_eps=1e-6,
    attention_levels=[False, False, False],
    with_encoder_nonlocal_attn=False,
    with_decoder_nonlocal_attn=False,
    use_checkpointing=False,
    use_convtranspose=False,
    norm_float16=True,
    num_splits=8,
    dim_split=1,
)


def _random_vae_state(name: str = "tiny", seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_vae(preset(name).vae).state_dict().items()}


@pytest.mark.parametrize("layout", ["nested-pt", "flat-pt", "safetensors"])
def test_a_maisi_checkpoint_becomes_a_vae_run(layout, tmp_path):
    state = _random_vae_state()
    if layout == "nested-pt":  # as a DataParallel training script saves it
        path = tmp_path / "autoencoder_epoch273.pt"
        wrapped = {f"module.{k}": v for k, v in state.items()}
        torch.save({"epoch": 273, "autoencoder": wrapped, "optimizer": {"lr": 1e-4}}, path)
    elif layout == "flat-pt":
        path = tmp_path / "autoencoder.pt"
        torch.save(state, path)
    else:
        path = tmp_path / "autoencoder.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    result = CliRunner().invoke(
        app, ["train", "import-vae", str(path), "--out", str(tmp_path / "vae"), "--preset", "tiny"]
    )
    assert result.exit_code == 0, result.output
    codec = LatentCodec(preset("tiny").vae)
    assert load_ema(codec.vae, tmp_path / "vae") == 0
    for key, value in codec.vae.state_dict().items():
        torch.testing.assert_close(value, state[key].float(), msg=key)
    record = json.loads((tmp_path / "vae/imported.json").read_text())
    assert record["preset"] == "tiny" and len(record["sha256"]) == 64


def test_what_is_not_the_presets_vae_is_refused_and_nothing_written(tmp_path):
    wrong = tmp_path / "demo_vae.pt"
    torch.save({"state_dict": _random_vae_state("demo")}, wrong)
    with pytest.raises(MaisiImportError, match=r"not this preset's VAE shape: .* of another shape"):
        import_maisi_vae(wrong, tmp_path / "vae", preset("tiny"))
    assert not (tmp_path / "vae").exists()

    odd = tmp_path / "odd.pt"
    torch.save({"epoch": 3, "weights": [1, 2]}, odd)
    with pytest.raises(MaisiImportError, match="no state dict found; top-level keys"):
        import_maisi_vae(odd, tmp_path / "vae", preset("tiny"))

    pickled = tmp_path / "pickled.pt"
    torch.save(
        {"autoencoder": _random_vae_state(), "when": __import__("datetime").date(2024, 1, 1)},
        pickled,
    )
    result = CliRunner().invoke(
        app,
        ["train", "import-vae", str(pickled), "--out", str(tmp_path / "vae"), "--preset", "tiny"],
    )
    assert result.exit_code == 2 and "weights_only=True" in result.output

    good = tmp_path / "good.pt"
    torch.save(_random_vae_state(), good)
    import_maisi_vae(good, tmp_path / "vae", preset("tiny"))
    with pytest.raises(MaisiImportError, match="already holds a run"):
        import_maisi_vae(good, tmp_path / "vae", preset("tiny"))


def test_the_paper_preset_has_maisis_keys_and_shapes():
    """The published VAE's layout (MAISI's own constructor arguments) against
    the paper preset's, on the meta device: nothing is allocated or run."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    with torch.device("meta"):
        theirs = AutoencoderKlMaisi(**MAISI_PAPER_VAE).state_dict()
        ours = build_vae(preset("paper").vae).state_dict()
    assert len(theirs) > 100
    check_vae_state(ours, theirs, "MAISI's autoencoder_def")
    with torch.device("meta"):
        tiny = build_vae(preset("tiny").vae).state_dict()
    with pytest.raises(MaisiImportError, match="of another shape"):
        check_vae_state(tiny, theirs, "paper weights in tiny")


@pytest.mark.slow
def test_train_ldm_and_export_on_an_imported_vae_with_an_imported_encoder(tmp_path):
    """The imported VAE run and a `--encoder` text encoder through `train
    ldm` (two steps) and `train export`: the LDM run keeps the encoder it
    cached with and the bundle ships that one, so export needs no
    --encoders-dir."""
    from phantom.ctrate_layout import DatasetSpec, write_dataset
    from report2ct.bundle import load_bundle, verify_bundle, write_random_bert
    from report2ct.pipeline import VolumeRequest, generate

    tiny = preset("tiny")
    write_dataset(
        tmp_path / "data",
        DatasetSpec(n=4, seed=2, shape=tiny.default_shape, spacing_mm=tiny.default_spacing_mm),
    )
    vae = _random_vae_state(seed=1)
    torch.save({"state_dict": {f"module.{k}": v for k, v in vae.items()}}, tmp_path / "maisi.pt")
    bert = write_random_bert(tmp_path / "my-bert", hidden_size=32, seed=7)
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            *("train", "import-vae", str(tmp_path / "maisi.pt")),
            *("--out", str(tmp_path / "vae"), "--preset", "tiny"),
        ],
    )
    assert result.exit_code == 0, result.output
    ldm = [
        *("train", "ldm", "--data", str(tmp_path / "data"), "--vae-run", str(tmp_path / "vae")),
        *("--out", str(tmp_path / "ldm"), "--preset", "tiny", "--steps", "2"),
        *("--micro-batch", "2", "--encoder", f"tiny-bert={bert}"),
    ]
    result = runner.invoke(app, ldm)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ldm/encoders/tiny-bert/model.safetensors").is_file()
    # Resumed with other encoders, the run's cache would not match: refused.
    other = runner.invoke(app, [*ldm[:-1], f"tiny-bert={tmp_path / 'data'}"])
    assert other.exit_code == 2 and "use another --out" in other.output
    export = [
        *("train", "export", "--vae-run", str(tmp_path / "vae")),
        *(
            "--ldm-run",
            str(tmp_path / "ldm"),
            "--out",
            str(tmp_path / "bundle"),
            "--preset",
            "tiny",
        ),
    ]
    clash = runner.invoke(app, [*export, "--encoder", f"tiny-bert={bert}"])
    assert clash.exit_code == 2 and "trained with its own copy" in clash.output
    result = runner.invoke(app, export)
    assert result.exit_code == 0, result.output
    verify_bundle(tmp_path / "bundle")
    document = json.loads((tmp_path / "bundle/config.json").read_text())
    assert document["metadata"]["steps"] == {"vae": 0, "ldm": 2}
    model = load_bundle(tmp_path / "bundle")
    for key, value in model.codec.vae.state_dict().items():
        torch.testing.assert_close(value, vae[key], msg=key)
    shipped = model.conditioner.encode_texts(["Cardiomegaly."])[:, 384:]
    from report2ct.config import EncoderSpec
    from report2ct.text import TextConditioner

    direct = TextConditioner([EncoderSpec("b", str(bert), dim=32)]).encode_texts(["Cardiomegaly."])
    torch.testing.assert_close(shipped, direct)
    request = VolumeRequest(seed=0, findings="Cardiomegaly.", impression="Enlarged heart.")
    assert generate(model, [request], num_steps=2).volumes_hu.shape == (1, *tiny.default_shape)
