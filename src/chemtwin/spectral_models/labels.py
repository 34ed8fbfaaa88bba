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


def is_table(labels) -> bool:
    """Whether ``labels`` carries its own column names: a dict of columns, a NumPy structured
    array, an astropy ``Table`` (``.colnames``) or a pandas ``DataFrame`` (``.columns``)."""
    return (isinstance(labels, dict) or getattr(getattr(labels, "dtype", None), "names", None) is not None
            or hasattr(labels, "colnames") or (hasattr(labels, "columns") and hasattr(labels, "__getitem__")))


def _columns(table) -> list[str]:
    if isinstance(table, dict):
        return [str(k) for k in table]
    if getattr(getattr(table, "dtype", None), "names", None) is not None:
        return list(table.dtype.names)
    if hasattr(table, "colnames"):
        return list(table.colnames)
    return [str(c) for c in table.columns]


def _column_values(table, name: str, what: str) -> np.ndarray:
    """One column as float64, masked or missing entries (astropy masks, pandas NA) as NaN."""
    column = table[name]
    try:
        if hasattr(column, "to_numpy"):  # pandas: NA becomes NaN
            return np.asarray(column.to_numpy(dtype=float, na_value=np.nan), dtype=np.float64)
        return np.ma.filled(np.ma.asarray(column, dtype=np.float64), np.nan)
    except (TypeError, ValueError):
        raise InputError(f"{what}: column {name} is not numeric") from None


def label_table(labels, names=None, *, what: str = "the label table") -> tuple[list[str], np.ndarray]:
    """``(names, values)``: labels as their names and a float64 (stars, labels) array.

    ``labels`` is a table (see :func:`is_table`; missing values become NaN) or a 2-D array.
    From a table, ``names`` picks the columns in that order (default: every column); an array
    needs ``names`` for its columns, in order.
    """
    if is_table(labels):
        available = _columns(labels)
        names = available if names is None else [str(n) for n in names]
        missing = [n for n in names if n not in available]
        if missing:
            raise InputError(f"{what} lacks label(s) {', '.join(missing)} (its columns: {', '.join(available) or 'none'})")
        if not names:
            raise InputError(f"{what} has no columns")
        values = np.column_stack([np.ravel(_column_values(labels, n, what)) for n in names])
        return names, values
    if names is None:
        raise InputError(f"labels given as an array need label_names, the name of each column", "label_names")
    names = [str(n) for n in names]
    values = np.asarray(labels, dtype=np.float64)
    if values.ndim == 1 and len(names) == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[1] != len(names):
        raise InputError(f"{what} must be (stars, {len(names)}) for {', '.join(names)}, got shape {values.shape}")
    return names, values
