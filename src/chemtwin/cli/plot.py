"""``chemtwin plot-spectra FILE --star ID|ROW[,ID|ROW...] -o PNG``."""

from __future__ import annotations

import numpy as np

from chemtwin.cli.arguments import CommaList, star_key
from chemtwin.core.files import prepare_output, temporary_path
from chemtwin.data.dataset import open_dataset
from chemtwin.errors import InputError
from chemtwin.spectral_models.linelist import load_windows

# Windows shaded in the plot: a few elements with distinct colours.
SHADED = {"Fe": "tab:orange", "Mg": "tab:green", "Si": "tab:purple", "O": "tab:red", "Al": "tab:brown", "Ca": "tab:pink"}


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = prepare_output(args.out, args.overwrite, inputs=(args.file,))
    with open_dataset(args.file) as ds:
        rows = star_rows(ds, args.index)
        batch = ds.take(np.array(rows))
        wave, names = ds.wavelength, ds.label_names
    lo, hi = args.range or (15700.0, 15950.0)
    show = (wave >= lo) & (wave <= hi)
    if not show.any():
        raise InputError(f"no pixels between {lo:g} and {hi:g} A")
    step = np.diff(np.log10(wave))
    gap_after = np.flatnonzero(step > 1.5 * np.median(step))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    windows = load_windows()
    for element, colour in SHADED.items():
        for k, (a, b) in enumerate(windows.get(element, [])):
            if b >= lo and a <= hi:
                ax.axvspan(a, b, color=colour, alpha=0.15, lw=0, label=f"{element} windows" if k == 0 else None)
    col = {n: names.index(n) for n in ("TEFF", "LOGG", "FE_H") if n in names}
    for row, flux, ivar, labels, group in zip(rows, batch.flux, batch.ivar, batch.labels, batch.group):
        flux = np.where(ivar > 0, flux, np.nan)
        flux[gap_after] = np.nan  # break the line across detector gaps
        text = ", ".join(f"{n}={labels[c]:.4g}" for n, c in col.items())
        ax.plot(wave[show], flux[show], lw=0.8, label=f"star {row} (group {group}): {text}")
    ax.set_xlabel("vacuum wavelength (Angstrom)")
    ax.set_ylabel("normalized flux")
    ax.set_xlim(lo, hi)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    tmp = temporary_path(out)
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
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
