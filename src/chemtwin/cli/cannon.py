"""``chemtwin cannon train`` and ``chemtwin cannon test``: The Cannon baseline.

    chemtwin cannon train DATA.h5 --labels TEFF,LOGG,FE_H,MG_FE --out MODEL.npz
                          [--order 2] [--rows A:B] [--pixel-mask FILE] [--exclude-pixels FILE]
    chemtwin cannon test MODEL.npz DATA.h5 --out LABELS.h5 [--labels FE_H,MG_FE] [--rows A:B]

Models are ``.npz`` files without pickle (chemtwin.tagging.cannon); the labels file
layout is in docs/baselines.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from chemtwin.cli.arguments import CommaList, name_list, positive_int, thread_count, wants_progress
from chemtwin.core.files import prepare_output
from chemtwin.data.dataset import open_dataset
from chemtwin.errors import InputError
from chemtwin.tagging.labels_file import write_labels

log = logging.getLogger(__name__)


def _rows(text: str) -> slice:
    """'A:B', 'A:' or ':B' -> slice(A, B), non-negative bounds."""
    try:
        a, b = text.split(":")
        start = int(a) if a.strip() else 0
        stop = int(b) if b.strip() else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rows as START:STOP (e.g. 0:2000), got '{text}'") from None
    if start < 0 or (stop is not None and stop <= start):
        raise argparse.ArgumentTypeError(f"expected 0 <= START < STOP, got '{text}'")
    return slice(start, stop)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cannon", help="The Cannon baseline: train a data-driven model, fit labels with it",
        description="The Cannon (Ness et al. 2015): each pixel's flux is a polynomial in the labels with an "
                    "intrinsic scatter; trained on labelled spectra, then used to fit the labels of other spectra.",
    )
    sub = p.add_subparsers(dest="cannon_command", metavar="SUBCOMMAND")

    t = sub.add_parser(
        "train", help="train a Cannon model on the spectra and labels of a dataset",
        description="Train a Cannon model: per-pixel weighted least squares for the polynomial coefficients "
                    "with weights 1/(sigma^2 + s^2), and the per-pixel intrinsic scatter s^2 by maximum likelihood.",
    )
    t.add_argument("data", help="chemtwin dataset (.h5) with the training spectra and their labels")
    t.add_argument("--labels", action=CommaList, required=True, metavar="A,B,...",
                   help="labels of the model, comma- or space-separated (e.g. TEFF,LOGG,FE_H,MG_FE)")
    t.add_argument("--out", required=True, help="model file to write (.npz)")
    t.add_argument("--order", type=positive_int, default=2, help="polynomial order (default 2: quadratic with cross terms)")
    t.add_argument("--rows", type=_rows, default=None, metavar="START:STOP",
                   help="train on dataset rows [START, STOP) only (default: all)")
    t.add_argument("--pixel-mask", default=None, metavar="FILE",
                   help=".npy/.npz boolean array, one value per pixel: True = model this pixel")
    t.add_argument("--exclude-pixels", default=None, metavar="FILE",
                   help=".npy/.npz boolean array, one value per pixel: True = leave this pixel out "
                        "(e.g. the continuum pixels)")
    t.add_argument("--no-scatter", action="store_true", help="fix the intrinsic scatter s^2 at 0")
    t.add_argument("--threads", type=thread_count, default=None, help="CPU threads (default: all available)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    t.set_defaults(func=run_train)

    f = sub.add_parser(
        "test", help="fit the labels of every spectrum of a dataset with a Cannon model",
        description="The Cannon's test step: for every spectrum, the labels that minimize chi^2 (weights "
                    "1/(sigma^2 + s^2), masked pixels ignored), from several starting points, with their formal "
                    "covariance. Writes labels, uncertainties, covariance, chi^2 and the twin groups.",
    )
    f.add_argument("model", help="Cannon model (.npz) written by `chemtwin cannon train`")
    f.add_argument("data", help="chemtwin dataset (.h5) with the spectra to fit, on the model's pixels")
    f.add_argument("--out", required=True, help="labels file to write (.h5)")
    f.add_argument("--labels", action=CommaList, default=None, metavar="A,B,...",
                   help="comma-separated labels to write (default: all the model's labels; all are fitted in any case)")
    f.add_argument("--rows", type=_rows, default=None, metavar="START:STOP",
                   help="fit dataset rows [START, STOP) only (default: all)")
    f.add_argument("--batch-size", type=positive_int, default=4096, help="spectra read per batch (default 4096)")
    f.add_argument("--threads", type=thread_count, default=None, help="CPU threads (default: all available)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    f.set_defaults(func=run_test)
    p.set_defaults(func=lambda args: _missing_subcommand(p))


def _missing_subcommand(parser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _row_range(rows: slice | None, n_stars: int, path) -> tuple[int, int]:
    if rows is None:
        return 0, n_stars
    start = rows.start
    stop = n_stars if rows.stop is None else rows.stop
    if start >= n_stars or stop > n_stars:
        raise InputError(f"{path}: rows {start}:{stop} are outside the dataset's {n_stars} rows")
    return start, stop


def load_pixel_mask(path: str, n_pixels: int) -> np.ndarray:
    """A boolean per-pixel array from .npy or a one-array .npz (0/1 integers accepted)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such mask file")
    try:
        data = np.load(p, allow_pickle=False)
        if isinstance(data, np.ndarray):
            values = data
        else:
            with data:
                if len(data.files) != 1:
                    raise InputError(f"{p}: expected one array in the .npz, found {', '.join(data.files) or 'none'}")
                values = data[data.files[0]]
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{p}: not a readable .npy/.npz mask ({exc.__class__.__name__})") from None
    if values.shape != (n_pixels,):
        raise InputError(f"{p}: mask has shape {values.shape}, the spectra have {n_pixels} pixels")
    if values.dtype != bool:
        if not np.isin(values, (0, 1)).all():
            raise InputError(f"{p}: mask must be boolean (or 0/1), got {values.dtype} values")
        values = values.astype(bool)
    return values


