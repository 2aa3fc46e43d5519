"""The whole training path at tiny scale: phantoms -> report BERT -> VAE ->
caches -> LDM -> exported bundle that the model core loads and samples."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_demo_path_exports_a_bundle_the_model_core_samples(tmp_path):
    from report2ct.bundle import load_bundle, verify_bundle
    from report2ct.pipeline import generate
    from training.demo_bundle import build_demo_bundle, tiny_recipe

    sha = build_demo_bundle(tmp_path / "bundle", tmp_path / "work", tiny_recipe())
    assert verify_bundle(tmp_path / "bundle") == sha
    document = json.loads((tmp_path / "bundle/config.json").read_text())
    assert document["metadata"]["trained"] is True and document["model"]["latent_scale"] != 1.0
    assert (tmp_path / "bundle/training/loss_ldm.png").exists()
    assert (
        tmp_path / "bundle/encoders/tiny-bert/model.safetensors"
    ).exists()  # the trained report BERT
    model = load_bundle(tmp_path / "bundle")
    result = generate(
        model,
        findings=["Right pleural effusion."],
        impressions=["Effusion."],
        spacings_mm=[model.config.default_spacing_mm],
        seeds=[0],
        num_steps=2,
    )
    assert result.volumes_hu.shape == (1, 32, 32, 16) and np.isfinite(result.volumes_hu).all()


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
