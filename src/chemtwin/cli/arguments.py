"""Value types and option groups of the command line, shared by the ``chemtwin`` subcommands.

argparse calls a type with the option's text.  The types raise ``ArgumentTypeError``
because argparse prints its message as it is (one line, exit code 2):
``chemtwin cannon train: error: argument --order: expected a positive integer, got '0'``.
A plain ValueError would lose the message: argparse replaces it with "invalid ... value".
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Callable

from chemtwin.errors import InputError


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


def label_sigmas(text: str) -> dict:
    """``"TEFF=50,LOGG=0.07"`` -> {"TEFF": 50.0, "LOGG": 0.07}: labels with their 1-sigma errors
    (finite, >= 0; which labels are allowed is the user's to check)."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name.strip() in out:
            raise argparse.ArgumentTypeError(f"label {name.strip()} given twice in '{text}'")
        out[name.strip() or "?"] = _checked(item, lambda _: float(value), lambda v: 0 <= v < math.inf,
                                            "NAME=VALUE, VALUE finite and >= 0 (e.g. TEFF=50,LOGG=0.07)")
    return out


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


# ---------------------------------------------------------------- the one convention of every command
# (docs/architecture.md, "The command line"): outputs by -o/--out, lists comma-separated, -q/-v and
# --device where torch runs, --threads (threads in one process) and --workers (Dask processes).

class CommaList(argparse.Action):
    """A list option: ``--labels A,B,C``; the older forms ``--labels A B C`` and ``--labels A --labels B``
    still work.  Items keep their order; ``type`` (applied by argparse) sees each piece of text."""

    def __init__(self, option_strings, dest, nargs="+", item=str, **kwargs):
        self.item = item
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        values = [values] if isinstance(values, str) else values
        items = []
        for text in values:
            for piece in (p.strip() for p in text.split(",")):
                if piece:
                    try:
                        items.append(self.item(piece))
                    except argparse.ArgumentTypeError as exc:
                        raise argparse.ArgumentError(self, str(exc)) from None
        if not items:
            raise argparse.ArgumentError(self, "expected at least one item")
        previous = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, (list(previous) if previous else []) + items)


def star_key(text: str) -> int | str:
    """A star by row (a non-negative integer) or by its id (APOGEE_ID, the file's ``star_id``)."""
    return int(text) if text.isdigit() else text


def add_output(p, metavar: str, help: str, *, positional: bool = False, required: bool = True) -> None:
    """``-o/--out``; with ``positional``, the older positional form too, as a deprecated alias
    (``resolve_output`` settles the two after parsing)."""
    p.add_argument("-o", "--out", metavar=metavar, default=None, help=help + (" (required)" if required else ""))
    if positional:
        p.add_argument("out_positional", nargs="?", metavar=metavar, help="deprecated: the same as -o/--out")
    p.set_defaults(out_required=required)


def resolve_output(args) -> None:
    """``args.out`` from ``-o/--out`` or the deprecated positional output; InputError when both
    disagree or a required output is missing."""
    legacy = getattr(args, "out_positional", None)
    if legacy is not None:
        if args.out is not None and args.out != legacy:
            raise InputError(f"two outputs given, {legacy} and -o/--out {args.out}: give one, as -o/--out")
        logging.getLogger("chemtwin.cli").warning("the positional output %s is deprecated; write -o %s", legacy, legacy)
        args.out = legacy
    if getattr(args, "out_required", False) and getattr(args, "out", None) is None:
        raise InputError("the following arguments are required: -o/--out")


DEVICES = ("auto", "cpu", "cuda")


def device_name(text: str) -> str:
    """auto (cuda when there is one, else cpu), cpu, cuda or cuda:N."""
    if text in DEVICES or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got '{text}'")


def add_device(p, default: str = "auto", what: str = "where torch runs") -> None:
    p.add_argument("--device", type=device_name, default=default, metavar="{auto,cpu,cuda}",
                   help=f"{what}: auto (a GPU when there is one), cpu or cuda[:N] (default {default})")


def add_common_options(p) -> None:
    """``-q/--quiet`` and ``-v/--verbose`` on a (sub)command; also accepted before the command name."""
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debugging detail")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="log warnings and errors only, no progress bars")


def progress_bars(quiet: bool) -> bool:
    """The one rule for progress bars: shown unless --quiet, and only when stderr is a terminal
    (a log file or a pipe gets no bars)."""
    return not quiet and sys.stderr.isatty()


def wants_progress(args) -> bool:
    """Whether a command shows progress bars: ``args.progress`` (set by ``chemtwin.cli.main`` with
    ``progress_bars``), or the same rule on ``args.quiet`` for a namespace built elsewhere."""
    progress = getattr(args, "progress", None)
    return progress_bars(getattr(args, "quiet", False)) if progress is None else bool(progress)


def leaf_parsers(parser, prefix: str = ""):
    """``(command, parser)`` of every command that runs, nested ones included (``payne train``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                if nested:
                    yield from leaf_parsers(sub, f"{prefix}{name} ")
                else:
                    yield f"{prefix}{name}", sub
