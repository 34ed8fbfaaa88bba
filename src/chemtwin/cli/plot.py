"""``chemtwin plot-spectra FILE --star ID|ROW[,ID|ROW...] -o PNG``."""

from __future__ import annotations

from chemtwin.cli.arguments import CommaList, star_key
from chemtwin.core.files import prepare_output, temporary_path
from chemtwin.data.dataset import open_dataset
from chemtwin.errors import InputError
from chemtwin.evaluation.spectra_figure import DEFAULT_RANGE, plot_dataset_spectra


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot-spectra",
        help="plot spectra with element windows shaded",
        description="Plot one or more spectra of a dataset, overlaid, with ASPCAP element windows shaded. "
        "Overlay twins to see that they share line strengths where TEFF/LOGG matter little.",
    )
    p.add_argument("file", help="chemtwin dataset (.h5)")
    p.add_argument("--star", "--index", dest="index", action=CommaList, item=star_key, required=True, metavar="ID|ROW,...",
                   help="stars to overlay, comma-separated: an APOGEE_ID (the file's star_id) or a row number")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--range", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="wavelength range in A (default: 15,700-15,950 A)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    out = prepare_output(args.out, args.overwrite, inputs=(args.file,))
    lo, hi = args.range or DEFAULT_RANGE
    with open_dataset(args.file) as ds:
        rows = star_rows(ds, args.index)
        wave = ds.wavelength
        if not ((wave >= lo) & (wave <= hi)).any():
            raise InputError(f"no pixels between {lo:g} and {hi:g} A")
        tmp = temporary_path(out)
        try:
            plot_dataset_spectra(ds, rows, tmp, wave_range=(lo, hi))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


def star_rows(ds, stars) -> list[int]:
    """Rows of the stars given by row number or by id (the dataset's ``star_id``)."""
    ids = None
    rows = []
    for star in stars:
        if isinstance(star, int):
            if not 0 <= star < len(ds):
                raise InputError(f"--star {star}: row outside the dataset (0-{len(ds) - 1})")
            rows.append(star)
            continue
        if ids is None:
            ids = ds.star_id
            if ids is None:
                raise InputError(f"--star {star}: {ds.path} keeps no star ids (APOGEE_ID); give row numbers")
            ids = {str(name): row for row, name in reversed(list(enumerate(ids)))}
        if star not in ids:
            raise InputError(f"--star {star}: no such star id in {ds.path}")
        rows.append(ids[star])
    return rows