def run_train(args) -> int:
    from chemtwin.tagging.cannon import Cannon

    names = name_list(args.labels)
    out = prepare_output(args.out, args.overwrite, inputs=(args.data,))
    with open_dataset(args.data) as ds:
        columns = ds.label_columns(names)
        start, stop = _row_range(args.rows, ds.n_stars, ds.path)
        mask = np.ones(ds.n_pixels, dtype=bool)
        if args.pixel_mask:
            mask &= load_pixel_mask(args.pixel_mask, ds.n_pixels)
        if args.exclude_pixels:
            mask &= ~load_pixel_mask(args.exclude_pixels, ds.n_pixels)
        if not mask.any():
            raise InputError("the pixel masks leave no pixel to model")
        batch = ds.read(start, stop)
        wavelength = ds.wavelength
        labels = batch.labels[:, columns]
        bad = ~np.isfinite(labels)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise InputError(
                f"{ds.path}: label {names[col]} is missing (NaN) for {int(bad.any(1).sum())} training star(s) "
                f"(first: row {start + row})"
            )
    t0 = time.perf_counter()
    model = Cannon(names, order=args.order, fit_scatter=not args.no_scatter, n_jobs=args.threads)
    model.fit(batch.flux, batch.ivar, labels, pixel_mask=mask, wavelength=wavelength)
    seconds = time.perf_counter() - t0
    path = model.save(out, overwrite=args.overwrite)
    scatter = np.sqrt(model.s2_[model.pixel_mask_])
    print(
        f"wrote {path}: Cannon order {model.order}, {len(names)} labels ({' '.join(names)}), "
        f"{model.vectorizer.n_terms} terms, {int(model.pixel_mask_.sum())}/{model.n_pixels} pixels modelled"
    )
    print(
        f"trained on {stop - start} stars in {seconds:.2f} s; intrinsic scatter s: median {np.median(scatter):.4g}, "
        f"{int((scatter > 0).sum())} pixels with s > 0"
    )
    return 0


def run_test(args) -> int:
    from tqdm.auto import tqdm

    from chemtwin.tagging.cannon import Cannon, CannonTestResult

    out = prepare_output(args.out, args.overwrite, inputs=(args.model, args.data))
    model = Cannon.load(args.model)
    if args.threads:
        model.n_jobs = args.threads
    names = name_list(args.labels) or list(model.label_names)
    unknown = [n for n in names if n not in model.label_names]
    if unknown:
        raise InputError(
            f"{args.model}: the model was not trained on {', '.join(unknown)} "
            f"(it has {', '.join(model.label_names)})"
        )
    keep = [model.label_names.index(n) for n in names]
    with open_dataset(args.data) as ds:
        if ds.n_pixels != model.n_pixels:
            raise InputError(f"{ds.path}: spectra have {ds.n_pixels} pixels, the Cannon model {model.n_pixels}")
        wavelength = ds.wavelength
        if model.wavelength_ is not None and wavelength.size and not np.allclose(wavelength, model.wavelength_, rtol=1e-7, atol=0):
            raise InputError(f"{ds.path}: the spectra's wavelength grid differs from the Cannon model's")
        start, stop = _row_range(args.rows, ds.n_stars, ds.path)
        parts = []
        t0 = time.perf_counter()
        with tqdm(total=stop - start, desc="cannon test", unit="star", disable=not wants_progress(args), leave=False) as bar:
            for batch in ds.iter_batches(args.batch_size, start, stop):
                parts.append(model.test(batch.flux, batch.ivar))
                bar.update(len(batch.flux))
        seconds = time.perf_counter() - t0
        group = ds.group[start:stop]
        star_id = ds.star_id
        star_id = None if star_id is None else star_id[start:stop]
        data_path = str(ds.path)
    n = stop - start
    result = CannonTestResult.concatenate(parts, len(model.label_names))
    attrs = {
        "method": "cannon",
        "model": str(args.model),
        "data": data_path,
        "rows": f"{start}:{stop}",
        "order": model.order,
        "fit_seconds": seconds,
    }
    keep = np.asarray(keep, dtype=np.int64)
    path = write_labels(out, names, result.labels[:, keep], result.uncertainties[:, keep],
                        result.cov[:, keep][:, :, keep], group=group, star_id=star_id, attrs=attrs,
                        columns={"chi2": result.chi2, "reduced_chi2": result.reduced_chi2,
                                 "n_pixels": np.asarray(result.n_pixels, dtype=np.int64), "converged": result.converged},
                        overwrite=args.overwrite)
    rate = n / seconds if seconds > 0 else float("nan")
    print(f"wrote {path}: {n} stars, {len(names)} labels ({' '.join(names)})")
    if n:
        print(
            f"{seconds:.2f} s ({1e3 * seconds / n:.3f} ms/star, {rate:.0f} stars/s); converged "
            f"{int(result.converged.sum())}/{n}; median reduced chi2 {np.nanmedian(result.reduced_chi2):.3g}; "
            f"{int(np.isnan(result.chi2).sum())} fits failed"
        )
    return 0

