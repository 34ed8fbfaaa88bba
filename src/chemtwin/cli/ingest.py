"""``chemtwin ingest FILES... --catalog CAT.fits --out DATA.h5``: real APOGEE spectra -> dataset."""

from __future__ import annotations

import glob
import os
import sys

import numpy as np

from chemtwin.data.apogee import read_catalog, read_spectrum
from chemtwin.data.dataset import DatasetWriter, prepare_output
from chemtwin.data.grid import GRID_NAMES, get_grid
from chemtwin.data.preprocess import CONTINUUM_MASKS, DEFAULT_DEGREE, preprocess
from chemtwin.errors import InputError

FLUSH_ROWS = 64


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="turn real APOGEE spectra (apStar/aspcapStar/apVisit) into a dataset",
        description=(
            "Read APOGEE spectra, shift them to the rest frame, normalize the pseudo-continuum, "
            "put them on an APOGEE grid and write a chemtwin dataset (the layout of `chemtwin "
            "generate`, with star_id = APOGEE_ID and group = -1). Labels come from an "
            "allStar-style catalogue matched by APOGEE_ID. Files that cannot be used are reported "
            "and skipped; exit code 1 if some failed, 2 if none could be used."
        ),
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="spectrum files or quoted glob patterns (e.g. 'spectra/apStar-*.fits')")
    p.add_argument("--file-list", metavar="TXT", help="a text file with one spectrum path per line (for very many files)")
    p.add_argument("--catalog", required=True, metavar="CAT.fits", help="allStar-style FITS table with APOGEE_ID, TEFF, LOGG (+ other labels)")
    p.add_argument("--out", required=True, metavar="DATA.h5", help="dataset file to write")
    p.add_argument("--grid", default="aspcap", choices=GRID_NAMES, help="output wavelength grid (default: aspcap, 7,214 px)")
    p.add_argument("--labels", metavar="A,B,...", help="catalogue columns to store (default: TEFF, LOGG and every other chemtwin label the catalogue has)")
    p.add_argument("--continuum", default="dr17", choices=CONTINUUM_MASKS, help="continuum-pixel mask for the normalization (default: dr17)")
    p.add_argument("--degree", type=int, default=DEFAULT_DEGREE, help=f"Chebyshev degree of the per-chip continuum (default: {DEFAULT_DEGREE})")
    p.add_argument("--row", default="combined", help="apStar row: combined (default), global, visitK, or an index")
    p.add_argument("--min-good", type=float, default=0.5, help="skip spectra with a smaller fraction of usable pixels (default: 0.5)")
    p.add_argument("--keep-flagged", action="store_true", help="keep stars flagged STAR_BAD (ASPCAPFLAG bit 23) in the catalogue")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def expand_inputs(patterns: list[str], file_list: str | None) -> list[str]:
    """Paths from arguments (globs expanded here too, for quoted patterns) and a list file."""
    items = list(patterns)
    if file_list:
        if not os.path.isfile(file_list):
            raise InputError(f"--file-list {file_list}: no such file")
        with open(file_list) as fh:
            items += [line.strip() for line in fh if line.strip() and not line.lstrip().startswith("#")]
    paths: list[str] = []
    for item in items:
        if glob.has_magic(item) and not os.path.exists(item):
            matches = sorted(glob.glob(item))
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


def run(args) -> int:
    from tqdm import tqdm

    if not 0.0 <= args.min_good <= 1.0:
        raise InputError("--min-good must lie in [0, 1]")
    if args.degree < 0 or args.degree > 10:
        raise InputError("--degree must lie in 0..10")
    labels = [s for s in args.labels.split(",") if s.strip()] if args.labels else None
    catalog = read_catalog(args.catalog, labels)
    files = expand_inputs(args.files, args.file_list)
    prepare_output(args.out, args.overwrite)
    grid = get_grid(args.grid)
    row = _row_arg(args.row)

    errors: list[tuple[str, str]] = []
    snrs: list[float] = []
    buffer: dict[str, list] = {"flux": [], "ivar": [], "labels": [], "star_id": []}
    writer = DatasetWriter(
        args.out, grid.wavelength, catalog.label_names, overwrite=args.overwrite, with_star_id=True,
        # snr NaN: real spectra have one SNR each (median printed at the end); seed -1: no randomness.
        attrs={"generator": "chemtwin ingest", "grid": args.grid, "seed": -1, "snr": float("nan"), "continuum": args.continuum,
               "continuum_degree": args.degree, "catalog": os.path.basename(args.catalog)},
    )

    def flush() -> None:
        if buffer["flux"]:
            n = len(buffer["flux"])
            writer.append(np.stack(buffer["flux"]), np.stack(buffer["ivar"]), np.stack(buffer["labels"]),
                          np.full(n, -1, dtype=np.int64), buffer["star_id"])
            for value in buffer.values():
                value.clear()

    try:
        for path in tqdm(files, desc="ingest", unit="file", disable=args.quiet or None, file=sys.stderr):
            try:
                spectrum = read_spectrum(path, row=row)
                values = catalog.lookup(spectrum.apogee_id, keep_flagged=args.keep_flagged)
                flux, ivar = preprocess(spectrum, grid=args.grid, continuum=args.continuum, degree=args.degree,
                                        min_good_fraction=args.min_good)
            except InputError as exc:
                errors.append((path, str(exc)))
                continue
            except Exception as exc:  # one broken file must not stop thousands of good ones
                errors.append((path, f"unexpected {exc.__class__.__name__}: {exc}"))
                continue
            buffer["flux"].append(flux)
            buffer["ivar"].append(ivar)
            buffer["labels"].append(values)
            buffer["star_id"].append(spectrum.apogee_id)
            snrs.append(spectrum.snr)
            if len(buffer["flux"]) >= FLUSH_ROWS:
                flush()
        flush()
        if writer.n_rows == 0:
            writer.abort()
        else:
            writer.close()
    except BaseException:
        writer.abort()
        raise

    if errors:
        print(f"chemtwin ingest: {len(errors)} of {len(files)} file(s) skipped:", file=sys.stderr)
    for path, message in errors:
        message = message[len(path) + 2 :] if message.startswith(f"{path}: ") else message
        print(f"  {path}: {message}", file=sys.stderr)
    if writer.n_rows == 0:
        raise InputError(f"no usable spectrum among {len(files)} file(s); nothing written")
    finite = [s for s in snrs if np.isfinite(s)]
    median_snr = f"{np.median(finite):.0f}" if finite else "unknown"
    print(f"wrote {args.out}: {writer.n_rows} spectra on grid {args.grid} ({grid.n_pixels} px), median header SNR "
          f"{median_snr}, labels {', '.join(catalog.label_names)}; {len(errors)} of {len(files)} file(s) skipped")
    return 1 if errors else 0
