"""Pretrained encoders into bundles, from the command line: stand-ins laid out
like the paper's three repositories (random weights, tiny preset dims).

- Bio_ClinicalBERT: `pytorch_model.bin` (a BertForPreTraining state dict),
  `config.json` and a bare `vocab.txt`, no tokenizer config;
- CXR-BERT-specialized: its own code (`configuration_cxrbert.py`,
  `modeling_cxrbert.py`, named by `auto_map`) and `pytorch_model.bin`;
- MedEmbed: a sentence-transformers repository (`model.safetensors`,
  `modules.json`, `1_Pooling/config.json`, an ONNX export beside it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from jobs.cli import app
from report2ct.bundle import BundleError, load_bundle, verify_bundle, write_random_bert

DIM = 32  # the tiny preset's `tiny-bert` slot

CONFIGURATION_CXRBERT = """
from transformers import BertConfig


class CXRBertConfig(BertConfig):
    model_type = "cxr-bert"

    def __init__(self, projection_size: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.projection_size = projection_size
"""

MODELING_CXRBERT = """
from dataclasses import dataclass

import torch
from transformers import BertForMaskedLM
from transformers.modeling_outputs import ModelOutput

from .configuration_cxrbert import CXRBertConfig


@dataclass
class CXRBertOutput(ModelOutput):
    last_hidden_state: torch.FloatTensor = None
    logits: torch.FloatTensor = None


class CXRBertModel(BertForMaskedLM):
    config_class = CXRBertConfig

    def __init__(self, config):
        super().__init__(config)
        self.cls_projection_head = torch.nn.Linear(config.hidden_size, config.projection_size)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        out = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=True,
            return_dict=True,
        )
        return CXRBertOutput(last_hidden_state=out.hidden_states[-1], logits=out.logits)
"""


def _bert_config(vocab_size: int, hidden: int, **extra) -> dict:
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    ).to_dict()
    return {**config, **extra}


def _vocab_size(folder: Path) -> int:
    return len((folder / "vocab.txt").read_text().splitlines())


def _bare_bert(folder: Path, seed: int) -> Path:
    """A random BERT's vocab.txt only, the tokenizer config left out."""
    write_random_bert(folder, hidden_size=8, seed=seed)
    for name in list(folder.iterdir()):
        if name.name != "vocab.txt":
            name.unlink()
    return folder


def make_clinical_bert(folder: Path, hidden: int = DIM) -> Path:
    from transformers import BertConfig, BertForPreTraining

    folder = _bare_bert(folder, seed=3)
    config = _bert_config(_vocab_size(folder), hidden, architectures=["BertForMaskedLM"])
    torch.manual_seed(3)
    model = BertForPreTraining(BertConfig(**config))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # keys "bert.*", "cls.*"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def make_cxr_bert(folder: Path, hidden: int = DIM) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    folder = _bare_bert(folder, seed=4)
    config = _bert_config(
        _vocab_size(folder),
        hidden,
        model_type="cxr-bert",
        architectures=["CXRBertModel"],
        projection_size=8,
        auto_map={
            "AutoConfig": "configuration_cxrbert.CXRBertConfig",
            "AutoModel": "modeling_cxrbert.CXRBertModel",
        },
    )
    torch.manual_seed(4)
    bert = BertForMaskedLM(BertConfig(**config))
    state = {
        **bert.state_dict(),
        "cls_projection_head.weight": torch.randn(8, hidden),
        "cls_projection_head.bias": torch.zeros(8),
    }
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True})
    )
    (folder / "configuration_cxrbert.py").write_text(CONFIGURATION_CXRBERT)
    (folder / "modeling_cxrbert.py").write_text(MODELING_CXRBERT)
    return folder


def make_med_embed(folder: Path, hidden: int = DIM) -> Path:
    folder = write_random_bert(folder, hidden_size=hidden, seed=5)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling/config.json").write_text(
        json.dumps({"word_embedding_dimension": hidden, "pooling_mode_cls_token": True})
    )
    (folder / "onnx").mkdir()
    (folder / "onnx/model.onnx").write_bytes(b"not shipped")
    return folder


