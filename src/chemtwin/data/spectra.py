"""The spectrum contract every model follows: what a valid batch is, and how ivar weighs pixels.

A batch is ``flux`` and ``ivar``, both (stars, pixels).  ``ivar = 0`` masks a pixel (its
flux may then be anything, NaN included); ``ivar = +inf`` marks a noiseless pixel; NaN or
negative ivar, and NaN/inf flux where ivar > 0, are errors naming the row and the pixel.
A star whose ivar is zero everywhere is not an error: it has nothing to measure, and every
model gives it no tag (NaN).

The weight rule (``ivar_weights``): a pixel weighs its ivar, a masked one 0; a star holding
+inf weighs those noiseless pixels 1 and its finite ones 0 (the limit of ivar weights), so
noiseless data behave exactly like unit weights.  Noiseless and noisy stars should not be
mixed in one training set.  The Cannon and the Payne's emulator training are the exceptions:
their noise models need inverse variances, not relative weights (``chemtwin.tagging.cannon``).
"""

from __future__ import annotations

import numpy as np

from chemtwin.errors import InputError


def check_ivar(ivar: np.ndarray, row0: int = 0, source: str = "input") -> None:
    """InputError naming the first row and pixel whose ivar is NaN or negative."""
    ivar = np.asarray(ivar)
    bad = ~(ivar >= 0)
    if bad.any():
        row, pixel = (int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"{source}: row {row0 + row}, pixel {pixel} has NaN or negative ivar ({ivar[row, pixel]}); "
                         "ivar must be >= 0 (0 masks a pixel, inf marks a noiseless one)")


def check_spectra(flux: np.ndarray, ivar: np.ndarray, row0: int = 0, source: str = "input") -> np.ndarray:
    """Validate a batch (rows ``row0``... of ``source``); return the mask of usable rows (False:
    ivar all zero).  InputError for mismatched shapes, NaN or negative ivar, and NaN/inf flux
    where ivar > 0, naming the first row and pixel at fault."""
    flux, ivar = np.asarray(flux), np.asarray(ivar)
    if flux.ndim != 2 or ivar.shape != flux.shape:
        raise InputError(f"{source}: flux {flux.shape} and ivar {ivar.shape} must both be (stars, pixels)")
    check_ivar(ivar, row0, source)
    bad_flux = ~np.isfinite(flux) & (ivar > 0)
    if bad_flux.any():
        row, pixel = (int(i) for i in np.argwhere(bad_flux)[0])
        raise InputError(f"{source}: row {row0 + row}, pixel {pixel} has NaN/inf flux ({flux[row, pixel]}) where "
                         "ivar > 0 (mask it with ivar 0)")
    return (ivar > 0).any(axis=1)


def ivar_weights(ivar: np.ndarray) -> np.ndarray:
    """Least-squares weights (float64) of pixels from their ivar: the rule of the module docstring.
    NaN or negative ivar is the caller's to reject first (``check_spectra``)."""
    ivar = np.asarray(ivar, dtype=np.float64)
    inf = np.isposinf(ivar)
    w = np.where(np.isfinite(ivar) & (ivar > 0), ivar, 0.0)
    rows = inf.any(axis=1)
    w[rows] = inf[rows]
    return w


def pixel_weights(ivar: np.ndarray) -> np.ndarray:
    """``ivar_weights`` normalised to mean 1 over each star's weighted pixels (float32; a row
    without one is all 0): the weights of a loss averaged over stars of any SNR."""
    w = ivar_weights(ivar)
    good = (w > 0).sum(axis=1, keepdims=True)
    mean = w.sum(axis=1, keepdims=True) / np.maximum(good, 1)
    return (w / np.where(mean > 0, mean, 1.0)).astype(np.float32)
