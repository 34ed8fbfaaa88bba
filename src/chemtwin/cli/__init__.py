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
import signal
import sys

from chemtwin import __version__
from chemtwin.cli.arguments import add_common_options, leaf_parsers, progress_bars, resolve_output
from chemtwin.core.files import describe_error, disk_error
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
    "cyclestarnet",  # registers `cyclestarnet train|fit|embed|tsne`
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

    def add_argument(self, *names, **kwargs):
        """Every ``--out`` is also ``-o`` (the output of every command, docs/architecture.md)."""
        if "--out" in names and "-o" not in names:
            names = ("-o",) + names
        return super().add_argument(*names, **kwargs)


# Libraries whose INFO lines are not chemtwin's news (Dask's cluster start-up, font subsetting, ...).
QUIET_LOGGERS = ("distributed", "dask", "bokeh", "tornado", "asyncio", "fontTools", "matplotlib", "PIL", "h5py",
                 "numexpr", "numba", "faiss", "urllib3", "torch", "sklearn")


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
    for _, command in leaf_parsers(parser):
        add_common_options(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse's usage error (exit 2), --help or --version (0): a return code here
        return exc.code if isinstance(exc.code, int) else 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    args.progress = progress_bars(args.quiet)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = _on_sigterm_raise()
    try:
        resolve_output(args)
        return int(args.func(args) or 0)
    except Terminated:
        print(f"chemtwin {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except InputError as exc:
        return _error(args.command, flag_message(exc))
    except MemoryError:
        return _error(args.command, "not enough memory for this input")
    except KeyboardInterrupt:
        print(f"chemtwin {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # The machine, not chemtwin: a full disk, a file too large, a name too long, no permission
        # (an OSError, or one that h5py or safetensors wrapped in their own exception type).
        machine = disk_error(exc) or (exc if isinstance(exc, OSError) else None)
        if machine is None:
            raise
        where = f"{machine.filename}: " if getattr(machine, "filename", None) else ""
        return _error(args.command, f"{where}{machine.strerror or describe_error(machine)}")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run() -> int:
    """The ``chemtwin`` program: ``main`` on sys.argv, then signals ignored while the interpreter
    shuts down (the work is done and its files are in place: a late Ctrl-C or SIGTERM must not
    interrupt library finalizers with a traceback)."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's stop, ``kill``), raised like Ctrl-C so that the same clean-up runs:
    temporary files are deleted and an interrupted training writes its checkpoint."""


def _on_sigterm_raise():
    """Make SIGTERM raise Terminated; the previous handler (None off the main thread, where Python
    cannot handle signals)."""
    def handler(signum, frame):
        raise Terminated

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def _error(command: str, message: str) -> int:
    """The one line of a failed command (libraries' messages can span lines: joined here)."""
    print(f"chemtwin {command}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2

if __name__ == "__main__":
    sys.exit(run())
