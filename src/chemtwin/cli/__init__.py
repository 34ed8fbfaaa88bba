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
    "starnet",  # registers `starnet train` and `starnet predict`
    "cyclestarnet",  # registers `cyclestarnet train|fit|embed|tsne`
)


# Library parameters whose flag is not "--" + the name with "-" for "_".
FLAG_NAMES = {"n_components": "--components", "max_train_stars": "--train-stars", "lambda_adv": "--lambda",
              "jacobian_file": "--jacobians", "teff_random": "--teff-error", "logg_random": "--logg-error",
              "teff_per_feh": "--teff-systematic", "logg_per_feh": "--logg-systematic"}


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
    with StopSignals() as stop:
        try:
            resolve_output(args)
            code = int(args.func(args) or 0)
            # a stop that a callback swallowed and that came back too late: the work is whole, but say so
            return _stopped(args.command, stop.received) if stop.received is not None else code
        except BaseException as exc:
            if stop.received is not None or isinstance(exc, KeyboardInterrupt):
                return _stopped(args.command, stop.received or (signal.SIGTERM if isinstance(exc, Terminated)
                                                                else signal.SIGINT))
            if isinstance(exc, InputError):
                return _error(args.command, flag_message(exc))
            if isinstance(exc, MemoryError):
                return _error(args.command, "not enough memory for this input")
            # The machine, not chemtwin: a full disk, a file too large, a name too long, no permission
            # (an OSError, or one that h5py or safetensors wrapped in their own exception type).
            machine = (disk_error(exc) or (exc if isinstance(exc, OSError) else None)) if isinstance(exc, Exception) else None
            if machine is None:
                raise
            where = f"{machine.filename}: " if getattr(machine, "filename", None) else ""
            return _error(args.command, f"{where}{machine.strerror or describe_error(machine)}")


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


class StopSignals:
    """While a command runs, Ctrl-C (SIGINT) raises KeyboardInterrupt and SIGTERM raises Terminated, and
    each is remembered: a signal that lands inside a library's callback can come out as that library's
    own exception (h5py turns it into a TypeError), and the command must still end as stopped, with
    its clean-up done and exit 130 or 143, not with that exception.  Off the main thread, where Python
    cannot handle signals, nothing changes."""

    def __init__(self):
        self.received = None
        self._previous = {}
        self._previous_hook = None

    def _handler(self, signum, frame):
        self.received = signum
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    def _unraisable(self, unraisable) -> None:
        """The stop raised inside a weakref callback or a destructor, where Python only prints it and
        goes on: raise it again 50 ms later (SIGALRM), once that callback is over."""
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and self.received is not None:
            signal.setitimer(signal.ITIMER_REAL, 0.05)
        else:
            self._previous_hook(unraisable)

    def _alarm(self, signum, frame):
        if self.received is not None:
            self._handler(self.received, frame)

    def __enter__(self) -> "StopSignals":
        for signum, handler in ((signal.SIGINT, self._handler), (signal.SIGTERM, self._handler),
                                (signal.SIGALRM, self._alarm)):
            try:
                self._previous[signum] = signal.signal(signum, handler)
            except ValueError:
                return self
        self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc) -> None:
        if self._previous_hook is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            sys.unraisablehook = self._previous_hook
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _stopped(command: str, signum: int) -> int:
    print(f"chemtwin {command}: {'terminated' if signum == signal.SIGTERM else 'interrupted'}", file=sys.stderr)
    return 128 + signum


def _error(command: str, message: str) -> int:
    """The one line of a failed command (libraries' messages can span lines: joined here)."""
    print(f"chemtwin {command}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2

if __name__ == "__main__":
    sys.exit(run())
