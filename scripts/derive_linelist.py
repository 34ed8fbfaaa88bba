"""Derive chemtwin's element windows and line list from the ASPCAP window masks.

Input:  ../shared/reference/aspcap_l31c_masks.npy (astroNN 1.1.0, MIT): an int32 bitmask on
        the 7,514-pixel grid (apStar pixels [246,3274), [3585,6080), [6344,8335)); bit k set
        means the pixel lies in an ASPCAP DR16/17 abundance window of element k.
Output: src/chemtwin/spectral_models/data/windows.csv   element, start/end (outer pixel edges), centre (vacuum A)
        src/chemtwin/spectral_models/data/linelist.csv  one row per line

What is real: window positions (from ASPCAP), CO bandhead wavelengths, molecular rotational
constants and vibrational spacings (approximate textbook values), ionization energies and solar
abundances (used by the synthesizer, in lines.py).  What is drawn (numpy seed 20191213, once):
the number of lines per window, their positions inside the window, excitation potentials within
each species' typical H-band range, line strengths at a reference red giant, damping constants.

Run:  python scripts/derive_linelist.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from chemtwin.core.grids import APSTAR_LOG10_STEP, get_grid  # noqa: E402

SEED = 20191213
MASK_ELEMENTS = ("C", "CI", "N", "O", "Na", "Mg", "Al", "Si", "P", "S", "K", "Ca", "Ti", "TiII",
                 "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Ge", "Ce", "Rb", "Y", "Nd")
# Elements whose [X/Fe] the synthesizer varies; windows of others (P, Cu, Ge, Rb, Y, Nd) carry no lines.
ATOMIC = {  # mask name -> (element, ionization stage, excitation range eV, log10 strength range)
    "CI": ("C", 0, (7.5, 9.7), (-1.0, 0.6)),
    "Na": ("Na", 0, (3.6, 3.8), (-0.6, 0.8)),
    "Mg": ("Mg", 0, (5.1, 6.7), (-0.3, 1.8)),
    "Al": ("Al", 0, (4.0, 4.2), (0.0, 1.6)),
    "Si": ("Si", 0, (5.9, 6.8), (-0.3, 1.5)),
    "S": ("S", 0, (7.9, 8.1), (-0.8, 0.4)),
    "K": ("K", 0, (2.6, 2.8), (-0.5, 0.8)),
    "Ca": ("Ca", 0, (4.5, 5.0), (-0.4, 1.1)),
    "Ti": ("Ti", 0, (1.4, 2.4), (-0.4, 1.2)),
    "TiII": ("Ti", 1, (3.0, 3.2), (-0.3, 0.8)),
    "V": ("V", 0, (1.0, 2.4), (-1.0, 0.4)),
    "Cr": ("Cr", 0, (3.3, 5.0), (-0.8, 0.6)),
    "Mn": ("Mn", 0, (4.8, 5.0), (-0.4, 1.0)),
    "Fe": ("Fe", 0, (3.6, 6.5), (-1.0, 1.7)),
    "Co": ("Co", 0, (2.2, 3.5), (-0.9, 0.5)),
    "Ni": ("Ni", 0, (4.9, 6.1), (-0.6, 1.2)),
}
# CO second-overtone (Delta v = 3) bandheads of 12C16O, vacuum A; lower vibrational level v''.
CO_BANDHEADS = ((15582.0, 0), (15780.0, 1), (15982.0, 2), (16189.0, 3), (16397.0, 4), (16610.0, 5))
CO_B_EV = 1.93 * 1.23984e-4  # rotational constant B (cm^-1) in eV
CO_VIB_EV = 0.263  # vibrational quantum (2143 cm^-1) in eV
KT_REF_EV = 8.617e-5 * 0.9 * 4700.0  # line-forming layer of the reference giant


def window_runs(mask_bits: np.ndarray, bit: int, chip_starts: list[int]) -> list[tuple[int, int]]:
    """Contiguous pixel runs of one bit, never crossing a detector boundary."""
    on = ((mask_bits >> bit) & 1).astype(np.int8)
    edges = np.diff(np.r_[0, on, 0])
    runs = []
    for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
        cuts = [c for c in chip_starts if a < c < b]
        bounds = [a, *cuts, b]
        runs.extend(zip(bounds[:-1], bounds[1:]))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"), help="path of the shared folder")
    args = parser.parse_args()
    masks = np.load(Path(args.shared) / "reference" / "aspcap_l31c_masks.npy")
    grid = get_grid("aspcap7514")
    wave = grid.wavelength
    chip_starts = [sl.start for sl in grid.chip_slices]
    if masks.shape != wave.shape:
        raise SystemExit(f"mask has {masks.shape} pixels, expected {wave.shape}")
    rng = np.random.default_rng(SEED)
    out_dir = ROOT / "src" / "chemtwin" / "spectral_models" / "data"

    windows, lines = [], []
    for bit, name in enumerate(MASK_ELEMENTS):
        for a, b in window_runs(masks, bit, chip_starts):
            # A window is the wavelength interval covered by its pixels (outer pixel edges).
            half = 10 ** (APSTAR_LOG10_STEP / 2)
            lo, hi = wave[a] / half, wave[b - 1] * half
            windows.append((name, round(lo, 4), round(hi, 4), round(0.5 * (wave[a] + wave[b - 1]), 4), int(b - a)))
            width = b - a
            if name in ATOMIC:
                element, stage, chi, strength = ATOMIC[name]
                n = 1 + width // 9
                centres = a - 0.5 + (np.arange(n) + 0.5) * width / n + rng.uniform(-0.15, 0.15, n)
            elif name == "N":  # CN: a line every ~3.5 pixels across the N windows
                element, stage, chi, strength = "CN", -1, (0.2, 1.8), (-1.6, 0.5)
                n = max(1, int(round(width / 3.5)))
                centres = a - 0.5 + rng.uniform(0, width, n)
            elif name == "O":  # OH: one or two lines per window
                element, stage, chi, strength = "OH", -1, (0.3, 1.4), (-0.5, 1.4)
                n = 1 + width // 8
                centres = a - 0.5 + (np.arange(n) + 0.5) * width / n + rng.uniform(-0.15, 0.15, n)
            else:
                continue
            pix = np.clip(centres, a, b - 1)
            lam = np.interp(pix, np.arange(wave.size), wave)
            for x in lam:
                lines.append((element, stage, round(float(x), 4), round(float(rng.uniform(*chi)), 3),
                              round(float(rng.uniform(*strength)), 3), round(float(10 ** rng.uniform(-2.5, -1.2)), 5)))

    # CO: R-branch lines converge on each bandhead from the red, lambda = head + a * (J - J_head)^2.
    for head, v_low in CO_BANDHEADS:
        band_strength = rng.uniform(0.9, 1.1) - 0.12 * v_low
        for j in range(1, 90):
            lam = head + 0.0125 * (j - 0) ** 2 * (1 + 0.2 * rng.uniform(-0.05, 0.05))
            e_low = CO_VIB_EV * v_low + CO_B_EV * j * (j + 1)
            boltz = (2 * j + 1) * np.exp(-(CO_B_EV * j * (j + 1)) / KT_REF_EV) / 40.0
            log_s = np.log10(boltz) + band_strength + 0.3
            lines.append(("CO", -1, round(lam, 4), round(e_low, 3), round(float(log_s), 3), 0.0))

    lines.sort(key=lambda row: row[2])
    os.makedirs(out_dir, exist_ok=True)
    with open(out_dir / "windows.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["element", "start", "end", "centre", "n_pixels"])
        w.writerows(windows)
    with open(out_dir / "linelist.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["species", "ion", "wavelength", "chi_exc", "log_strength_ref", "damping"])
        w.writerows(lines)
    print(f"wrote {len(windows)} windows and {len(lines)} lines to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
