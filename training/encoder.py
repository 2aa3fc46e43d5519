"""A small BERT for the offline `demo` preset: a WordPiece vocabulary and a
masked-language model learned from the training reports, saved as an
ordinary transformers directory (safetensors) that the bundle ships.

No biomedical BERT can be downloaded here; with real CT-RATE and network
access, the `paper` preset's hub encoders take its place through the same
loading code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def train_report_bert(
    texts: list[str],
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    layers: int = 2,
    steps: int = 300,
    batch_size: int = 32,
    max_length: int = 128,
    vocab_size: int = 2000,
    seed: int = 0,
) -> Path:
    from tokenizers import BertWordPieceTokenizer
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertTokenizer,
        DataCollatorForLanguageModeling,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2)
    wordpiece.save_model(str(out))  # vocab.txt
    tokenizer = BertTokenizer(vocab=str(out / "vocab.txt"), do_lower_case=True)

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer.vocab),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 32),
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_length,
    )
    model = BertForMaskedLM(config)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        picks = torch.randint(0, len(texts), (batch_size,), generator=generator).tolist()
        encoded = tokenizer([texts[i] for i in picks], truncation=True, max_length=max_length)
        batch = collator([{"input_ids": ids} for ids in encoded["input_ids"]])
        loss = model(
            input_ids=batch["input_ids"],
            labels=batch["labels"],
            attention_mask=(batch["input_ids"] != tokenizer.pad_token_id).long(),
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("report-bert step %d mlm loss %.3f", step, loss.item())
    model.bert.save_pretrained(out, safe_serialization=True)  # the encoder, without the MLM head
    tokenizer.save_pretrained(out)
    return out
