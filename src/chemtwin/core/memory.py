"""Refusing, before any work, what cannot fit in memory (the counterpart of ``files.check_free_space``)."""

from __future__ import annotations

import resource

import psutil

from chemtwin.errors import InputError


def _size(n_bytes: float) -> str:
    if n_bytes >= 1e10:
        return f"{n_bytes / 1e9:,.0f} GB"
    return f"{n_bytes / 1e9:.3g} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.3g} MB"


def check_memory(n_bytes: float, what: str) -> None:
    """InputError with the estimate when ``what`` (about ``n_bytes`` held in memory at once) exceeds the
    memory this process can have: the machine's available memory or its address-space limit (ulimit -v)."""
    available = psutil.virtual_memory().available
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        available = min(available, max(limit - psutil.Process().memory_info().vms, 0))
    if n_bytes > available:
        raise InputError(f"{what} needs about {_size(n_bytes)} of memory, this process can have about {_size(available)}")
