"""The ``chemtwin`` command line.

Each command lives in its own module with a ``register(subparsers)`` function that
adds its parser and sets ``func``.  Bad input raises ``InputError``: we print one
line to stderr and exit with code 2, with the Python parameters the message names
(``InputError.options``) shown as the command's flags.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

from chemtwin import __version__
from chemtwin.core.files import describe_error
from chemtwin.errors import InputError

# Modules in chemtwin.cli, in the order their commands appear in --help.
COMMAND_MODULES = (
    "bench",  # the whole protocol: generate, train, evaluate every method, report
    "generate",
    "info",
    "plot",  # registers `plot-spectra`
    "train",
    "embed",
    "evaluate",
    "whiten",  # latents in the twin metric
    "ingest",
    "augment",
    "plot_gap",  # registers `plot-gap`
    "search",   # registers `index` and `search`
    "cluster",
    "payne",  # registers `payne train` and `payne fit`
    "cannon",  # registers `cannon train` and `cannon test`
)


# Library parameters whose flag is not "--" + the name with "-" for "_".
FLAG_NAMES = {"n_components": "--components", "max_train_stars": "--train-stars", "lambda_adv": "--lambda",
              "jacobian_file": "--jacobians"}


def flag_message(exc: InputError) -> str:
    """The error's message with each parameter it names (``overwrite=True``, ``n_groups``) as its flag."""
    text = str(exc)
    for option in exc.options:
        flag = FLAG_NAMES.get(option, "--" + option.replace("_", "-"))
        text = re.sub(rf"(?<![\w.-]){re.escape(option)}(=True)?(?![\w-])", flag, text)
    return text


class OneLineParser(argparse.ArgumentParser):
    """argparse with the project's answer to bad input: one line ``chemtwin CMD: error: ...``,
    exit 2 (``--help`` still shows the usage); subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="chemtwin",
        description="Find chemically identical stars (chemical twins) from their spectra.",
    )
    parser.add_argument("--version", action="version", version=f"chemtwin {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"chemtwin.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's usage error (exit 2), --help or --version (0): a return code here
        return exc.code if isinstance(exc.code, int) else 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"chemtwin {args.command}: error: {flag_message(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The machine, not chemtwin: a full disk, a file too large, a name too long, no permission.
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"chemtwin {args.command}: error: {where}{exc.strerror or describe_error(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"chemtwin {args.command}: error: not enough memory for this input", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chemtwin {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
