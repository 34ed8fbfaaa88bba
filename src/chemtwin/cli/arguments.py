"""Value types and option groups of the command line, shared by the ``chemtwin`` subcommands.

argparse calls a type with the option's text.  The types raise ``ArgumentTypeError``
because argparse prints its message as it is (one line, exit code 2):
``chemtwin cannon train: error: argument --order: expected a positive integer, got '0'``.
A plain ValueError would lose the message: argparse replaces it with "invalid ... value".
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _checked(text: str, convert: Callable[[str], float], is_valid: Callable[[float], bool], expected: str):
    """``convert(text)`` when it parses and ``is_valid`` accepts it; else the one-line argparse error."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'") from None
    if not is_valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got '{text}'")
    return value


# Every count, size and index of chemtwin fits in 32 bits (a dataset of 2^31 stars would not fit
# a disk); larger values are typos or attacks, refused before any work.
COUNT_LIMIT = 2**31 - 1
# Seeds go to numpy and torch generators; torch takes at most 64 bits, and seed + k is used.
SEED_LIMIT = 2**63 - 1


def positive_int(text: str) -> int:
    return _checked(text, int, lambda value: 1 <= value <= COUNT_LIMIT, "a positive integer below 2^31")


def non_negative_int(text: str) -> int:
    return _checked(text, int, lambda value: 0 <= value <= COUNT_LIMIT, "a non-negative integer below 2^31")


# More threads than this helps no machine we know of, and OpenMP and FAISS crash on absurd counts.
THREAD_LIMIT = 1024


def thread_count(text: str) -> int:
    return _checked(text, int, lambda value: 1 <= value <= THREAD_LIMIT, f"a number of threads from 1 to {THREAD_LIMIT}")


def seed(text: str) -> int:
    return _checked(text, int, lambda value: 0 <= value <= SEED_LIMIT, "a seed from 0 to 2^63 - 1")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _checked(text, float, lambda value: 0 < value < math.inf, "a positive number")


def non_negative_float(text: str) -> float:
    """A number >= 0; inf is accepted, NaN is not."""
    return _checked(text, float, lambda value: value >= 0, "a non-negative number")


def finite_non_negative_float(text: str) -> float:
    """A finite number >= 0 (a weight, where inf would make every loss inf or NaN)."""
    return _checked(text, float, lambda value: 0 <= value < math.inf, "a finite non-negative number")


def fraction_below_one(text: str) -> float:
    """A number in [0, 1), such as the share of stars held out for validation."""
    return _checked(text, float, lambda value: 0 <= value < 1, "a number in [0, 1)")


def positive_fraction(text: str) -> float:
    """A number in (0, 1], such as a minimum purity."""
    return _checked(text, float, lambda value: 0 < value <= 1, "a number in (0, 1]")


def name_list(values: list[str] | None) -> list[str] | None:
    """The names given to a ``nargs="+"`` option, space- or comma-separated; None when there are none."""
    if values is None:
        return None
    names = [name for value in values for name in value.replace(",", " ").split() if name]
    return names or None


# ---------------------------------------------------------------- scale-out options
def add_cluster_options(p, unit: str, default_size: int) -> None:
    """``--workers``, ``--scheduler``, ``--shard-size`` and ``--connect-timeout`` of a command."""
    g = p.add_argument_group("scale-out with Dask (docs/distributed.md); OUT is then a folder of shards + manifest.json")
    g.add_argument("--workers", type=positive_int, metavar="N",
                   help="run on a local Dask cluster of N worker processes, one thread each")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on an existing Dask cluster, e.g. tcp://10.0.0.1:8786; its workers must see OUT at the same path")
    g.add_argument("--shard-size", type=positive_int, default=default_size, metavar="N",
                   help=f"{unit} per shard, one task each (default {default_size})")
    g.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="give up on an unreachable --scheduler after this long (default 10)")


def wants_cluster(args) -> bool:
    return getattr(args, "workers", None) is not None or getattr(args, "scheduler", None) is not None
