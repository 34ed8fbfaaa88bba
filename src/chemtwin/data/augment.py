"""Augmentations that make clean synthetic spectra look more like real APOGEE spectra.

Every function works on a batch (B, P) of continuum-normalized spectra on a wavelength grid
that is log-linear within each detector chip (any APOGEE grid; chips are found from the
jumps in log-wavelength), returns new arrays (inputs are not modified), and takes its random
numbers from a ``numpy.random.Generator`` (or an int seed).

Conventions: ``ivar == 0`` marks a masked pixel, ``ivar == inf`` a noiseless one (variance 0).
Broadening and shifts propagate the variance exactly (var_out = sum_k w_k^2 var_k); an
output pixel that draws on a masked input pixel is masked.

``Augmenter`` bundles them with one configuration for on-the-fly use in a training loop::

    aug = Augmenter(snr=(50, 250), rv_max=5.0, vsini_max=8.0, telluric=True, bad_pixel_frac=0.005)
    flux, ivar = aug(flux, ivar, wavelength, rng)        # numpy arrays or torch tensors

The order inside ``Augmenter.__call__`` follows the light: macroturbulence and rotation
(stellar surface), radial velocity, persistence (detector signal), noise, then masks
(telluric windows, bad pixels).  See docs/apogee.md for each choice.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources

import numpy as np
from scipy.signal import fftconvolve
from scipy.special import erf

from chemtwin.core.grids import SPEED_OF_LIGHT_KMS
from chemtwin.errors import InputError

CHIP_NAMES = ("blue", "green", "red")
MACRO_KINDS = ("gaussian", "rt")
_OVERSAMPLE = 32  # sub-samples per pixel when integrating a kernel over a pixel


# ---------------------------------------------------------------------------------------------
# helpers


def as_generator(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        raise InputError("augmentation needs a seed or a numpy.random.Generator")
    return np.random.default_rng(rng)


def _check(flux, ivar, wavelength=None):
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


def _variance(ivar: np.ndarray) -> np.ndarray:
    """ivar -> variance: 0 for noiseless (ivar inf), inf for masked (ivar <= 0 or NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        var = 1.0 / ivar
    var[~(var >= 0)] = np.inf  # negative or NaN ivar: masked
    return var


def _ivar(var: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return 1.0 / var  # var inf -> 0 (masked), var 0 -> inf (noiseless)


def _per_row(value, n: int, name: str) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------
# kernels and convolution


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
    flux, ivar, wavelength = _check(flux, ivar, wavelength)
    width_kms = _per_row(width_kms, flux.shape[0], "broadening velocity")
    if np.any(width_kms < 0):
        raise InputError("broadening velocities must be >= 0")
    var = _variance(ivar)
    masked = ~np.isfinite(var) | ~np.isfinite(flux)
    any_masked = bool(np.any(masked))
    filled = np.where(masked, 1.0, flux) if any_masked else flux
    var0 = np.where(masked, 0.0, var) if any_masked else var
    any_var = bool(np.any(var0 > 0))
    out_flux, out_var = flux.copy(), var
    active = width_kms > 0
    if not np.any(active):
        return out_flux, _ivar(out_var)
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
    return out_flux, _ivar(out_var)


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


# ---------------------------------------------------------------------------------------------
# shifts, noise, masks


def doppler_shift(flux, ivar, wavelength, rv_kms):
    """Shift rest-frame spectra by ``rv_kms`` (positive = redshift): f'(lambda) = f(lambda / (1 + v/c)).

    Linear interpolation in log-lambda within each chip, variance propagated; pixels shifted in
    from beyond a chip edge are masked (flux 0, ivar 0), as in real spectra.
    """
    flux, ivar, wavelength = _check(flux, ivar, wavelength)
    rv = _per_row(rv_kms, flux.shape[0], "rv_kms")
    if np.any(rv <= -SPEED_OF_LIGHT_KMS):
        raise InputError("radial velocities must exceed -c")
    var = _variance(ivar)
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
    return out_flux, _ivar(out_var)


def draw_snr(snr, n: int, rng) -> np.ndarray:
    """SNR per spectrum: a number; (lo, hi) -> log-uniform; an array of > 2 samples -> drawn from them."""
    rng = as_generator(rng)
    values = np.asarray(snr, dtype=np.float64).reshape(-1)
    if values.size == 0 or np.any(~np.isfinite(values)) or np.any(values <= 0):
        raise InputError(f"SNR must be positive and finite, got {snr!r}")
    if values.size == 1:
        return np.full(n, values[0])
    if values.size == 2:
        lo, hi = np.sort(values)
        return np.exp(rng.uniform(np.log(lo), np.log(hi), size=n))
    return rng.choice(values, size=n, replace=True)


def add_noise(flux, ivar, snr, rng):
    """Add Gaussian noise so that each spectrum reaches SNR ``snr`` (per pixel, sigma = 1/SNR
    in continuum units); pixels already noisier than that are left alone.  ``snr`` as in draw_snr."""
    flux, ivar, _ = _check(flux, ivar)
    rng = as_generator(rng)
    target = draw_snr(snr, flux.shape[0], rng)
    var = _variance(ivar)
    target_var = (1.0 / target**2)[:, None]
    extra = np.where(np.isfinite(var), np.clip(target_var - var, 0.0, None), 0.0)
    noise = rng.standard_normal(flux.shape) * np.sqrt(extra)
    new_var = np.where(np.isfinite(var), np.maximum(var, target_var), np.inf)
    return flux + noise, _ivar(new_var)


@lru_cache(maxsize=None)
def telluric_windows() -> np.ndarray:
    """(W, 2) observed-frame vacuum wavelength ranges affected by telluric absorption.

    Derived by scripts/derive_continuum_pixels.py from the APOGEE telluric model of two real
    visits (transmission < 0.85); 80 windows from the H2O, CO2 and CH4 bands (docs/apogee.md).
    """
    rows = []
    with resources.files("chemtwin.data").joinpath("tables/telluric_windows.csv").open("r") as fh:
        for row in csv.DictReader(line for line in fh if not line.startswith("#")):
            rows.append((float(row["start_A"]), float(row["end_A"])))
    out = np.array(rows, dtype=np.float64)
    out.setflags(write=False)
    return out


def telluric_mask(wavelength, rv_kms) -> np.ndarray:
    """(B, P) bool: rest-frame pixels that fall in a telluric window for a star observed with
    Doppler shift ``rv_kms`` (one per spectrum)."""
    wavelength = np.asarray(wavelength, dtype=np.float64)
    rv = np.asarray(rv_kms, dtype=np.float64).reshape(-1)
    observed = wavelength[None, :] * (1.0 + rv[:, None] / SPEED_OF_LIGHT_KMS)
    edges = telluric_windows().reshape(-1)  # sorted, disjoint: a0 b0 a1 b1 ...
    position = np.searchsorted(edges, observed, side="right")
    return (position % 2) == 1


def mask_tellurics(flux, ivar, wavelength, rng, rv_max: float = 100.0):
    """Mask (ivar 0, flux unchanged, as APOGEE does with SIG_TELLURIC pixels) the telluric
    windows, each spectrum seen at a Doppler shift drawn uniformly in [-rv_max, rv_max] km/s."""
    flux, ivar, wavelength = _check(flux, ivar, wavelength)
    rng = as_generator(rng)
    if not np.isfinite(rv_max) or rv_max < 0:
        raise InputError("telluric rv_max must be >= 0")
    rv = rng.uniform(-rv_max, rv_max, size=flux.shape[0])
    mask = telluric_mask(wavelength, rv)
    return flux.copy(), np.where(mask, 0.0, ivar)


def zero_bad_pixels(flux, ivar, fraction: float, rng):
    """Set a random ``fraction`` of pixels (independently) to flux 0, ivar 0."""
    flux, ivar, _ = _check(flux, ivar)
    rng = as_generator(rng)
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"bad-pixel fraction {fraction} is outside [0, 1]")
    bad = rng.random(flux.shape) < fraction
    return np.where(bad, 0.0, flux), np.where(bad, 0.0, ivar)


def persistence(flux, ivar, wavelength, amplitude: float, rng, chip: str = "green"):
    """Persistence-like extra light on one detector chip, after continuum renormalization.

    Persistence adds a smooth positive signal; the pseudo-continuum fit absorbs its smooth part,
    so what stays is line dilution: f' = (f + d r) / (1 + d r), with d ~ U(0, amplitude) per
    spectrum and r rising linearly from 0 at the chip's blue end to 1 at its red end (in the
    DR17 fixture files PERSIST flags cover the green chip, strongest at its red end).  ivar is
    rescaled by (1 + d r)^2.
    """
    flux, ivar, wavelength = _check(flux, ivar, wavelength)
    rng = as_generator(rng)
    if not np.isfinite(amplitude) or amplitude < 0:
        raise InputError("persistence amplitude must be >= 0")
    slices, _ = chip_segments(wavelength)
    if chip not in CHIP_NAMES:
        raise InputError(f"unknown chip {chip!r}; choose one of {', '.join(CHIP_NAMES)}")
    if len(slices) != 3:
        raise InputError(f"persistence needs a 3-chip APOGEE grid; this one has {len(slices)} chip(s)")
    s = slices[CHIP_NAMES.index(chip)]
    d = rng.uniform(0.0, amplitude, size=flux.shape[0])[:, None]
    ramp = np.linspace(0.0, 1.0, s.stop - s.start)[None, :]
    scale = 1.0 + d * ramp
    out_flux, out_ivar = flux.copy(), ivar.copy()
    out_flux[:, s] = (flux[:, s] + d * ramp) / scale
    out_ivar[:, s] = ivar[:, s] * scale**2
    return out_flux, out_ivar


# ---------------------------------------------------------------------------------------------
# the bundle


@dataclass
class Augmenter:
    """One configuration of all augmentations, applied by ``__call__(flux, ivar, wavelength, rng)``.

    Every option's default turns its augmentation off.

    snr: None (no noise), a number, (lo, hi) for log-uniform, or a sequence of samples.
    rv_max: Doppler shift uniform in [-rv_max, rv_max] km/s (residual RV errors; real
        spectra are shifted to the rest frame, so a few km/s at most is realistic).
    vsini_max: rotation, vsini uniform in [0, vsini_max] km/s; ``limb_darkening`` epsilon.
    vmacro_max: extra macroturbulence uniform in [0, vmacro_max] km/s, ``macro_kind`` profile.
    telluric: mask the telluric windows at a Doppler shift uniform in +-telluric_rv_max km/s.
    bad_pixel_frac: fraction of pixels zeroed (flux 0, ivar 0).
    persistence: amplitude of persistence-like line dilution on ``persistence_chip``.
    """

    snr: float | tuple[float, float] | list | None = None
    rv_max: float = 0.0
    vsini_max: float = 0.0
    limb_darkening: float = 0.6
    vmacro_max: float = 0.0
    macro_kind: str = "gaussian"
    telluric: bool = False
    telluric_rv_max: float = 100.0
    bad_pixel_frac: float = 0.0
    persistence: float = 0.0
    persistence_chip: str = "green"

    def __post_init__(self) -> None:
        for name in ("rv_max", "vsini_max", "vmacro_max", "telluric_rv_max", "bad_pixel_frac", "persistence"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise InputError(f"{name} must be a finite number >= 0, got {value}")
        if self.bad_pixel_frac > 1:
            raise InputError("bad_pixel_frac must be <= 1")
        if not 0 <= self.limb_darkening <= 1:
            raise InputError("limb_darkening must lie in [0, 1]")
        if self.macro_kind not in MACRO_KINDS:
            raise InputError(f"macro_kind must be one of {', '.join(MACRO_KINDS)}")
        if self.persistence_chip not in CHIP_NAMES:
            raise InputError(f"persistence_chip must be one of {', '.join(CHIP_NAMES)}")
        if self.snr is not None:
            draw_snr(self.snr, 1, 0)  # validates

    def to_json(self) -> str:
        config = asdict(self)
        if self.snr is not None:
            config["snr"] = np.asarray(self.snr, dtype=float).tolist()
        return json.dumps(config, sort_keys=True)

    def __call__(self, flux, ivar, wavelength, rng):
        """Augmented copies of (flux, ivar) (B, P); torch tensors come back as tensors."""
        torch_like = hasattr(flux, "detach") and hasattr(flux, "device")
        if torch_like:
            device, dtype = flux.device, flux.dtype
            flux = flux.detach().cpu().double().numpy()
            ivar = ivar.detach().cpu().double().numpy()
            if hasattr(wavelength, "detach"):
                wavelength = wavelength.detach().cpu().double().numpy()
        rng = as_generator(rng)
        flux, ivar, wavelength = _check(flux, ivar, wavelength)
        n = flux.shape[0]
        if self.vmacro_max > 0:
            flux, ivar = macroturbulence(flux, ivar, wavelength, rng.uniform(0, self.vmacro_max, n), self.macro_kind)
        if self.vsini_max > 0:
            flux, ivar = rotational_broadening(flux, ivar, wavelength, rng.uniform(0, self.vsini_max, n), self.limb_darkening)
        if self.rv_max > 0:
            flux, ivar = doppler_shift(flux, ivar, wavelength, rng.uniform(-self.rv_max, self.rv_max, n))
        if self.persistence > 0:
            flux, ivar = persistence(flux, ivar, wavelength, self.persistence, rng, self.persistence_chip)
        if self.snr is not None:
            flux, ivar = add_noise(flux, ivar, self.snr, rng)
        if self.telluric:
            flux, ivar = mask_tellurics(flux, ivar, wavelength, rng, self.telluric_rv_max)
        if self.bad_pixel_frac > 0:
            flux, ivar = zero_bad_pixels(flux, ivar, self.bad_pixel_frac, rng)
        if torch_like:
            import torch

            return (torch.as_tensor(flux, dtype=dtype, device=device), torch.as_tensor(ivar, dtype=dtype, device=device))
        return flux, ivar
