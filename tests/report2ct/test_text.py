"""The text conditioner with two tiny local BERTs and the packaged MiniLM."""

import pytest
import torch

from report2ct.bundle import write_random_bert
from report2ct.config import MINILM, EncoderSpec
from report2ct.text import EncoderLoadError, TextConditioner


@pytest.fixture(scope="module")
def conditioner(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    specs = [
        EncoderSpec(
            "bert-a",
            str(write_random_bert(root / "a", hidden_size=32, seed=1)),
            dim=32,
            max_tokens=128,
        ),
        EncoderSpec("bert-b", "bundle:b", dim=48, max_tokens=64),
        MINILM,
    ]
    write_random_bert(root / "b", hidden_size=48, seed=2)
    return TextConditioner(specs, bundle_dir=root)


def test_context_shape_is_two_tokens_of_all_encoders(conditioner):
    context = conditioner.encode(
        ["Right pleural effusion.", "Normal lungs."], ["Effusion.", "Normal."]
    )
    assert context.shape == (2, 2, 32 + 48 + 384)
    assert conditioner.null_context(3).shape == (3, 2, 464)
    assert not torch.equal(context[0, 0], context[0, 1])  # findings and impression differ


def test_pooling_ignores_padding(conditioner):
    short = "Small nodule."
    alone = conditioner.encode_texts([short])
    conditioner._cache.clear()
    padded = conditioner.encode_texts([short, "word " * 40])[0:1]  # batched with a longer text
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-4)


def test_long_reports_are_windowed_not_truncated(conditioner):
    head = "The trachea and both main bronchi are open. " * 30  # > 128 tokens
    a = conditioner.encode_texts([head + "No effusion."])
    b = conditioner.encode_texts([head + "Large left pleural effusion with atelectasis."])
    for start, stop in ((0, 32), (32, 80), (80, 464)):  # every encoder sees the tail
        assert not torch.allclose(a[0, start:stop], b[0, start:stop]), (start, stop)


def test_cache_hits_and_returns_the_same_vectors(conditioner):
    conditioner._cache.clear()
    hits = conditioner.cache_hits
    first = conditioner.encode_texts(["Cardiomegaly."])
    second = conditioner.encode_texts(["Cardiomegaly."])
    assert conditioner.cache_hits - hits == 3  # one hit per encoder
    torch.testing.assert_close(first, second)


def test_remote_code_and_escapes_are_refused(tmp_path):
    with pytest.raises(EncoderLoadError, match="trust_remote_code"):
        TextConditioner([EncoderSpec("x", "some/hub-model", dim=8, trust_remote_code=True)])
    with pytest.raises(EncoderLoadError, match="outside the bundle"):
        TextConditioner([EncoderSpec("x", "bundle:../../etc", dim=8)], bundle_dir=tmp_path)


def test_a_checkpoint_without_its_pooler_loads_one_without_encoder_weights_is_refused(tmp_path):
    """The context pools the last hidden state, so a missing pooler head is
    fine; a missing encoder layer would be random weights: refused."""
    from safetensors.torch import load_file, save_file

    for dropped, refused in (("pooler.", False), ("encoder.layer.0.", True)):
        where = write_random_bert(tmp_path / dropped, hidden_size=32)
        weights = load_file(where / "model.safetensors")
        kept = {k: v for k, v in weights.items() if not k.startswith(dropped)}
        assert len(kept) < len(weights)
        save_file(kept, where / "model.safetensors", metadata={"format": "pt"})
        spec = EncoderSpec("bert", str(where), dim=32)
        if refused:
            with pytest.raises(EncoderLoadError, match=r"lacks .* weights the context needs"):
                TextConditioner([spec])
        else:
            assert TextConditioner([spec]).encode_texts(["Effusion."]).shape == (1, 32)
