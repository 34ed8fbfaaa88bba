"""Helpers the benchmark scripts share.

The scripts run as ``python benchmarks/NAME.py``, which puts this folder on sys.path.
chemtwin and torch are imported inside the functions that need them: importing this
module must not load torch into the memory benchmarks that do not use it, nor need
chemtwin in the scripts that import it only later.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def add_training_run_arguments(ap, *, seconds: float, each: str, quick: str, work: str) -> None:
    """The options of the scripts that train fast faders on twin-pair sets and score them:
    --pairs, --seconds, --threads, --quick, --work, --json."""
    ap.add_argument("--pairs", default="3000,1500", metavar="TRAIN,VAL", help="twin pairs of the two sets (default 3000,1500)")
    ap.add_argument("--seconds", type=float, default=seconds, help=f"training time per {each} (default {seconds:g})")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--work", default=work, help=f"folder for data and models (default {work})")
    ap.add_argument("--json", default=None, help="results file (default WORK/results.json)")


def log(msg: str) -> None:
    """Progress goes to stderr, so that stdout holds the results alone."""
    print(msg, file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def machine() -> dict:
    """What a timing depends on (``chemtwin.evaluation.summary.machine_record``)."""
    from chemtwin.evaluation.summary import machine_record

    return machine_record()


def write_results(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path``, making its folder; atomic, so that an interrupted run
    leaves the previous results rather than a truncated file."""
    from chemtwin.core.files import atomic_output

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def print_or_write_json(result: dict, path: str | None) -> None:
    """The results as JSON: to ``path`` when given, else to stdout."""
    text = json.dumps(result, indent=2)
    if path:
        write_results(path, text + "\n")
        log(f"wrote {path}")
    else:
        print(text)
