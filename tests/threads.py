"""Torch's intra-op threads for tests on shared cores."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` intra-op threads, then restore the count. The test
    machines' cores are shared: threads spinning against other processes
    made a 10 s training take 45-240 s (measured)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
