"""Per-sample random streams: a volume is a function of (bundle, record,
seed) only, never of the batch it rides in, the worker, or the GPU count
(edm2's `StackedRandomGenerator` idea)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where noise is drawn: the seed rule stays light
    import torch


def per_sample_randn(
    shape: Sequence[int], seeds: Sequence[int], *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, sample i drawn from its own
    CPU generator seeded with seeds[i] (CPU so that the same seed gives the
    same noise on any device), then moved to `device`."""
    import torch

    noise = torch.empty(len(seeds), *shape)
    for i, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(int(seed))
        noise[i] = torch.randn(*shape, generator=generator)
    return noise.to(device)


def volume_seed(record_id: str, seed: int | None, sample: int = 0) -> int:
    """The seed of sample `sample` of a record: the record's own seed, or one
    derived from its id when it gives none, plus the sample's index. The one
    rule the factory, the evaluation and the ablations all use, so the same
    record gives the same volume in each of them and in every rerun."""
    base = (
        seed
        if seed is not None
        else int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:6], "big")
    )
    return base + sample
