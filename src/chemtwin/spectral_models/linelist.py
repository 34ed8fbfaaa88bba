"""The shipped line lists and element windows.

Two line lists, as two radiative-transfer codes have two: ``"calibrated"``, the default (lines found
in the real APOGEE fixtures, strengths and excitation calibrated on them:
scripts/derive_calibrated_linelist.py), and ``"drawn"`` (lines drawn inside the ASPCAP windows:
scripts/derive_linelist.py), the synthesizer's first list, kept as an independent second "sky" for
tests and comparisons (``generate --linelist drawn``).
docs/synthesizer.md says what came from data and what was assumed in each.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources

import numpy as np

from chemtwin.errors import InputError

# Atomic data the synthesizer uses (science.md section 6): ionization energy (eV),
# Asplund et al. (2009) solar abundance A(X), atomic mass (amu).
IONIZATION_EV = {"C": 11.26, "N": 14.53, "O": 13.62, "Na": 5.14, "Mg": 7.65, "Al": 5.99, "Si": 8.15,
                 "S": 10.36, "K": 4.34, "Ca": 6.11, "Ti": 6.83, "V": 6.75, "Cr": 6.77, "Mn": 7.43,
                 "Fe": 7.90, "Co": 7.88, "Ni": 7.64}
SOLAR_A = {"C": 8.43, "N": 7.83, "O": 8.69, "Na": 6.24, "Mg": 7.60, "Al": 6.45, "Si": 7.51, "S": 7.12,
           "K": 5.03, "Ca": 6.34, "Ti": 4.95, "V": 3.93, "Cr": 5.64, "Mn": 5.43, "Fe": 7.50, "Co": 4.99,
           "Ni": 6.22}
MASS_AMU = {"C": 12.0, "N": 14.0, "O": 16.0, "Na": 23.0, "Mg": 24.3, "Al": 27.0, "Si": 28.1, "S": 32.1,
            "K": 39.1, "Ca": 40.1, "Ti": 47.9, "V": 50.9, "Cr": 52.0, "Mn": 54.9, "Fe": 55.8, "Co": 58.9,
            "Ni": 58.7, "CO": 28.0, "CN": 26.0, "OH": 17.0}
MOLECULES = ("CO", "CN", "OH")
# A real line outside every window of the elements the synthesizer varies: a blend or a line of an
# element without a label.  It behaves as Fe I (its strength follows FE_H, as real blends mostly do).
UNIDENTIFIED = "X"
LINELISTS = {"calibrated": "linelist_calibrated.csv", "drawn": "linelist.csv"}
DEFAULT_LINELIST = "calibrated"
# Datasets written before generate recorded its line list were all made with the drawn one.
LEGACY_LINELIST = "drawn"
DISSOCIATION_EV = {"CO": 11.09, "CN": 7.76, "OH": 4.39}


@dataclass(frozen=True)
class LineList:
    species: np.ndarray  # str: element symbol or molecule
    ion: np.ndarray  # 0 neutral, 1 singly ionized, -1 molecule
    wavelength: np.ndarray  # vacuum A
    chi_exc: np.ndarray  # lower-level excitation energy, eV
    log_strength_ref: np.ndarray  # log10 integrated line/continuum opacity (km/s) at the reference giant
    damping: np.ndarray  # Lorentzian fraction of the profile at the reference gas pressure

    def __len__(self) -> int:
        return self.wavelength.size

    def select(self, keep: np.ndarray) -> "LineList":
        return LineList(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))

    def perturbed(self, loggf_sigma: float = 0.1, drop_fraction: float = 0.1, seed: int = 0) -> "LineList":
        """The list with wrong atomic data, as a real line list is wrong for real stars.

        Every line's log gf moves by Gaussian noise of ``loggf_sigma`` dex (a line's strength
        is proportional to gf at every TEFF, LOGG and abundance, so this shifts
        ``log_strength_ref``), then ``round(drop_fraction * N)`` lines, drawn at random,
        are removed.  Atomic and molecular lines alike; the same seed gives the same list.
        """
        if not (loggf_sigma >= 0 and 0 <= drop_fraction < 1):
            raise InputError(f"log gf sigma must be >= 0 and the dropped fraction in [0, 1), "
                             f"got {loggf_sigma} and {drop_fraction}")
        rng = np.random.default_rng(seed)
        jitter = rng.normal(0.0, loggf_sigma, len(self))
        keep = np.ones(len(self), dtype=bool)
        keep[rng.choice(len(self), int(round(drop_fraction * len(self))), replace=False)] = False
        return replace(self, log_strength_ref=self.log_strength_ref + jitter).select(keep)


@lru_cache(maxsize=2)
def load_linelist(name: str = DEFAULT_LINELIST) -> LineList:
    """One of the shipped line lists (``LINELISTS``)."""
    if name not in LINELISTS:
        raise InputError(f"unknown line list {name!r}; choose from {', '.join(LINELISTS)}")
    path = resources.files("chemtwin.spectral_models") / "data" / LINELISTS[name]
    with path.open() as fh:
        table = np.genfromtxt(fh, delimiter=",", names=True, dtype=None, encoding="utf-8")
    return LineList(
        species=table["species"].astype(str),
        ion=table["ion"].astype(np.int64),
        wavelength=table["wavelength"].astype(float),
        chi_exc=table["chi_exc"].astype(float),
        log_strength_ref=table["log_strength_ref"].astype(float),
        damping=table["damping"].astype(float),
    )


@lru_cache(maxsize=1)
def load_windows() -> dict[str, np.ndarray]:
    """ASPCAP element windows: {element mask name: (n, 2) array of [start, end] in A}."""
    path = resources.files("chemtwin.spectral_models") / "data" / "windows.csv"
    with path.open() as fh:
        table = np.genfromtxt(fh, delimiter=",", names=True, dtype=None, encoding="utf-8")
    out: dict[str, list] = {}
    for row in table:
        out.setdefault(str(row["element"]), []).append((float(row["start"]), float(row["end"])))
    return {k: np.array(v) for k, v in out.items()}


def window_mask(wavelength: np.ndarray, names: tuple[str, ...] | list[str], pad: float = 0.0) -> np.ndarray:
    """Boolean mask of pixels inside any window of the given elements (padded by ``pad`` A)."""
    windows = load_windows()
    mask = np.zeros(wavelength.shape, dtype=bool)
    for name in names:
        for lo, hi in windows.get(name, np.empty((0, 2))):
            mask |= (wavelength >= lo - pad) & (wavelength <= hi + pad)
    return mask
