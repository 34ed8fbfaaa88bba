"""``chemtwin ingest FILES... --catalog CAT.fits --out DATA.h5``: real APOGEE spectra -> dataset.

``chemtwin ingest --catalog allStar.fits --root MIRROR --out DATA.h5`` takes the stars from the
catalogue (quality cuts, one row per APOGEE_ID) and their files from the DR17 layout under a
local mirror (docs/workflow.md).  Either way one row per APOGEE_ID is written, with allStar's
TELESCOPE and FIELD as the dataset's ``telescope`` and ``field`` columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from chemtwin.cli.arguments import add_cluster_options, non_negative_int, wants_cluster, wants_progress
from chemtwin.core.files import prepare_output
from chemtwin.core.grids import GRID_NAMES, get_grid
from chemtwin.data.allstar import (
    ASPCAPFLAG_STAR_BAD,
    DR17_TELESCOPES,
    STARFLAG_BAD,
    STARFLAG_BAD_BITS,
    QualityCuts,
    Selection,
    check_telescope,
    read_catalog,
    select_files,
    select_mirror,
)
from chemtwin.data.apogee import DR17_LAYOUT, read_spectrum
from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.data.preprocess import CONTINUUM_MASKS, DEFAULT_DEGREE, preprocess
from chemtwin.data.shards import dask_client
from chemtwin.errors import InputError

FLUSH_ROWS = 64
TEXT_COLUMNS = ("telescope", "field")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="turn real APOGEE spectra (apStar/aspcapStar/apVisit) into a dataset",
        description=(
            "Read APOGEE spectra, shift them to the rest frame, normalize the pseudo-continuum, "
            "put them on an APOGEE grid and write a chemtwin dataset (the layout of `chemtwin "
            "generate`, with star_id = APOGEE_ID and group = -1). Labels come from an "
            "allStar-style catalogue matched by APOGEE_ID. Files that cannot be used are reported "
            "and skipped; exit code 1 if some failed, 2 if none could be used. With --root the stars come "
            "from the catalogue (quality cuts) and their files from the DR17 layout of a local mirror. "
            "One row per APOGEE_ID: duplicates (two telescopes, apStar and aspcapStar) keep the highest "
            "SNR, or the --telescope choice (docs/workflow.md)."
        ),
    )
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="spectrum files or quoted glob patterns, ** recursive (e.g. 'mirror/**/apStar-*.fits')")
    p.add_argument("--catalog", required=True, metavar="CAT.fits", help="allStar-style FITS table with APOGEE_ID, TEFF, LOGG (+ other labels)")
    p.add_argument("--out", required=True, metavar="DATA.h5", help="dataset file to write")
    p.add_argument("--labels", metavar="A,B,...", help="catalogue columns to store (default: TEFF, LOGG and every other chemtwin label the catalogue has)")
    add_spectrum_options(p, grid_default="aspcap", grid_help="output wavelength grid (default: aspcap, 7,214 px)")
    p.add_argument("--root", metavar="MIRROR",
                   help="local mirror of the SDSS archive: ingest the catalogue's stars (after the quality cuts) from "
                        "MIRROR/apogee/spectro/redux/dr17/stars/TELESCOPE/FIELD/apStar-dr17-APOGEE_ID.fits "
                        "(or the aspcapStar files, --spectra); no FILE arguments then")
    p.add_argument("--spectra", default="apStar", metavar="KIND",
                   help=f"with --root: which DR17 files to read, {' or '.join(DR17_LAYOUT)} (default: apStar)")
    p.add_argument("--telescope", metavar="NAME",
                   help=f"only spectra from this telescope ({', '.join(DR17_TELESCOPES)}); default: any, the highest "
                        "SNR wins when a star has several")
    p.add_argument("--quality-cuts", choices=("on", "off"), default=None,
                   help="apply the quality cuts below (default: on with --root, off with FILE arguments)")
    p.add_argument("--min-snr", type=float, default=70.0, help="quality cut: allStar SNR above this (default: 70)")
    p.add_argument("--starflag-mask", type=int, default=STARFLAG_BAD,
                   help=f"quality cut: no allStar STARFLAG bit of this mask set (default: {STARFLAG_BAD} = bits "
                        f"{', '.join(map(str, STARFLAG_BAD_BITS))}, the pipeline's BAD bits; 0 = off). ASPCAPFLAG "
                        "STAR_BAD (bit 23) is cut unless --keep-flagged")
    p.add_argument("--teff-range", default="4000:5500", metavar="LO:HI",
                   help="quality cut: TEFF range (default: 4000:5500, the red-giant training prior)")
    p.add_argument("--logg-range", default="1.0:3.5", metavar="LO:HI",
                   help="quality cut: LOGG range (default: 1.0:3.5, the red-giant training prior)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_cluster_options(p, "spectrum files", 1024)
    p.set_defaults(func=run)


def add_spectrum_options(p, grid_default, grid_help) -> None:
    """Options of reading and preprocessing spectrum files, shared by ingest and embed."""
    p.add_argument("--file-list", metavar="TXT", help="a text file with one spectrum path per line (for very many files)")
    p.add_argument("--grid", default=grid_default, choices=GRID_NAMES, help=grid_help)
    p.add_argument("--continuum", default="dr17", choices=CONTINUUM_MASKS, help="continuum-pixel mask for the normalization (default: dr17)")
    p.add_argument("--degree", type=non_negative_int, default=DEFAULT_DEGREE, help=f"Chebyshev degree of the per-chip continuum (default: {DEFAULT_DEGREE})")
    p.add_argument("--row", default="combined", help="apStar row: combined (default), global, visitK, or an index")
    p.add_argument("--min-good", type=float, default=0.5, help="skip spectra with a smaller fraction of usable pixels (default: 0.5)")
    p.add_argument("--keep-flagged", action="store_true", help="keep stars flagged STAR_BAD (ASPCAPFLAG bit 23) in the catalogue")


def expand_inputs(patterns: list[str], file_list: str | None) -> list[str]:
    """Paths from arguments (globs expanded here too, for quoted patterns) and a list file."""
    items = list(patterns)
    if file_list:
        if not os.path.isfile(file_list):
            raise InputError(f"--file-list {file_list}: no such file")
        try:
            with open(file_list, encoding="utf-8") as fh:
                items += [line.strip() for line in fh if line.strip() and not line.lstrip().startswith("#")]
        except (UnicodeDecodeError, OSError) as exc:
            raise InputError(f"--file-list {file_list}: not a readable text file of paths ({exc.__class__.__name__})") from None
    paths: list[str] = []
    for item in items:
        if glob.has_magic(item) and not os.path.exists(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise InputError(f"pattern {item!r} matches no file")
            paths += matches
        else:
            paths.append(item)
    seen, unique = set(), []
    for path in paths:
        if path not in seen:
            seen.add(path)
            unique.append(path)
    if not unique:
        raise InputError("no spectrum files given")
    return unique


def _row_arg(text: str):
    return int(text) if text.lstrip("-").isdigit() else text


def check_spectrum_options(args) -> None:
    if not 0.0 <= args.min_good <= 1.0:
        raise InputError("--min-good must lie in [0, 1]")
    if args.degree < 0 or args.degree > 10:
        raise InputError("--degree must lie in 0..10")


@dataclass
class IngestResult:
    n_rows: int
    errors: list[tuple[str, str]]  # (file, message) of every skipped file
    snrs: list[float]              # header SNR of each written row
    files: list[str]               # source file of each written row


def ingest_files(files: list[str], out, label_names, labels_of: Callable, args, attrs: dict,
                 overwrite: bool = False, progress: bool = True, sources: dict | None = None) -> IngestResult:
    """Read, preprocess (the ``add_spectrum_options`` settings in ``args``) and write every
    usable file to the dataset ``out`` (group -1, star_id = APOGEE ID); ``labels_of(spectrum)``
    gives a file's label row in ``label_names`` order or raises InputError.  A file that fails
    is recorded and skipped; with no usable file nothing is written.  ``sources``: {file:
    (TELESCOPE, FIELD)}, written as the columns ``telescope`` and ``field``."""
    from tqdm import tqdm

    row = _row_arg(args.row)
    result = IngestResult(0, [], [], [])
    buffer: dict[str, list] = {"flux": [], "ivar": [], "labels": [], "star_id": [], "source": []}
    writer = DatasetWriter(
        out, get_grid(args.grid).wavelength, label_names, overwrite=overwrite, with_star_id=True, expected_rows=len(files),
        # snr NaN: real spectra have one SNR each; seed -1: no randomness.
        attrs={"generator": "chemtwin ingest", "grid": args.grid, "seed": -1, "snr": float("nan"), "continuum": args.continuum,
               "continuum_degree": args.degree, **attrs},
        text_columns=TEXT_COLUMNS if sources is not None else (),
    )

    def flush() -> None:
        if buffer["flux"]:
            n = len(buffer["flux"])
            text = None if sources is None else {name: [s[k] for s in buffer["source"]] for k, name in enumerate(TEXT_COLUMNS)}
            writer.append(np.stack(buffer["flux"]), np.stack(buffer["ivar"]), np.stack(buffer["labels"]),
                          np.full(n, -1, dtype=np.int64), buffer["star_id"], text=text)
            for value in buffer.values():
                value.clear()

    try:
        for path in tqdm(files, desc="ingest", unit="file", disable=not progress or None, file=sys.stderr):
            try:
                spectrum = read_spectrum(path, row=row)
                values = labels_of(spectrum)
                flux, ivar = preprocess(spectrum, grid=args.grid, continuum=args.continuum, degree=args.degree,
                                        min_good_fraction=args.min_good)
            except InputError as exc:
                result.errors.append((path, str(exc)))
                continue
            except Exception as exc:  # one broken file must not stop thousands of good ones
                result.errors.append((path, f"unexpected {exc.__class__.__name__}: {exc}"))
                continue
            buffer["flux"].append(flux)
            buffer["ivar"].append(ivar)
            buffer["labels"].append(values)
            buffer["star_id"].append(spectrum.apogee_id)
            buffer["source"].append((sources or {}).get(path, ("", "")))
            result.snrs.append(spectrum.snr)
            result.files.append(path)
            if len(buffer["flux"]) >= FLUSH_ROWS:
                flush()
        flush()
        result.n_rows = writer.n_rows
        if writer.n_rows == 0:
            writer.abort()
        else:
            writer.close()
    except BaseException:
        writer.abort()
        raise
    return result


def report_errors(command: str, result: IngestResult, n_files: int) -> None:
    """The per-file list of skipped files, to stderr; when no file was usable, one InputError line
    with the first reason instead (the command then writes nothing)."""
    reasons = [(path, message[len(path) + 2 :] if message.startswith(f"{path}: ") else message)
               for path, message in result.errors]
    if result.n_rows == 0:
        first = f" (first: {reasons[0][0]}: {reasons[0][1]})" if reasons else ""
        raise InputError(f"no usable spectrum among {n_files} file(s){first}; nothing written")
    if reasons:
        print(f"chemtwin {command}: {len(reasons)} of {n_files} file(s) skipped:", file=sys.stderr)
    for path, message in reasons:
        print(f"  {path}: {message}", file=sys.stderr)


SPECTRUM_OPTIONS = ("grid", "continuum", "degree", "row", "min_good")


def _range(text: str, flag: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise InputError(f"{flag} {text!r}: give LO:HI, e.g. 4000:5500") from None
    if not lo <= hi:
        raise InputError(f"{flag} {text!r}: LO must not exceed HI")
    return lo, hi


def quality_cuts(args) -> QualityCuts | None:
    """The cuts the options ask for (None when off)."""
    on = args.quality_cuts == "on" or (args.quality_cuts is None and args.root is not None)
    if not on:
        return None
    if args.starflag_mask < 0:
        raise InputError("--starflag-mask must be a non-negative bitmask")
    return QualityCuts(min_snr=args.min_snr, starflag_mask=args.starflag_mask or None,
                       aspcapflag_mask=None if args.keep_flagged else ASPCAPFLAG_STAR_BAD,
                       teff=_range(args.teff_range, "--teff-range"), logg=_range(args.logg_range, "--logg-range"))


@lru_cache(maxsize=2)
def _catalog(path: str, labels: tuple | None):
    """The catalogue, read once per Dask worker process."""
    return read_catalog(path, list(labels) if labels else None)


def ingest_shard(spec: dict, path: str) -> dict:
    """Dask task: ``spec["files"]`` into the dataset shard ``path`` (nothing written if none is usable)."""
    catalog = _catalog(spec["catalog"], spec["labels"])
    selection = spec["selection"]
    sources = {f: selection.sources.get(f, ("", "")) for f in spec["files"]}
    result = ingest_files(spec["files"], path, catalog.label_names,
                          selection.labels_of(catalog, spec["keep_flagged"]),
                          argparse.Namespace(**spec["options"]), {"catalog": os.path.basename(spec["catalog"])},
                          overwrite=True, progress=False, sources=sources)
    return {"rows": result.n_rows, "errors": result.errors, "snrs": result.snrs}


def _ingest_sharded(args, selection: Selection, labels: list[str] | None) -> IngestResult:
    """Shards of ``--shard-size`` files on the Dask cluster of ``--workers``/``--scheduler``."""
    from chemtwin.data.shard_folder import grid_hash
    from chemtwin.data.shards import run_shards, shard_ranges

    absolute = {f: os.path.abspath(f) for f in selection.files}  # the workers' working folder may differ
    files = [absolute[f] for f in selection.files]
    options = {k: getattr(args, k) for k in SPECTRUM_OPTIONS}
    common = {"catalog": os.path.abspath(args.catalog), "labels": tuple(labels) if labels else None,
              "keep_flagged": args.keep_flagged, "options": options}
    cuts = quality_cuts(args)
    plan = {"command": "ingest", "n_files": len(files), "files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
            **common, "files_per_shard": args.shard_size, "telescope": args.telescope,
            "quality_cuts": None if cuts is None else dataclasses.asdict(cuts)}
    specs = [{"files": files[a:b], "selection": selection.subset(selection.files[a:b], absolute), **common}
             for a, b in shard_ranges(len(files), args.shard_size)]
    wavelength = get_grid(args.grid).wavelength
    with dask_client(args.workers, args.scheduler, args.connect_timeout) as client:
        manifest, records = run_shards(args.out, "dataset", plan, specs, ingest_shard, client,
                                       header={"pixel_grid": grid_hash(wavelength), "n_pixels": int(wavelength.size)},
                                       overwrite=args.overwrite, progress=wants_progress(args), desc="ingest")
    return IngestResult(sum(r["rows"] for r in records), [tuple(e) for r in records for e in r["errors"]],
                        [s for r in records for s in r["snrs"]], [])


def run(args) -> int:
    check_spectrum_options(args)
    check_telescope(args.telescope)
    cuts = quality_cuts(args)
    labels = [s for s in args.labels.split(",") if s.strip()] if args.labels else None
    catalog = read_catalog(args.catalog, labels)
    if args.root is not None:
        if args.files or args.file_list:
            raise InputError("give either FILE arguments / --file-list or --root, not both")
        selection = select_mirror(catalog, args.root, args.spectra, args.telescope, cuts)
    else:
        selection = select_files(catalog, expand_inputs(args.files, args.file_list), args.telescope, cuts)
    files = selection.files
    grid = get_grid(args.grid)
    if not files:
        raise InputError(f"no file left after the duplicate rule ({len(selection.dropped)} dropped); nothing written")
    if wants_cluster(args):
        result = _ingest_sharded(args, selection, labels)
    else:
        prepare_output(args.out, args.overwrite, inputs=(*files, args.catalog))
        result = ingest_files(files, args.out, catalog.label_names, selection.labels_of(catalog, args.keep_flagged),
                              args, {"catalog": os.path.basename(args.catalog)}, overwrite=args.overwrite,
                              progress=wants_progress(args), sources=selection.sources)
    report_errors("ingest", result, len(files))
    if selection.dropped:
        print(f"chemtwin ingest: {len(selection.dropped)} duplicate file(s) not read (one row per APOGEE_ID):",
              file=sys.stderr)
        for path, why in selection.dropped:
            print(f"  {path}: {why}", file=sys.stderr)
    if selection.duplicate_rows:
        print(f"chemtwin ingest: {selection.duplicate_rows} catalogue row(s) of stars listed more than once not used "
              "(one row per APOGEE_ID: the highest SNR)", file=sys.stderr)
    if args.root is not None and selection.rejected:
        reasons = Counter(why.split(" ")[0] for why in selection.rejected.values())
        print(f"chemtwin ingest: {len(selection.rejected)} catalogue star(s) left out "
              f"({', '.join(f'{k}: {n}' for k, n in reasons.most_common())})", file=sys.stderr)
    finite = [s for s in result.snrs if np.isfinite(s)]
    median_snr = f"{np.median(finite):.0f}" if finite else "unknown"
    print(f"wrote {args.out}: {result.n_rows} spectra on grid {args.grid} ({grid.n_pixels} px), median header SNR "
          f"{median_snr}, labels {', '.join(catalog.label_names)}; {len(result.errors)} of {len(files)} file(s) skipped")
    return 1 if result.errors else 0
