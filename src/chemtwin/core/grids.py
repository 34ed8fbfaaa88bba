"""APOGEE wavelength grids and resampling of spectra onto them.

All grids are subsets of the apStar grid: 8,575 log-linear pixels in vacuum,
log10(lambda / Angstrom) = 4.179 + 6e-6 * i.

* ``apstar``: all 8,575 pixels, detector gaps included.
* ``aspcap``: the 7,214-pixel gap-removed grid used by ASPCAP (apStar pixels
  [322, 3242), [3648, 6048), [6412, 8306)); equal to The Payne's
  ``apogee_wavelength.npz`` to better than 1e-8 Angstrom.
* ``aspcap7514``: the 7,514-pixel grid of the DR13-DR17 ASPCAP element-window and
  continuum masks (apStar pixels [246, 3274), [3585, 6080), [6344, 8335)).  We
  checked this convention against the masks: with it the carbon windows start at
  the CO second-overtone bandheads (scripts/derive_linelist.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from chemtwin.errors import InputError

APSTAR_LOG10_START = 4.179
APSTAR_LOG10_STEP = 6e-6
APSTAR_N_PIXELS = 8575
SPEED_OF_LIGHT_KMS = 299792.458

_CHIP_RANGES = {
    "apstar": ((0, APSTAR_N_PIXELS),),
    "aspcap": ((322, 3242), (3648, 6048), (6412, 8306)),
    "aspcap7514": ((246, 3274), (3585, 6080), (6344, 8335)),
}
GRID_NAMES = tuple(_CHIP_RANGES)


def apstar_wavelength() -> np.ndarray:
    """The 8,575 apStar vacuum wavelengths in Angstrom."""
    return 10.0 ** (APSTAR_LOG10_START + APSTAR_LOG10_STEP * np.arange(APSTAR_N_PIXELS))


@dataclass(frozen=True)
class Grid:
    """A wavelength grid that is a subset of the apStar grid."""

    name: str
    apstar_index: np.ndarray  # (P,) int, positions of this grid's pixels on apStar
    chip_slices: tuple[slice, ...]  # contiguous pixel runs of this grid, one per detector chunk

    @property
    def wavelength(self) -> np.ndarray:
        return apstar_wavelength()[self.apstar_index]

    @property
    def n_pixels(self) -> int:
        return int(self.apstar_index.size)


@lru_cache(maxsize=None)
def get_grid(name: str) -> Grid:
    if name not in _CHIP_RANGES:
        raise InputError(f"unknown grid {name!r}; choose one of {', '.join(GRID_NAMES)}")
    ranges = _CHIP_RANGES[name]
    index = np.concatenate([np.arange(a, b) for a, b in ranges])
    index.setflags(write=False)
    slices, start = [], 0
    for a, b in ranges:
        slices.append(slice(start, start + b - a))
        start += b - a
    return Grid(name, index, tuple(slices))


def identify_grid(wavelength: np.ndarray, rtol: float = 1e-7) -> str | None:
    """Name of the APOGEE grid equal to ``wavelength``, or None."""
    wavelength = np.asarray(wavelength, dtype=float)
    for name in GRID_NAMES:
        grid = get_grid(name)
        if grid.n_pixels == wavelength.size and np.allclose(grid.wavelength, wavelength, rtol=rtol, atol=0):
            return name
    return None


def convert(values: np.ndarray, from_grid: str, to_grid: str, fill: float = 0.0) -> np.ndarray:
    """Move per-pixel values (..., P_from) from one APOGEE grid to another.

    Pixels of ``to_grid`` absent from ``from_grid`` get ``fill`` (use 0 for both
    flux and ivar, so that they are masked downstream).
    """
    src, dst = get_grid(from_grid), get_grid(to_grid)
    values = np.asarray(values)
    if values.shape[-1] != src.n_pixels:
        raise InputError(f"expected {src.n_pixels} pixels for grid {from_grid!r}, got {values.shape[-1]}")
    position = np.full(APSTAR_N_PIXELS, -1)
    position[src.apstar_index] = np.arange(src.n_pixels)
    take = position[dst.apstar_index]
    out = np.full(values.shape[:-1] + (dst.n_pixels,), fill, dtype=values.dtype)
    present = take >= 0
    out[..., present] = values[..., take[present]]
    return out


def resample(
    wavelength_in: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    wavelength_out: np.ndarray,
    rv_kms: float | np.ndarray = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Linearly interpolate spectra onto ``wavelength_out``, propagating inverse variance.

    ``flux`` and ``ivar`` have shape (..., P_in) with the same ``wavelength_in``
    (increasing).  ``rv_kms`` (scalar or one per spectrum) shifts the input to the
    rest frame: lambda_rest = lambda_obs / (1 + v/c).  For an output pixel between
    input pixels a and b with weight t, var = (1-t)^2 var_a + t^2 var_b.  An output
    pixel that touches a masked input pixel (ivar 0 or non-finite flux), or lies
    outside the input range, gets flux 0 and ivar 0.
    """
    wavelength_in = np.asarray(wavelength_in, dtype=float)
    wavelength_out = np.asarray(wavelength_out, dtype=float)
    flux = np.asarray(flux, dtype=float)
    ivar = np.asarray(ivar, dtype=float)
    if flux.shape != ivar.shape or flux.shape[-1] != wavelength_in.size:
        raise InputError(
            f"flux {flux.shape}, ivar {ivar.shape} and wavelength ({wavelength_in.size},) do not match"
        )
    if np.any(np.diff(wavelength_in) <= 0):
        raise InputError("input wavelengths must be strictly increasing")
    batch_shape = flux.shape[:-1]
    flux2 = flux.reshape(-1, wavelength_in.size)
    ivar2 = ivar.reshape(-1, wavelength_in.size)
    rv = np.broadcast_to(np.asarray(rv_kms, dtype=float).reshape(-1), (flux2.shape[0],))

    good = np.isfinite(flux2) & np.isfinite(ivar2) & (ivar2 > 0)
    var = np.where(good, 1.0 / np.where(good, ivar2, 1.0), np.inf)
    flux_clean = np.where(good, flux2, 0.0)

    # Rest-frame lambda_out sits at observed lambda_out * (1 + v/c) on the input grid.
    query = wavelength_out[None, :] * (1.0 + rv[:, None] / SPEED_OF_LIGHT_KMS)
    j = np.searchsorted(wavelength_in, query, side="right") - 1
    inside = (j >= 0) & (query <= wavelength_in[-1])
    j = np.clip(j, 0, wavelength_in.size - 2)
    t = (query - wavelength_in[j]) / (wavelength_in[j + 1] - wavelength_in[j])
    rows = np.arange(flux2.shape[0])[:, None]
    f = (1 - t) * flux_clean[rows, j] + t * flux_clean[rows, j + 1]
    v = (1 - t) ** 2 * var[rows, j] + t**2 * var[rows, j + 1]
    # A neighbour with zero weight (t exactly 0 or 1) must not mask the pixel.
    v = np.where(t == 0, var[rows, j], np.where(t == 1, var[rows, j + 1], v))
    ok = inside & np.isfinite(v) & (v > 0)
    out_flux = np.where(ok, f, 0.0)
    out_ivar = np.where(ok, 1.0 / np.where(ok, v, 1.0), 0.0)
    shape = batch_shape + (wavelength_out.size,)
    return out_flux.reshape(shape), out_ivar.reshape(shape)
