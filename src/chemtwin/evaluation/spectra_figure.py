"""A figure of overlaid spectra with element windows shaded, that names its stars and keeps
its layout from 1 to hundreds of spectra.

Stars are named by ``star_id`` (APOGEE_ID for real spectra) or their row, with TEFF and LOGG
(``star_label``).  Up to ``MAX_LEGEND_STARS`` spectra each get a legend entry; beyond that the
lines are coloured by TEFF with a colour bar instead (a 100-entry legend would bury the plot).
Legends sit outside the axes, the layout is matplotlib's constrained layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chemtwin.spectral_models.linelist import load_windows

# Windows shaded in the plot: a few elements with distinct colours.
SHADED = {"Fe": "tab:orange", "Mg": "tab:green", "Si": "tab:purple", "O": "tab:red", "Al": "tab:brown",
          "Ca": "tab:pink"}
MAX_LEGEND_STARS = 12
DEFAULT_RANGE = (15700.0, 15950.0)


def star_label(star_id, row: int, labels: dict | None = None, group=None) -> str:
    """``2M00242666+5341178 (TEFF 4607 K, LOGG 3.34, group 7)``; ``row 12 (...)`` without a star id."""
    if isinstance(star_id, bytes):
        star_id = star_id.decode()
    name = str(star_id) if star_id not in (None, "") else f"row {row}"
    labels = labels or {}
    parts = []
    if labels.get("TEFF") is not None and np.isfinite(labels["TEFF"]):
        parts.append(f"TEFF {labels['TEFF']:.0f} K")
    if labels.get("LOGG") is not None and np.isfinite(labels["LOGG"]):
        parts.append(f"LOGG {labels['LOGG']:.2f}")
    if group is not None and int(group) >= 0:
        parts.append(f"group {int(group)}")
    return f"{name} ({', '.join(parts)})" if parts else name


def plot_spectra(wave, flux, ivar, names, path, teff=None, wave_range=None, title: str | None = None) -> Path:
    """Overlay ``flux`` (stars x pixels; pixels with ``ivar = 0`` are left out, lines break at
    detector gaps) between ``wave_range`` (default 15,700-15,950 A) with element windows shaded,
    and write a PNG to ``path``.  ``names`` label the stars (``star_label``); ``teff`` colours
    the lines when there are more than ``MAX_LEGEND_STARS`` of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wave = np.asarray(wave, dtype=float)
    flux, ivar = np.atleast_2d(flux).astype(float), np.atleast_2d(ivar)
    lo, hi = wave_range or DEFAULT_RANGE
    show = (wave >= lo) & (wave <= hi)
    step = np.diff(np.log10(wave))
    gap_after = np.flatnonzero(step > 1.5 * np.median(step))
    many = len(flux) > MAX_LEGEND_STARS
    fig, ax = plt.subplots(figsize=(12, 4.8), dpi=120, layout="constrained")
    windows = load_windows()
    shaded = []
    for element, colour in SHADED.items():
        spans = [(a, b) for a, b in windows.get(element, []) if b >= lo and a <= hi]
        for k, (a, b) in enumerate(spans):
            patch = ax.axvspan(a, b, color=colour, alpha=0.15, lw=0)
            if k == 0:
                shaded.append((patch, f"{element} windows"))
    colours = None
    if many:
        teff = np.full(len(flux), np.nan) if teff is None else np.asarray(teff, dtype=float)
        finite = np.isfinite(teff)
        vmin, vmax = (teff[finite].min(), teff[finite].max()) if finite.any() else (0.0, 1.0)
        norm = matplotlib.colors.Normalize(vmin, vmax if vmax > vmin else vmin + 1)
        cmap = matplotlib.colormaps["viridis"]
        colours = [cmap(norm(t)) if np.isfinite(t) else "0.5" for t in teff]
    lines = []
    for k, (f, w) in enumerate(zip(flux, ivar)):
        f = np.where(w > 0, f, np.nan)
        f[gap_after] = np.nan  # break the line across detector gaps
        kw = {"color": colours[k], "alpha": 0.6, "lw": 0.6} if many else {"lw": 0.8}
        lines.append(ax.plot(wave[show], f[show], **kw)[0])
    ax.set_xlabel("vacuum wavelength (Angstrom)")
    ax.set_ylabel("normalized flux")
    ax.set_xlim(lo, hi)
    if many:
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="TEFF (K)", pad=0.01)
        ax.set_title(title or f"{len(flux)} spectra, coloured by TEFF", fontsize=10)
        handles = shaded
    else:
        ax.set_title(title or f"{len(flux)} spectr{'um' if len(flux) == 1 else 'a'}", fontsize=10)
        handles = [*zip(lines, names), *shaded]
    if handles:
        fig.legend(*zip(*handles), loc="outside right upper", fontsize=7)
    fig.savefig(path, format="png")
    plt.close(fig)
    return Path(path)


def plot_dataset_spectra(ds, rows, path, wave_range=None) -> Path:
    """``plot_spectra`` of rows of an open dataset, named by ``star_label``."""
    rows = [int(r) for r in rows]
    batch = ds.take(np.array(rows))
    names = ds.label_names
    cols = {n: names.index(n) for n in ("TEFF", "LOGG") if n in names}
    labels = [{n: float(lab[c]) for n, c in cols.items()} for lab in batch.labels]
    star_names = [star_label(ds.column("star_id", r, r + 1)[0] if ds.has_star_id else None, r, lab, g)
                  for r, lab, g in zip(rows, labels, batch.group)]
    teff = [lab.get("TEFF", np.nan) for lab in labels]
    return plot_spectra(ds.wavelength, batch.flux, batch.ivar, star_names, path, teff=teff, wave_range=wave_range)
