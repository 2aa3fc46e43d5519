"""CLIP-style report/volume alignment, scored as CT-CLIP does.

A small 3D image encoder and a small text encoder trained contrastively
(symmetric InfoNCE, Radford et al. 2021, eq. in Fig. 3) on real phantom
(volume, report) pairs. They are deliberately separate from the encoders the
generator is conditioned on, so a generator cannot score well by matching its
own conditioning features.

Scores (CT-CLIP, Hamamci et al. 2024): text-to-image = max(100 · cos(image,
report), 0) of a generated volume and its own report; image-to-image = the
same between a generated volume and the real volume it should resemble.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from monai.networks.nets import ResNet
from torch import nn

from evaluation.bundle import EvalBundleModule
from evaluation.data import Case, stack_grid
from evaluation.metrics import clip_score

UNKNOWN = "<unk>"


def words(text: str) -> list[str]:
    """Lower-case words and word bigrams: a bag of single words cannot tell
    "pleural effusion" from "no pleural effusion was observed"; bigrams
    ("no pleural", "not observed") carry the negation."""
    tokens = re.findall(r"[a-z]+", text.lower())
    return tokens + [f"{a} {b}" for a, b in pairwise(tokens)]


class TextEncoder(nn.Module):
    """Bag of words and bigrams -> embedding. Phantom reports are short templated
    sentences, so word identity carries the findings; a vocabulary of the
    training reports' words is stored with the weights (JSON, no tokenizer files)."""

    def __init__(self, vocabulary: Sequence[str], dim: int) -> None:
        super().__init__()
        self.vocabulary = list(vocabulary)
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.embed = nn.EmbeddingBag(len(self.vocabulary), dim, mode="mean")
        self.proj = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        ids, offsets = [], []
        for text in texts:
            offsets.append(len(ids))
            ids.extend(self.index.get(w, 0) for w in words(text) or [UNKNOWN])
        return self.proj(self.embed(torch.tensor(ids), torch.tensor(offsets)))  # (B, dim)


class ClipModel(EvalBundleModule, nn.Module):
    KIND = "clip-pair"

    def __init__(
        self,
        *,
        vocabulary: Sequence[str],
        spacing_mm: Sequence[float],
        shape: Sequence[int],
        dim: int = 64,
        width: int = 8,
    ) -> None:
        super().__init__()
        self.config = {
            "vocabulary": list(vocabulary),
            "spacing_mm": list(spacing_mm),
            "shape": list(shape),
            "dim": dim,
            "width": width,
        }
        self.image = ResNet(
            block="basic",
            layers=(1, 1, 1, 1),
            block_inplanes=[width, 2 * width, 4 * width, 8 * width],
            spatial_dims=3,
            n_input_channels=1,
            conv1_t_size=3,
            conv1_t_stride=1,
            num_classes=dim,  # the head is the projection into the joint space
        )
        self.text = TextEncoder(vocabulary, dim)
        self.log_temperature = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def grid(self, cases: Sequence[Case]) -> torch.Tensor:
        return stack_grid(cases, spacing_mm=self.config["spacing_mm"], shape=self.config["shape"])

    @torch.no_grad()
    def embed_images(self, cases: Sequence[Case]) -> torch.Tensor:
        self.eval()
        return self.image(self.grid(cases))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        self.eval()
        return self.text(texts)


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, log_temperature: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of B pairs: (B, D), (B, D) -> scalar.

    Pairs whose reports are identical (common among templated phantoms) would
    be false negatives; they are given as positives too (soft targets)."""
    image = nn.functional.normalize(image, dim=-1)
    text = nn.functional.normalize(text, dim=-1)
    logits = image @ text.T * log_temperature.exp().clamp(max=100)  # (B, B)
    same = (text @ text.T > 1 - 1e-6).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (
        nn.functional.cross_entropy(logits, targets)
        + nn.functional.cross_entropy(logits.T, targets)
    )


def train_clip(
    cases: Sequence[Case],
    *,
    spacing_mm: Sequence[float],
    shape: Sequence[int],
    epochs: int = 20,
    batch_size: int = 16,
    lr: float = 3e-3,
    dim: int = 64,
    min_reports: int = 5,
    seed: int = 0,
) -> ClipModel:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    counts = Counter(w for c in cases for w in words(c.report))
    model = ClipModel(
        vocabulary=[UNKNOWN, *sorted(counts)], spacing_mm=spacing_mm, shape=shape, dim=dim
    )
    volumes = model.grid(cases)  # (N, 1, X, Y, Z)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(cases), generator=generator).split(batch_size):
            if len(batch) < 2:
                continue  # a contrastive step needs negatives
            x = volumes[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5  # left/right: labels hold
            x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(2), x)
            loss = contrastive_loss(
                model.image(x),
                model.text([cases[i].report for i in batch]),
                model.log_temperature,
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def clip_scores(
    model: ClipModel, generated: Sequence[Case], real: Sequence[Case]
) -> dict[str, Any]:
    """Mean CT-CLIP scores of generated cases.

    text_to_image: each generated volume against its own report.
    image_to_image: each generated volume against its real counterpart: the
    real case with the same id if there is one, else the real cases whose
    labels equal its labels (mean embedding); cases with neither are skipped
    and counted. real_text_to_image is the same text score on real cases: the
    ceiling the generated score should approach.
    """
    gen_image = model.embed_images(generated)
    real_image = model.embed_images(real)
    t2i = clip_score(gen_image, model.embed_texts([c.report for c in generated]))
    real_t2i = clip_score(real_image, model.embed_texts([c.report for c in real]))
    by_id = {c.id: i for i, c in enumerate(real)}
    real_labels = np.stack([c.labels for c in real])
    i2i, unmatched = [], 0
    for row, case in enumerate(generated):
        if case.id in by_id:
            target = real_image[by_id[case.id]]
        else:
            same = np.flatnonzero((real_labels == case.labels).all(1))
            if not same.size:
                unmatched += 1
                continue
            target = real_image[torch.from_numpy(same)].mean(0)
        i2i.append(clip_score(gen_image[row : row + 1], target[None]))
    return {
        "text_to_image": float(t2i.mean()),
        "image_to_image": float(torch.cat(i2i).mean()) if i2i else None,
        "real_text_to_image": float(real_t2i.mean()),
        "image_to_image_unmatched": unmatched,
    }