@pytest.fixture(scope="module")
def clinical_bert(tmp_path_factory) -> Path:
    return make_clinical_bert(tmp_path_factory.mktemp("repos") / "Bio_ClinicalBERT")


@pytest.fixture(scope="module")
def cxr_bert(tmp_path_factory) -> Path:
    return make_cxr_bert(tmp_path_factory.mktemp("repos") / "CXR-BERT-specialized")


@pytest.fixture(scope="module")
def med_embed(tmp_path_factory) -> Path:
    return make_med_embed(tmp_path_factory.mktemp("repos") / "MedEmbed-large")


def _init(out: Path, *extra: str):
    return CliRunner().invoke(
        app, ["bundle", "init", "--preset", "tiny", "--out", str(out), *extra]
    )


def _encodes(bundle: Path, **kwargs) -> torch.Tensor:
    model = load_bundle(bundle, **kwargs)
    context = model.conditioner.encode(["Right pleural effusion."], ["Effusion."])
    assert context.shape == (1, 2, 384 + DIM) and torch.isfinite(context).all()
    return context


@pytest.mark.parametrize("repo", ["clinical_bert", "med_embed"])
def test_pickled_and_sentence_transformers_encoders_ship_as_safetensors(repo, request, tmp_path):
    source = request.getfixturevalue(repo)
    result = _init(tmp_path / "bundle", "--encoder", f"tiny-bert={source}")
    assert result.exit_code == 0, result.output
    shipped = tmp_path / "bundle/encoders/tiny-bert"
    assert (shipped / "model.safetensors").is_file()
    assert not list(shipped.rglob("*.bin")) and not (shipped / "onnx").exists()
    spec = json.loads((tmp_path / "bundle/config.json").read_text())["model"]["encoders"][1]
    assert spec["source"] == "bundle:encoders/tiny-bert" and spec["trust_remote_code"] is False
    context = _encodes(tmp_path / "bundle")
    # The shipped encoder is the source's weights, not a random stand-in.
    other = tmp_path / "random"
    assert _init(other).exit_code == 0
    assert not torch.allclose(context[..., 384:], _encodes(other)[..., 384:])


def test_remote_code_ships_checksummed_and_needs_allowing(cxr_bert, tmp_path):
    bundle = tmp_path / "bundle"
    refused = _init(bundle, "--encoder", f"tiny-bert={cxr_bert}")
    assert refused.exit_code == 2 and "--allow-remote-code" in refused.output
    assert not bundle.exists()  # nothing written half-way

    result = _init(bundle, "--encoder", f"tiny-bert={cxr_bert}", "--allow-remote-code")
    assert result.exit_code == 0, result.output
    shipped = bundle / "encoders/tiny-bert"
    assert sorted(p.name for p in shipped.glob("*.py")) == [
        "configuration_cxrbert.py",
        "modeling_cxrbert.py",
    ]
    sums = (bundle / "SHA256SUMS").read_text()
    assert "encoders/tiny-bert/modeling_cxrbert.py" in sums
    verify_bundle(bundle)
    with pytest.raises(Exception, match="allow_remote_code=True"):
        load_bundle(bundle)
    _encodes(bundle, allow_remote_code=True)

    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    with (tampered / "encoders/tiny-bert/modeling_cxrbert.py").open("a") as handle:
        handle.write("\nimport os  # injected\n")
    with pytest.raises(BundleError, match=r"modeling_cxrbert\.py: checksum mismatch"):
        verify_bundle(tampered)


def test_code_is_refused_outside_a_remote_code_encoder(cxr_bert, tmp_path):
    from report2ct.bundle import write_checksums

    assert (
        _init(tmp_path / "b", "--encoder", f"tiny-bert={cxr_bert}", "--allow-remote-code").exit_code
        == 0
    )
    # An unlisted code file beside the allowed ones.
    extra = tmp_path / "b/encoders/tiny-bert/extra.py"
    extra.write_text("print('hi')\n")
    with pytest.raises(BundleError, match=r"extra\.py: not listed"):
        verify_bundle(tmp_path / "b")
    extra.unlink()
    # Code in an encoder that does not trust remote code, even when listed.
    document = json.loads((tmp_path / "b/config.json").read_text())
    document["model"]["encoders"][1]["trust_remote_code"] = False
    (tmp_path / "b/config.json").write_text(json.dumps(document))
    write_checksums(tmp_path / "b")
    with pytest.raises(BundleError, match=r"_cxrbert\.py: file type not allowed"):
        verify_bundle(tmp_path / "b")


