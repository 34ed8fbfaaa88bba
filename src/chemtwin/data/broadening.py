"""Velocity broadening and Doppler shifts of spectrum batches, with exact variance propagation.

Rotation and macroturbulence are convolutions in velocity: on a grid log-linear within each
detector chip (any APOGEE grid; chips are found from the jumps in log-wavelength) a velocity is
the same number of pixels everywhere in a chip, so each chip is convolved with one kernel per
star, integrated over its pixels (``_OVERSAMPLE`` sub-samples).  A shift interpolates linearly
in log-lambda within each chip.  var_out = sum_k w_k^2 var_k; an output pixel that draws on a
masked input pixel is masked.  The batch conventions used here and by ``chemtwin.data.augment``
(``check_batch``, ``variance``/``inverse_variance``, ``per_row``, ``chip_segments``) live here
too: ``ivar == 0`` masks a pixel, ``ivar == inf`` is noiseless (variance 0).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.signal import fftconvolve
from scipy.special import erf

from chemtwin.core.grids import SPEED_OF_LIGHT_KMS
from chemtwin.errors import InputError

MACRO_KINDS = ("gaussian", "rt")


_OVERSAMPLE = 32  # sub-samples per pixel when integrating a kernel over a pixel


def check_batch(flux, ivar, wavelength=None):
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    if flux.ndim == 1:
        flux, ivar = flux[None], ivar[None]
    if flux.ndim != 2 or flux.shape != ivar.shape:
        raise InputError(f"flux {flux.shape} and ivar {ivar.shape} must both be (B, P)")
    if wavelength is not None:
        wavelength = np.asarray(wavelength, dtype=np.float64)
        if wavelength.shape != (flux.shape[1],):
            raise InputError(f"wavelength {wavelength.shape} does not match {flux.shape[1]} pixels")
    return flux, ivar, wavelength


def variance(ivar: np.ndarray) -> np.ndarray:
    """ivar -> variance: 0 for noiseless (ivar inf), inf for masked (ivar <= 0 or NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        var = 1.0 / ivar
    var[~(var >= 0)] = np.inf  # negative or NaN ivar: masked
    return var


def inverse_variance(var: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return 1.0 / var  # var inf -> 0 (masked), var 0 -> inf (noiseless)


def per_row(value, n: int, name: str) -> np.ndarray:
    """A scalar or one value per spectrum -> (n,) float array."""
    values = np.asarray(value, dtype=np.float64).reshape(-1)
    if values.size not in (1, n):
        raise InputError(f"{name} needs one value or one per spectrum ({n}), got {values.size}")
    if not np.all(np.isfinite(values)):
        raise InputError(f"{name} must be finite")
    return np.broadcast_to(values, (n,)).copy()


@lru_cache(maxsize=16)
def _segments_cached(key: bytes, n: int) -> tuple[tuple[slice, ...], tuple[float, ...]]:
    wavelength = np.frombuffer(key, dtype=np.float64)
    if np.any(~np.isfinite(wavelength)) or np.any(np.diff(wavelength) <= 0):
        raise InputError("wavelengths must be finite and strictly increasing")
    step = np.diff(np.log(wavelength))
    typical = np.median(step)
    breaks = np.flatnonzero(step > 1.5 * typical) + 1
    edges = np.concatenate([[0], breaks, [n]])
    slices, dv = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        if b - a < 2:
            raise InputError("a detector chip of the wavelength grid has fewer than 2 pixels")
        chip_step = step[a : b - 1]
        if np.ptp(chip_step) > 0.05 * np.median(chip_step):
            raise InputError("augmentation needs a wavelength grid that is log-linear within each chip")
        slices.append(slice(int(a), int(b)))
        dv.append(float(SPEED_OF_LIGHT_KMS * np.median(chip_step)))
    return tuple(slices), tuple(dv)


def chip_segments(wavelength: np.ndarray) -> tuple[tuple[slice, ...], tuple[float, ...]]:
    """Contiguous chips of a grid and each chip's pixel width in km/s."""
    wavelength = np.ascontiguousarray(wavelength, dtype=np.float64)
    return _segments_cached(wavelength.tobytes(), wavelength.size)


def rotation_profile(v: np.ndarray, vsini: np.ndarray, epsilon: float = 0.6) -> np.ndarray:
    """Gray's rotational broadening profile G(v) (per km/s), linear limb darkening ``epsilon``.

    G = [2 (1 - eps) sqrt(1 - x^2) + (pi eps / 2)(1 - x^2)] / [pi vsini (1 - eps/3)], x = v/vsini,
    zero for |x| > 1.  It integrates to 1.
    """
    vsini = np.asarray(vsini, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.asarray(v, dtype=np.float64) / vsini
        one = np.clip(1.0 - x**2, 0.0, None)
        g = (2 * (1 - epsilon) * np.sqrt(one) + 0.5 * np.pi * epsilon * one) / (np.pi * vsini * (1 - epsilon / 3))
    return np.where(np.isfinite(g), g, 0.0)


def macroturbulence_profile(v: np.ndarray, zeta: np.ndarray, kind: str = "gaussian") -> np.ndarray:
    """Macroturbulence profile (unnormalized shape) for characteristic velocity ``zeta``.

    'gaussian': exp(-(v/zeta)^2) (isotropic Gaussian, dispersion zeta/sqrt 2).
    'rt': Gray's radial-tangential profile with equal radial and tangential parts, disc
    integrated without limb darkening: exp(-x^2) + sqrt(pi) |x| (erf|x| - 1), x = v/zeta.
    """
    if kind not in MACRO_KINDS:
        raise InputError(f"unknown macroturbulence kind {kind!r}; choose one of {', '.join(MACRO_KINDS)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.abs(np.asarray(v, dtype=np.float64) / np.asarray(zeta, dtype=np.float64))
        if kind == "gaussian":
            g = np.exp(-(x**2))
        else:
            g = np.exp(-(x**2)) + np.sqrt(np.pi) * x * (erf(x) - 1.0)
    return np.where(np.isfinite(g), g, 0.0)


def _pixel_kernels(profile, width_kms: np.ndarray, dv: float, reach: float) -> np.ndarray:
    """(B, 2K+1) kernels: ``profile(v, width)`` integrated over each pixel, normalized to 1.

    A row with width 0 gets the identity kernel.  ``reach`` is the profile's extent in units
    of ``width`` (1 for rotation, ~4 for a Gaussian).
    """
    half = int(np.ceil(reach * float(np.max(width_kms, initial=0.0)) / dv)) + 1
    offsets = np.arange(-half, half + 1)
    sub = (np.arange(_OVERSAMPLE) + 0.5) / _OVERSAMPLE - 0.5
    v = (offsets[:, None] + sub[None, :]) * dv  # (K, S) km/s
    width = np.asarray(width_kms, dtype=np.float64)[:, None, None]
    kernels = profile(v[None], width).mean(axis=2)  # (B, K)
    total = kernels.sum(axis=1, keepdims=True)
    identity = (offsets == 0).astype(np.float64)
    ok = (total[:, 0] > 0) & (width[:, 0, 0] > 0)
    kernels = np.where(ok[:, None], kernels / np.where(total > 0, total, 1.0), identity[None])
    return kernels


def convolve(flux, ivar, wavelength, kernel_fn, width_kms, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Convolve each chip of each spectrum with its own velocity kernel (batched).

    Chips are padded with their edge values, so a line near a chip edge keeps its equivalent
    width.  Masked input pixels are filled with 1 (continuum) for the convolution; an output
    pixel whose kernel reaches a masked pixel (weight > 1e-6) is masked.
    """
    flux, ivar, wavelength = check_batch(flux, ivar, wavelength)
    width_kms = per_row(width_kms, flux.shape[0], "broadening velocity")
    if np.any(width_kms < 0):
        raise InputError("broadening velocities must be >= 0")
    var = variance(ivar)
    masked = ~np.isfinite(var) | ~np.isfinite(flux)
    any_masked = bool(np.any(masked))
    filled = np.where(masked, 1.0, flux) if any_masked else flux
    var0 = np.where(masked, 0.0, var) if any_masked else var
    any_var = bool(np.any(var0 > 0))
    out_flux, out_var = flux.copy(), var
    active = width_kms > 0
    if not np.any(active):
        return out_flux, inverse_variance(out_var)
    slices, dvs = chip_segments(wavelength)
    rows = slice(None) if np.all(active) else np.flatnonzero(active)
    for chip, dv in zip(slices, dvs):
        kernels = _pixel_kernels(kernel_fn, width_kms[rows], dv, reach)
        half = (kernels.shape[1] - 1) // 2
        pad = ((0, 0), (half, half))
        out_flux[rows, chip] = _correlate(np.pad(filled[rows, chip], pad, mode="edge"), kernels)
        if any_var:
            new_var = np.clip(_correlate(np.pad(var0[rows, chip], pad, mode="edge"), kernels**2), 0.0, None)
        else:
            new_var = np.zeros_like(out_flux[rows, chip])
        if any_masked:
            m = np.pad(masked[rows, chip].astype(np.float64), pad, mode="constant")
            touched = _correlate(m, (kernels > 1e-6).astype(np.float64)) > 0.5
            new_var = np.where(touched, np.inf, new_var)
        out_var[rows, chip] = new_var
    return out_flux, inverse_variance(out_var)


def _correlate(padded: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Row-wise 'valid' convolution of (B, n + K - 1) with symmetric (B, K) kernels.

    Kernels are short (a few tens of taps), so a sum over taps beats an FFT; long kernels
    (very large broadening) go through scipy's FFT.
    """
    n_taps = kernels.shape[1]
    n = padded.shape[1] - n_taps + 1
    if n_taps > 96:
        return fftconvolve(padded, kernels[:, ::-1], mode="valid", axes=1)
    out = np.zeros((padded.shape[0], n))
    for k in range(n_taps):
        out += kernels[:, k : k + 1] * padded[:, k : k + n]
    return out


def rotational_broadening(flux, ivar, wavelength, vsini_kms, epsilon: float = 0.6):
    """Broaden by rotation (Gray's profile, linear limb darkening ``epsilon``); conserves EW."""
    if not 0.0 <= epsilon <= 1.0:
        raise InputError(f"limb-darkening coefficient {epsilon} is outside [0, 1]")
    return convolve(flux, ivar, wavelength, lambda v, w: rotation_profile(v, w, epsilon), vsini_kms, reach=1.0)


def macroturbulence(flux, ivar, wavelength, vmacro_kms, kind: str = "gaussian"):
    """Extra macroturbulent broadening (characteristic velocity ``vmacro_kms``); conserves EW."""
    macroturbulence_profile(np.zeros(1), np.ones(1), kind)  # validates kind
    reach = 4.0 if kind == "gaussian" else 6.0
    return convolve(flux, ivar, wavelength, lambda v, w: macroturbulence_profile(v, w, kind), vmacro_kms, reach=reach)


def doppler_shift(flux, ivar, wavelength, rv_kms):
    """Shift rest-frame spectra by ``rv_kms`` (positive = redshift): f'(lambda) = f(lambda / (1 + v/c)).

    Linear interpolation in log-lambda within each chip, variance propagated; pixels shifted in
    from beyond a chip edge are masked (flux 0, ivar 0), as in real spectra.
    """
    flux, ivar, wavelength = check_batch(flux, ivar, wavelength)
    rv = per_row(rv_kms, flux.shape[0], "rv_kms")
    if np.any(rv <= -SPEED_OF_LIGHT_KMS):
        raise InputError("radial velocities must exceed -c")
    var = variance(ivar)
    var[~np.isfinite(flux)] = np.inf
    flux = np.where(np.isfinite(flux), flux, 0.0)
    out_flux = np.zeros_like(flux)
    out_var = np.full_like(var, np.inf)
    rows = np.arange(flux.shape[0])
    log_shift = np.log1p(rv / SPEED_OF_LIGHT_KMS)  # ln(lambda'/lambda)
    slices, dvs = chip_segments(wavelength)
    for chip, dv in zip(slices, dvs):
        n = chip.stop - chip.start
        # Output pixel i reads input position i - s = (i + m) + t, with integer m and t in [0, 1).
        s = log_shift * SPEED_OF_LIGHT_KMS / dv  # dv = c * dln(lambda) per pixel
        m = np.floor(-s).astype(np.int64)
        t = (-s - m)[:, None]
        reach = int(np.max(np.abs(m))) + 2
        pad = ((0, 0), (reach, reach))
        f = np.lib.stride_tricks.sliding_window_view(np.pad(flux[:, chip], pad), n + 1, axis=1)
        v = np.lib.stride_tricks.sliding_window_view(np.pad(var[:, chip], pad, constant_values=np.inf), n + 1, axis=1)
        start = reach + m
        fw, vw = f[rows, start], v[rows, start]  # (B, n + 1): input pixels i + m, i = 0..n
        new_f = (1 - t) * fw[:, :-1] + t * fw[:, 1:]
        with np.errstate(invalid="ignore"):
            new_v = np.where(t == 0, vw[:, :-1], (1 - t) ** 2 * vw[:, :-1] + t**2 * vw[:, 1:])
        ok = np.isfinite(new_v)
        out_flux[:, chip] = np.where(ok, new_f, 0.0)
        out_var[:, chip] = np.where(ok, new_v, np.inf)
    return out_flux, inverse_variance(out_var)
