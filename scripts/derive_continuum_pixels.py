"""Derive the package tables that real-spectrum preprocessing and augmentation read.

Inputs (../shared, see its README for origins and licences):
  reference/dr17_contmask.npy               bool, 7,514 px: DR17 pseudo-continuum pixels (astroNN 1.1.0, MIT)
  reference/cannon_cont_pixels_apogee.npz   `pixels_cannon`: bool, 7,214 px: The Cannon's continuum
                                            pixels (The Payne repository, MIT)
  fixtures/apogee/apVisit-*.fits            HDU4 wavelength and HDU7 telluric model of two real
                                            APOGEE visits (public SDSS data) -> telluric windows
  fixtures/apogee/apStar-*.fits             only to *check* the continuum-mask alignment

Outputs:
  src/chemtwin/data/tables/continuum_pixels.npz
      `dr17`, `cannon`: bool (8575,) on the apStar grid (True = continuum pixel),
      `source`: one line per mask saying where it came from.
  src/chemtwin/data/tables/telluric_windows.csv
      start_A, end_A, band: observed-frame (topocentric) vacuum wavelength ranges where the
      APOGEE telluric model of either fixture visit transmits less than 85 % (padded by 0.5 A,
      windows closer than 1 A merged).

Grid conventions (docs/apogee.md): the 7,514-pixel grid keeps apStar pixels [246, 3274),
[3585, 6080), [6344, 8335); the 7,214-pixel ASPCAP grid keeps [322, 3242), [3648, 6048),
[6412, 8306) (chemtwin.core.grids).  The script checks the 7,514 convention on the real
apStar spectra: shifting the mask by k pixels, the mean roughly-normalized flux at the mask
pixels must peak at k = 0 (continuum pixels are the highest ones).

Run:  python scripts/derive_continuum_pixels.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from chemtwin.core.grids import APSTAR_N_PIXELS, get_grid  # noqa: E402

OUT_DIR = ROOT / "src" / "chemtwin" / "data" / "tables"
TELLURIC_THRESHOLD = 0.85
TELLURIC_PAD_A = 0.5
TELLURIC_MERGE_A = 1.0
# Band attribution by position (vacuum A): H2O lines at the blue edge, the two CO2 bands
# near 1.575 and 1.60 um, the CH4 2nu3 band (R branch < 16,650, Q branch ~16,660, P branch >).
BANDS = ((15100, 15400, "H2O"), (15650, 15850, "CO2"), (15950, 16150, "CO2"), (16300, 17000, "CH4"))


def to_apstar(mask: np.ndarray, grid_name: str) -> np.ndarray:
    grid = get_grid(grid_name)
    if mask.shape != (grid.n_pixels,):
        raise SystemExit(f"expected {grid.n_pixels} pixels for grid {grid_name}, got {mask.shape}")
    out = np.zeros(APSTAR_N_PIXELS, dtype=bool)
    out[grid.apstar_index[mask.astype(bool)]] = True
    return out


def alignment_check(shared: Path, masks: dict[str, np.ndarray]) -> None:
    """Print, per mask and real apStar spectrum, the mask shift that maximizes the mean flux."""
    from astropy.io import fits
    from scipy.ndimage import percentile_filter

    files = sorted((shared / "fixtures" / "apogee").glob("apStar-*.fits"))
    if not files:
        print("alignment check skipped: no apStar fixtures")
        return
    for path in files:
        flux = fits.getdata(path, 1)[0].astype(float)
        filled = np.nan_to_num(flux, nan=0.0)
        rough = percentile_filter(filled, 90, size=301)  # rough upper envelope
        norm = np.where((rough > 0) & np.isfinite(flux), filled / np.where(rough > 0, rough, 1), np.nan)
        for name, mask in masks.items():
            idx = np.flatnonzero(mask)
            means = [np.nanmean(norm[np.clip(idx + k, 0, APSTAR_N_PIXELS - 1)]) for k in range(-40, 41)]
            best = int(np.nanargmax(means)) - 40
            print(f"  {path.name}: {name} mask, best shift {best:+d} px, mean flux at mask "
                  f"{means[40]:.4f} vs all pixels {np.nanmean(norm):.4f}")


def telluric_windows(shared: Path) -> list[tuple[float, float, str]]:
    from astropy.io import fits

    files = sorted((shared / "fixtures" / "apogee").glob("apVisit-*.fits"))
    if not files:
        raise SystemExit("no apVisit fixtures: cannot derive telluric windows")
    wave, trans = [], []
    for path in files:
        with fits.open(path) as hdus:
            wave.append(np.asarray(hdus[4].data, dtype=float).ravel())
            trans.append(np.asarray(hdus[7].data, dtype=float).ravel())
    wave, trans = np.concatenate(wave), np.concatenate(trans)
    absorbed = np.sort(wave[trans < TELLURIC_THRESHOLD])
    windows: list[list[float]] = []
    for w in absorbed:
        if windows and w - TELLURIC_PAD_A <= windows[-1][1] + TELLURIC_MERGE_A:
            windows[-1][1] = w + TELLURIC_PAD_A
        else:
            windows.append([w - TELLURIC_PAD_A, w + TELLURIC_PAD_A])
    out = []
    for a, b in windows:
        band = next((name for lo, hi, name in BANDS if lo <= 0.5 * (a + b) < hi), "unattributed")
        out.append((round(a, 2), round(b, 2), band))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the shared folder")
    args = parser.parse_args()
    shared = Path(args.shared)
    ref = shared / "reference"

    dr17 = to_apstar(np.load(ref / "dr17_contmask.npy", allow_pickle=False), "aspcap7514")
    with np.load(ref / "cannon_cont_pixels_apogee.npz", allow_pickle=False) as z:
        cannon = to_apstar(z["pixels_cannon"], "aspcap")
    masks = {"dr17": dr17, "cannon": cannon}
    for name, mask in masks.items():
        per_chip = [int(mask[a:b].sum()) for a, b in ((0, 3430), (3430, 6210), (6210, APSTAR_N_PIXELS))]
        print(f"{name}: {int(mask.sum())} continuum pixels, per chip (blue, green, red) {per_chip}")
    print(f"overlap dr17 & cannon: {int((dr17 & cannon).sum())} pixels")
    alignment_check(shared, masks)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    source = np.array([
        "dr17: astroNN 1.1.0 data/dr17_contmask.npy (7,514-px grid, apStar [246,3274),[3585,6080),[6344,8335))",
        "cannon: The Payne other_data/cannon_cont_pixels_apogee.npz (7,214-px ASPCAP grid)",
    ])
    np.savez_compressed(OUT_DIR / "continuum_pixels.npz", dr17=dr17, cannon=cannon, source=source)
    print(f"wrote {OUT_DIR / 'continuum_pixels.npz'}")

    windows = telluric_windows(shared)
    with open(OUT_DIR / "telluric_windows.csv", "w", newline="") as fh:
        fh.write(f"# observed-frame vacuum A; APOGEE telluric model (apVisit HDU7) < {TELLURIC_THRESHOLD} "
                 f"in the fixture visits, padded {TELLURIC_PAD_A} A, merged within {TELLURIC_MERGE_A} A; "
                 "made by scripts/derive_continuum_pixels.py\n")
        writer = csv.writer(fh)
        writer.writerow(["start_A", "end_A", "band"])
        writer.writerows(windows)
    total = sum(b - a for a, b, _ in windows)
    print(f"wrote {OUT_DIR / 'telluric_windows.csv'}: {len(windows)} windows, {total:.1f} A in all")


if __name__ == "__main__":
    main()
