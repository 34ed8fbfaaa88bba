"""Stellar label names (APOGEE allStar columns) and the synthesizer's valid ranges."""

from __future__ import annotations

import numpy as np

from chemtwin.errors import InputError

NON_CHEMICAL_LABELS = ("TEFF", "LOGG", "VMICRO", "VMACRO")
# [X/Fe] labels of the elements the synthesizer varies; FE_H is [Fe/H].
ELEMENTS = ("C", "N", "O", "Na", "Mg", "Al", "Si", "S", "K", "Ca", "Ti", "V", "Cr", "Mn", "Co", "Ni")
X_FE_LABELS = tuple(f"{el.upper()}_FE" for el in ELEMENTS)
CHEMICAL_LABELS = ("FE_H",) + X_FE_LABELS
LABEL_NAMES = NON_CHEMICAL_LABELS + CHEMICAL_LABELS

UNITS = {"TEFF": "K", "LOGG": "dex (cgs)", "VMICRO": "km/s", "VMACRO": "km/s"}

# Where the embedded synthesizer's one-layer physics is trusted: cool and warm
# giants and subgiants.  Outside this box it is an error, not an extrapolation.
VALID_RANGE = {
    "TEFF": (3500.0, 6500.0),
    "LOGG": (0.0, 4.5),
    "VMICRO": (0.3, 4.0),
    "VMACRO": (0.0, 15.0),
    "FE_H": (-2.5, 1.0),
    **{name: (-1.0, 1.0) for name in X_FE_LABELS},
}


def default_vmicro(logg: np.ndarray) -> np.ndarray:
    """Microturbulence of giants from LOGG (DR17-like linear relation), km/s."""
    return np.clip(2.478 - 0.325 * np.asarray(logg, dtype=float), 0.5, 3.0)


def default_vmacro(logg: np.ndarray) -> np.ndarray:
    """Macroturbulence of giants from LOGG, km/s (larger in lower-gravity giants)."""
    return np.clip(6.0 - 1.0 * np.asarray(logg, dtype=float), 2.0, 8.0)


def check_in_range(names: list[str] | tuple[str, ...], values: np.ndarray) -> None:
    """Raise InputError naming the first label outside VALID_RANGE (or non-finite)."""
    values = np.asarray(values, dtype=float)
    for k, name in enumerate(names):
        lo, hi = VALID_RANGE[name]
        column = values[..., k]
        bad = ~np.isfinite(column) | (column < lo) | (column > hi)
        if np.any(bad):
            row = int(np.flatnonzero(bad.reshape(-1))[0])
            raise InputError(
                f"label {name}={column.reshape(-1)[row]:g} (row {row}) is outside the synthesizer's "
                f"valid range [{lo:g}, {hi:g}]"
            )