def test_bad_encoder_options_name_the_encoder(clinical_bert, tmp_path):
    result = _init(tmp_path / "x", "--encoder", "nope")
    assert result.exit_code == 2 and "NAME=SOURCE" in result.output
    result = _init(tmp_path / "x", "--encoder", f"CXR-BERT={clinical_bert}")
    assert result.exit_code == 2 and "not an encoder of preset 'tiny'" in result.output
    result = _init(tmp_path / "x", "--encoder", "tiny-bert=someone/not-cached")
    assert result.exit_code == 2 and "local Hugging Face cache" in result.output
    result = _init(tmp_path / "x", "--encoder", f"tiny-bert={tmp_path / 'missing'}")
    assert result.exit_code == 2 and "missing is not a directory" in result.output
    result = _init(tmp_path / "x", "--encoder", f"all-MiniLM-L6-v2={clinical_bert}")
    assert result.exit_code == 2 and "hidden size 32" in result.output
    assert not (tmp_path / "x").exists()


def test_a_hub_id_is_read_from_the_local_cache(clinical_bert, tmp_path, monkeypatch):
    """A hub id resolves through `snapshot_download(local_files_only=True)`;
    the snapshot's commit becomes the encoder's revision."""
    import huggingface_hub

    snapshot = tmp_path / "hub/snapshots/0123abcd"
    shutil.copytree(clinical_bert, snapshot)
    asked = {}

    def offline_snapshot(repo_id, *, revision=None, local_files_only=False, **_):
        asked.update(repo_id=repo_id, local_files_only=local_files_only)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline_snapshot)
    result = _init(tmp_path / "b", "--encoder", "tiny-bert=emilyalsentzer/Bio_ClinicalBERT")
    assert result.exit_code == 0, result.output
    assert asked == {"repo_id": "emilyalsentzer/Bio_ClinicalBERT", "local_files_only": True}
    spec = json.loads((tmp_path / "b/config.json").read_text())["model"]["encoders"][1]
    assert spec["revision"] == "0123abcd"
    _encodes(tmp_path / "b")


def test_the_paper_presets_three_encoders_at_their_widths(tmp_path):
    """The `paper` preset's names and widths (768, 1024, 768; two layers
    each), imported as `bundle init --preset paper` does: CXR-BERT carries
    its code and trusts it, the other two do not; the context is 2560-d."""
    from report2ct.config import preset
    from report2ct.text import TextConditioner
    from training.encoder import EncoderImportError, import_encoders

    repos = {
        "BiomedVLP-CXR-BERT-specialized": make_cxr_bert(tmp_path / "cxr", 768),
        "MedEmbed-large-v0.1": make_med_embed(tmp_path / "med", 1024),
        "Bio_ClinicalBERT": make_clinical_bert(tmp_path / "clinical", 768),
    }
    overrides = {name: str(folder) for name, folder in repos.items()}
    with pytest.raises(EncoderImportError, match=r"BiomedVLP.*--allow-remote-code"):
        import_encoders(preset("paper"), tmp_path / "refused", overrides)
    config, dirs = import_encoders(
        preset("paper"), tmp_path / "bundle", overrides, allow_remote_code=True
    )
    assert [(e.source, e.trust_remote_code) for e in config.encoders] == [
        ("bundle:encoders/BiomedVLP-CXR-BERT-specialized", True),
        ("bundle:encoders/MedEmbed-large-v0.1", False),
        ("bundle:encoders/Bio_ClinicalBERT", False),
    ]
    assert sorted(dirs) == sorted(e.source.removeprefix("bundle:") for e in config.encoders)
    conditioner = TextConditioner(
        config.encoders, bundle_dir=tmp_path / "bundle", allow_remote_code=True
    )
    context = conditioner.encode(["Bilateral pleural effusion."], [None])
    assert context.shape == (1, 2, 2560) and context[0, 0].abs().sum() > 0
