"""Per-sample random streams: a volume is a function of (bundle, record,
seed) only, never of the batch it rides in, the worker, or the GPU count
(edm2's `StackedRandomGenerator` idea)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def per_sample_randn(
    shape: Sequence[int], seeds: Sequence[int], *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, sample i drawn from its own
    CPU generator seeded with seeds[i] (CPU so that the same seed gives the
    same noise on any device), then moved to `device`."""
    noise = torch.empty(len(seeds), *shape)
    for i, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(int(seed))
        noise[i] = torch.randn(*shape, generator=generator)
    return noise.to(device)
