"""Real spectra -> the dataset's form: rest frame, pseudo-continuum normalized, on an APOGEE grid.

Order of operations (``preprocess``):

1. **Onto the apStar grid, in the rest frame.**  apStar and aspcapStar spectra are already
   rest-frame on the apStar grid (or a subset of it) and are only moved there (no
   interpolation).  apVisit spectra are in the observatory frame: each chip is resampled
   (``grid.resample``, linear, inverse variance propagated) onto the apStar grid with the
   header's VRAD removed (VRAD = VHELIO - BC is the observed Doppler shift).  An explicit
   ``rv_kms`` replaces VRAD, or for rest-frame files shifts them by that velocity.
2. **Pseudo-continuum normalization**, per detector chip: a Chebyshev polynomial of low
   degree (2 by default) fitted by inverse-variance-weighted least squares to the continuum
   pixels only (the DR17 ASPCAP continuum mask by default, The Cannon's as an option), with
   iterative 3-sigma clipping of continuum pixels that still hold weak lines or unflagged
   artefacts.  flux /= c, ivar *= c^2.  Why this and not a running quantile: the continuum
   pixels were chosen by the surveys to be line-free, so a fit to them follows the
   instrument response without being dragged down by the CN/CO/OH forest of cool giants, as
   an upper quantile over a window is (how much depends on line density, i.e. on TEFF and
   metallicity -- a label-dependent bias); a degree-2 polynomial over a ~600 A chip cannot
   absorb molecular band structure, and it is what astroNN and The Cannon use with these masks,
   so our normalized real spectra are comparable with theirs.
3. **Onto the requested grid** (``aspcap`` by default) by exact pixel selection.

Masked pixels carry ivar 0; their flux is kept when finite (flux 0 where there is no data:
detector gaps, outside the chips, failed continuum).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

from chemtwin.core.grids import APSTAR_N_PIXELS, apstar_wavelength, convert, get_grid, resample
from chemtwin.data.apogee import Spectrum
from chemtwin.errors import InputError

CONTINUUM_MASKS = ("dr17", "cannon")
# Detector chips on the apStar grid for the continuum fit: the 7,514-pixel grid's chip ranges
# (every continuum pixel of both masks lies inside them).  Pixels outside get ivar 0.
_GRID_7514 = get_grid("aspcap7514")
CHIP_RANGES = tuple(
    (int(_GRID_7514.apstar_index[s.start]), int(_GRID_7514.apstar_index[s.stop - 1]) + 1) for s in _GRID_7514.chip_slices
)  # ((246, 3274), (3585, 6080), (6344, 8335))
CHIP_NAMES = ("blue", "green", "red")
DEFAULT_DEGREE = 2
DEFAULT_CLIP = 3.0
DEFAULT_ITERATIONS = 3
MIN_CONTINUUM_PIXELS = 30  # per chip; fewer usable continuum pixels -> the chip is masked


@lru_cache(maxsize=None)
def continuum_pixels(name: str = "dr17") -> np.ndarray:
    """Boolean (8575,) apStar-grid mask of continuum pixels ('dr17' or 'cannon').

    Made by scripts/derive_continuum_pixels.py from ../shared/reference (docs/apogee.md).
    """
    if name not in CONTINUUM_MASKS:
        raise InputError(f"unknown continuum mask {name!r}; choose one of {', '.join(CONTINUUM_MASKS)}")
    with resources.files("chemtwin.data").joinpath("tables/continuum_pixels.npz").open("rb") as fh:
        with np.load(fh, allow_pickle=False) as table:
            mask = np.asarray(table[name], dtype=bool)
    mask.setflags(write=False)
    return mask


def _chebyshev_design(n: int, degree: int) -> np.ndarray:
    x = np.linspace(-1.0, 1.0, n)
    return np.polynomial.chebyshev.chebvander(x, degree)  # (n, degree + 1)


def fit_continuum(
    flux: np.ndarray,
    ivar: np.ndarray,
    continuum: str | np.ndarray = "dr17",
    degree: int = DEFAULT_DEGREE,
    clip: float = DEFAULT_CLIP,
    iterations: int = DEFAULT_ITERATIONS,
    min_pixels: int = MIN_CONTINUUM_PIXELS,
) -> np.ndarray:
    """Pseudo-continuum of spectra on the apStar grid, shape (..., 8575).

    Per chip, a weighted least-squares Chebyshev fit to the continuum pixels with ivar > 0;
    continuum pixels more than ``clip`` sigma from the fit are dropped and the fit repeated
    (``iterations`` fits in all).  The continuum is 0 outside the chips and on chips with fewer
    than ``min_pixels`` usable continuum pixels.  Vectorized over the leading axes.
    """
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    if flux.shape != ivar.shape or flux.shape[-1] != APSTAR_N_PIXELS:
        raise InputError(f"fit_continuum needs (..., {APSTAR_N_PIXELS}) apStar-grid flux and ivar; got {flux.shape}, {ivar.shape}")
    if degree < 0 or iterations < 1:
        raise InputError("continuum degree must be >= 0 and iterations >= 1")
    cont_mask = continuum_pixels(continuum) if isinstance(continuum, str) else np.asarray(continuum, dtype=bool)
    if cont_mask.shape != (APSTAR_N_PIXELS,):
        raise InputError(f"a continuum mask needs {APSTAR_N_PIXELS} pixels, got {cont_mask.shape}")
    shape = flux.shape
    f2 = flux.reshape(-1, APSTAR_N_PIXELS)
    w2 = np.where(np.isfinite(f2) & np.isfinite(ivar.reshape(-1, APSTAR_N_PIXELS)), ivar.reshape(-1, APSTAR_N_PIXELS), 0.0)
    w2 = np.clip(w2, 0.0, None)
    f2 = np.where(w2 > 0, f2, 0.0)
    out = np.zeros_like(f2)
    for a, b in CHIP_RANGES:
        design = _chebyshev_design(b - a, degree)
        use = cont_mask[a:b]
        t = design[use]  # (m, d)
        y = f2[:, a:b][:, use]  # (B, m)
        weight = w2[:, a:b][:, use]
        for _ in range(iterations):
            normal = np.einsum("bm,mi,mj->bij", weight, t, t)
            rhs = np.einsum("bm,mi,bm->bi", weight, t, y)
            enough = np.count_nonzero(weight > 0, axis=1) >= max(min_pixels, degree + 1)
            normal[~enough] = np.eye(degree + 1)
            rhs[~enough] = 0.0
            try:
                coef = np.linalg.solve(normal, rhs[..., None])[..., 0]
            except np.linalg.LinAlgError:  # a singular row: solve one by one
                coef = np.stack([np.linalg.lstsq(n, r, rcond=None)[0] for n, r in zip(normal, rhs)])
            coef[~enough] = 0.0
            model = coef @ t.T
            resid = (y - model) * np.sqrt(weight)
            weight = np.where(np.abs(resid) > clip, 0.0, weight)
        out[:, a:b] = coef @ design.T
    out[~np.isfinite(out)] = 0.0
    return out.reshape(shape)


def normalize(
    flux: np.ndarray, ivar: np.ndarray, continuum: str | np.ndarray = "dr17", degree: int = DEFAULT_DEGREE, **fit_kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """Divide apStar-grid spectra by their pseudo-continuum: (flux / c, ivar * c^2).

    Where the continuum is not positive (outside the chips, failed chip) flux and ivar are 0.
    """
    cont = fit_continuum(flux, ivar, continuum=continuum, degree=degree, **fit_kwargs)
    ok = cont > 0
    safe = np.where(ok, cont, 1.0)
    flux = np.asarray(flux, dtype=np.float64)
    out_flux = np.where(ok & np.isfinite(flux), flux / safe, 0.0)
    out_ivar = np.where(ok, np.asarray(ivar, dtype=np.float64) * safe**2, 0.0)
    out_ivar[~np.isfinite(out_ivar)] = 0.0
    return out_flux, out_ivar


def to_apstar_grid(spectrum: Spectrum, rv_kms: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flux and ivar of ``spectrum`` on the 8,575-pixel apStar grid, in the stellar rest frame.

    ``rv_kms``: velocity to remove.  Default: the file's VRAD for apVisit spectra, 0 for
    rest-frame (apStar, aspcapStar) spectra.
    """
    if rv_kms is None:
        rv_kms = 0.0 if spectrum.rest_frame else spectrum.vrad
    if not np.isfinite(rv_kms):
        raise InputError(f"{spectrum.path}: no radial velocity (VRAD/VHELIO/BC) to shift it to the rest frame; give one")
    if spectrum.grid is not None and rv_kms == 0.0:
        flux = convert(spectrum.flux, spectrum.grid, "apstar", fill=0.0)
        ivar = convert(spectrum.ivar, spectrum.grid, "apstar", fill=0.0)
        return flux, ivar
    target = apstar_wavelength()
    flux = np.zeros(APSTAR_N_PIXELS)
    ivar = np.zeros(APSTAR_N_PIXELS)
    chips = spectrum.chip_slices or (slice(0, spectrum.wavelength.size),)
    if spectrum.grid is not None:
        chips = get_grid(spectrum.grid).chip_slices
    for chip in chips:
        f, iv = resample(spectrum.wavelength[chip], spectrum.flux[chip], spectrum.ivar[chip], target, rv_kms=rv_kms)
        inside = iv > 0
        flux[inside] = f[inside]
        ivar[inside] = iv[inside]
    return flux, ivar


def preprocess(
    spectrum: Spectrum,
    grid: str = "aspcap",
    rv_kms: float | None = None,
    continuum: str = "dr17",
    degree: int = DEFAULT_DEGREE,
    min_good_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Rest frame, continuum-normalized (unless the file already is), on ``grid``.

    Raises InputError when less than ``min_good_fraction`` of the output pixels are usable.
    """
    get_grid(grid)  # validates the name
    flux, ivar = to_apstar_grid(spectrum, rv_kms)
    if not spectrum.normalized:
        flux, ivar = normalize(flux, ivar, continuum=continuum, degree=degree)
    else:
        outside = np.ones(APSTAR_N_PIXELS, dtype=bool)
        for a, b in CHIP_RANGES:
            outside[a:b] = False
        ivar = np.where(outside, 0.0, ivar)
    flux = convert(flux, "apstar", grid)
    ivar = convert(ivar, "apstar", grid)
    good = float(np.mean(ivar > 0))
    if good < min_good_fraction or good == 0.0:
        raise InputError(
            f"{spectrum.path}: only {100 * good:.1f}% of the {grid} pixels are usable after preprocessing "
            f"(need {100 * min_good_fraction:.0f}%)"
        )
    return flux, ivar
