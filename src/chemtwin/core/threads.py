"""Torch's intra-op thread count, set for a block of work and restored after it."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch threads.  Work that spreads small batches over its own
    Python threads uses 1: torch's threading costs more than it gains on small operations."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
