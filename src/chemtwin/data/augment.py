"""Augmentations that make clean synthetic spectra look more like real APOGEE spectra.

Every function works on a batch (B, P) of continuum-normalized spectra on a wavelength grid
that is log-linear within each detector chip (any APOGEE grid; chips are found from the
jumps in log-wavelength), returns new arrays (inputs are not modified), and takes its random
numbers from a ``numpy.random.Generator`` (or an int seed).

Conventions: ``ivar == 0`` marks a masked pixel, ``ivar == inf`` a noiseless one (variance 0).
Broadening and shifts (``chemtwin.data.broadening``) propagate the variance exactly
(var_out = sum_k w_k^2 var_k); an output pixel that draws on a masked input pixel is masked.

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

from chemtwin.core.grids import SPEED_OF_LIGHT_KMS
from chemtwin.data.broadening import (
    MACRO_KINDS,
    check_batch,
    chip_segments,
    doppler_shift,
    inverse_variance,
    macroturbulence,
    rotational_broadening,
    variance,
)
from chemtwin.errors import InputError

CHIP_NAMES = ("blue", "green", "red")


def as_generator(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        raise InputError("augmentation needs a seed or a numpy.random.Generator")
    return np.random.default_rng(rng)


# ---------------------------------------------------------------------------------------------
# noise, masks, detector effects (broadening and shifts: chemtwin.data.broadening)


# An SNR whose noise sigma 1/SNR and ivar SNR^2 are ordinary float32 numbers, with room on both
# sides of any survey's (APOGEE spectra: SNR 10 to a few 1,000s).
SNR_RANGE = (1e-3, 1e9)


def check_snr(values, name: str = "SNR", allow_inf: bool = False, option: str | None = None) -> None:
    """InputError unless every value lies in SNR_RANGE (or is +inf, no noise, when ``allow_inf``)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    lo, hi = SNR_RANGE
    ok = (values >= lo) & (values <= hi) | (allow_inf & (values == np.inf))
    if values.size == 0 or not ok.all():
        shown = ", ".join(f"{v:g}" for v in values[~ok][:3]) if values.size else "nothing"
        raise InputError(f"{name} must be between {lo:g} and {hi:g}{' (or inf)' if allow_inf else ''}, got {shown}",
                         *([option] if option else []))


def draw_snr(snr, n: int, rng) -> np.ndarray:
    """SNR per spectrum: a number; (lo, hi) -> log-uniform; an array of > 2 samples -> drawn from them."""
    rng = as_generator(rng)
    values = np.asarray(snr, dtype=np.float64).reshape(-1)
    check_snr(values)
    if values.size == 1:
        return np.full(n, values[0])
    if values.size == 2:
        lo, hi = np.sort(values)
        return np.exp(rng.uniform(np.log(lo), np.log(hi), size=n))
    return rng.choice(values, size=n, replace=True)


def add_noise(flux, ivar, snr, rng):
    """Add Gaussian noise so that each spectrum reaches SNR ``snr`` (per pixel, sigma = 1/SNR
    in continuum units); pixels already noisier than that are left alone.  ``snr`` as in draw_snr."""
    flux, ivar, _ = check_batch(flux, ivar)
    rng = as_generator(rng)
    target = draw_snr(snr, flux.shape[0], rng)
    var = variance(ivar)
    target_var = (1.0 / target**2)[:, None]
    extra = np.where(np.isfinite(var), np.clip(target_var - var, 0.0, None), 0.0)
    noise = rng.standard_normal(flux.shape) * np.sqrt(extra)
    new_var = np.where(np.isfinite(var), np.maximum(var, target_var), np.inf)
    return flux + noise, inverse_variance(new_var)


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
    flux, ivar, wavelength = check_batch(flux, ivar, wavelength)
    rng = as_generator(rng)
    if not np.isfinite(rv_max) or rv_max < 0:
        raise InputError("telluric rv_max must be >= 0")
    rv = rng.uniform(-rv_max, rv_max, size=flux.shape[0])
    mask = telluric_mask(wavelength, rv)
    return flux.copy(), np.where(mask, 0.0, ivar)


def zero_bad_pixels(flux, ivar, fraction: float, rng):
    """Set a random ``fraction`` of pixels (independently) to flux 0, ivar 0."""
    flux, ivar, _ = check_batch(flux, ivar)
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
    flux, ivar, wavelength = check_batch(flux, ivar, wavelength)
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


def continuum_error(flux, ivar, wavelength, amplitude: float, rng):
    """A continuum-normalization error: each chip of each spectrum multiplied by 1 + a P1(x) + b P2(x)
    (Legendre polynomials of the position x in [-1, 1] across the chip, a and b ~ N(0, amplitude)):
    the tilt and curvature a pseudo-continuum fit leaves behind.  ivar is divided by the factor squared."""
    flux, ivar, wavelength = check_batch(flux, ivar, wavelength)
    rng = as_generator(rng)
    if not np.isfinite(amplitude) or amplitude < 0:
        raise InputError("continuum error amplitude must be >= 0")
    slices, _ = chip_segments(wavelength)
    factor = np.ones_like(flux, dtype=np.float64)
    for s in slices:
        x = np.linspace(-1.0, 1.0, s.stop - s.start)[None, :]
        a, b = rng.normal(0.0, amplitude, size=(2, flux.shape[0], 1))
        factor[:, s] = 1.0 + a * x + b * 0.5 * (3 * x * x - 1)
    factor = np.clip(factor, 0.5, 1.5)
    return flux * factor, ivar / factor**2


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
    continuum: amplitude of continuum-normalization errors (``continuum_error``).
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
    continuum: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rv_max", "vsini_max", "vmacro_max", "telluric_rv_max", "bad_pixel_frac", "persistence", "continuum"):
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
        flux, ivar, wavelength = check_batch(flux, ivar, wavelength)
        n = flux.shape[0]
        if self.vmacro_max > 0:
            flux, ivar = macroturbulence(flux, ivar, wavelength, rng.uniform(0, self.vmacro_max, n), self.macro_kind)
        if self.vsini_max > 0:
            flux, ivar = rotational_broadening(flux, ivar, wavelength, rng.uniform(0, self.vsini_max, n), self.limb_darkening)
        if self.rv_max > 0:
            flux, ivar = doppler_shift(flux, ivar, wavelength, rng.uniform(-self.rv_max, self.rv_max, n))
        if self.persistence > 0:
            flux, ivar = persistence(flux, ivar, wavelength, self.persistence, rng, self.persistence_chip)
        if self.continuum > 0:
            flux, ivar = continuum_error(flux, ivar, wavelength, self.continuum, rng)
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
