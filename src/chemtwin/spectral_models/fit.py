"""Fit one observed spectrum with the synthesizer: labels, radial velocity and a continuum correction.

The model of an observed, continuum-normalized spectrum is ``synth(labels)`` shifted by a radial
velocity and multiplied, chip by chip, by a low-order polynomial (the normalization of a real
spectrum is never exact: ASPCAP fits such a polynomial too).  The polynomial (Legendre, its mean level held near 1)
is solved by weighted least squares at every step, so only the labels and the velocity are optimized (Adam on bounded,
unconstrained parameters).  Several starting points run as one batch and the best chi^2 wins:
a single gradient start falls into the nearest local minimum of TEFF/LOGG.

Pixel weights are ``min(ivar, max_ivar)``: real spectra are limited by how well any model fits,
not by photon noise, so the default cap (SNR 100 per pixel) keeps the brightest pixels from
deciding the fit alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from chemtwin.errors import InputError
from chemtwin.spectral_models.labels import LABEL_NAMES, VALID_RANGE

LEVEL_WEIGHT = 10.0  # a 1 % change of continuum level costs ten times a 1 % residual on every pixel
DEFAULT_FREE = ("TEFF", "LOGG", "FE_H", "C_FE", "N_FE", "O_FE", "MG_FE", "AL_FE", "SI_FE", "CA_FE",
                "MN_FE", "NI_FE", "VMACRO")


@dataclass
class SpectrumFit:
    labels: np.ndarray  # (21,) in LABEL_NAMES order
    rv_kms: float  # velocity of the observed spectrum relative to the model's rest frame
    model: np.ndarray  # (P,) the fitted model: shifted synthesis times the continuum correction
    chi2: float  # sum of weight * residual^2 over usable pixels
    rms: float  # RMS residual over usable pixels, in units of the continuum

    def label(self, name: str) -> float:
        return float(self.labels[LABEL_NAMES.index(name)])


def shift_pixels(flux: torch.Tensor, shift: torch.Tensor, chips: tuple[slice, ...]) -> torch.Tensor:
    """``flux`` (B, P) moved by ``shift`` (B,) pixels within each contiguous chip (linear interpolation;
    a positive shift moves features redward)."""
    out = []
    for chip in chips:
        part = flux[:, chip]
        n = part.shape[1]
        pos = (torch.arange(n, dtype=flux.dtype, device=flux.device)[None, :] - shift[:, None]).clamp(0, n - 1)
        lo = pos.detach().floor().long().clamp(max=n - 2)
        frac = pos - lo
        out.append(part.gather(1, lo) * (1 - frac) + part.gather(1, lo + 1) * frac)
    return torch.cat(out, dim=1)


def continuum_corrected(model: torch.Tensor, flux: torch.Tensor, weight: torch.Tensor,
                        chips: tuple[slice, ...], degree: int, level_weight: float = LEVEL_WEIGHT) -> torch.Tensor:
    """``model`` times the per-chip Legendre polynomial that best matches ``flux`` by weighted least
    squares, its mean level held near 1 by a ridge of ``level_weight`` (relative to the chip's summed
    weight): the tilt is free, the level is not, so many weak lines cannot pose as a continuum that
    a rescaling then removes (both data and model are normalized to a continuum at 1)."""
    out = []
    for chip in chips:
        m, f, w = model[:, chip], flux[chip], weight[chip]
        x = torch.linspace(-1, 1, m.shape[1], dtype=model.dtype, device=model.device)
        powers = torch.stack([torch.special.legendre_polynomial_p(x, k) for k in range(degree + 1)], dim=1)  # (n, D)
        design = m[:, :, None] * powers[None]  # (B, n, D)
        normal = torch.einsum("bnd,n,bne->bde", design, w, design)
        rhs = torch.einsum("bnd,n,n->bd", design, w, f)
        ridge = torch.zeros(degree + 1, dtype=model.dtype, device=model.device)
        ridge[0] = level_weight * w.sum()
        ridge = ridge + 1e-9 * w.sum()
        target = torch.zeros(degree + 1, dtype=model.dtype, device=model.device)
        target[0] = 1.0
        coef = torch.linalg.solve(normal + torch.diag(ridge), rhs + ridge * target)
        out.append(torch.einsum("bnd,bd->bn", design, coef))
    return torch.cat(out, dim=1)


def fit_spectrum(synth, flux: np.ndarray, ivar: np.ndarray, starts: np.ndarray,
                 free: tuple[str, ...] = DEFAULT_FREE, fit_rv: bool = True, rv_max_kms: float = 30.0,
                 continuum_degree: int = 2, steps: int = 300, lr: float = 0.05,
                 max_ivar: float = 1e4) -> SpectrumFit:
    """Best fit of ``flux``/``ivar`` (P,) on the synthesizer's grid from the starting labels ``starts``
    (S, 21); the labels not in ``free`` stay at their starting values, VMICRO follows nothing here
    (give it in ``starts``)."""
    flux, ivar = np.asarray(flux, float), np.asarray(ivar, float)
    starts = np.atleast_2d(np.asarray(starts, float))
    if flux.shape != (synth.wavelength.size,) or ivar.shape != flux.shape:
        raise InputError(f"flux and ivar must be ({synth.wavelength.size},) on the synthesizer's grid, "
                         f"got {flux.shape} and {ivar.shape}")
    if starts.shape[1] != len(LABEL_NAMES):
        raise InputError(f"starting labels need {len(LABEL_NAMES)} columns ({', '.join(LABEL_NAMES)})")
    unknown = [n for n in free if n not in LABEL_NAMES]
    if unknown:
        raise InputError(f"unknown label(s) to fit: {', '.join(unknown)}")
    usable = (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
    if usable.sum() < 100:
        raise InputError(f"only {int(usable.sum())} usable pixels: too few to fit a spectrum")
    dtype = synth.log_strength_offset.dtype
    as_t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    weight = as_t(np.where(usable, np.minimum(ivar, max_ivar), 0.0))
    target = as_t(np.where(usable, flux, 0.0))
    chips = synth.grid.chip_slices
    columns = [LABEL_NAMES.index(n) for n in free]
    lo = as_t([VALID_RANGE[n][0] for n in free])
    hi = as_t([VALID_RANGE[n][1] for n in free])
    inside = (as_t(starts[:, columns]) - lo) / (hi - lo)
    raw = torch.logit(inside.clamp(1e-3, 1 - 1e-3)).requires_grad_(True)
    rv_raw = torch.zeros(starts.shape[0], dtype=dtype, requires_grad=fit_rv)
    base = as_t(starts)
    optimizer = torch.optim.Adam([raw, rv_raw] if fit_rv else [raw], lr=lr)

    def model_of(raw, rv_raw):
        labels = base.clone()
        labels[:, columns] = lo + (hi - lo) * torch.sigmoid(raw)
        rv = rv_max_kms * torch.tanh(rv_raw)
        shifted = shift_pixels(synth(labels), rv / synth.pixel_kms, chips)
        return labels, rv, continuum_corrected(shifted, target, weight, chips, continuum_degree)

    for _ in range(steps):
        optimizer.zero_grad()
        _, _, model = model_of(raw, rv_raw)
        chi2 = ((model - target) ** 2 * weight).sum(dim=1)
        chi2.sum().backward()
        optimizer.step()
    with torch.no_grad():
        labels, rv, model = model_of(raw, rv_raw)
        chi2 = ((model - target) ** 2 * weight).sum(dim=1)
        best = int(torch.argmin(chi2))
        resid = (model[best] - target)[torch.as_tensor(usable)]
    return SpectrumFit(labels=labels[best].numpy().astype(float), rv_kms=float(rv[best]),
                       model=model[best].numpy().astype(float), chi2=float(chi2[best]),
                       rms=float(torch.sqrt((resid**2).mean())))
