"""Fitting spectra with a Payne emulator: all labels free, optional radial velocity.

For every star we minimize chi2 = sum_p w_p (model_p(labels, rv) - flux_p)^2 with
w = ivar (0 on masked pixels), batched over stars, by Levenberg-Marquardt in torch:

1. **Starting points** (``n_starts``, default 2).  ``n_candidates`` label vectors (a
   scrambled Sobol set in the scaled box plus its centre) are emulated once.  Ridge
   regressions of their labels on their spectra are crude inverses of the emulator; the
   starts of a star are the guess of a strongly regularized one (robust to noise, shifts
   and model error), that of a weakly regularized one (closer on clean spectra), then the
   candidate with the lowest chi2 (one matrix product for all stars and candidates) and,
   beyond three starts, random offsets (0.05 of the box) from the first guess.  Masked
   pixels take the flux emulated at the best candidate, then at the guess, before a
   regression is applied.  With ``rv=True`` a grid of velocities is scanned first with
   the centre spectrum and the spectra are moved to the rest frame for all this.
2. **Levenberg-Marquardt** in the scaled label space (s in [-0.5, 0.5]; steps are
   projected back into the box), all starts of all stars in one batch.  A trial step
   costs one emulator evaluation (chi2); the derivatives are computed only where the
   step is taken.  The gradient J^T W r is exact: backpropagation written out for the
   MLP format (cheaper than autograd's graph), reverse-mode autodiff otherwise.  The
   Gauss-Newton matrix J^T W J comes from forward-mode autodiff (``hessian="exact"``),
   or, for the MLP format, from ``A^T (W2^T diag(w_bar) W2) A`` with A the (cheap)
   Jacobian of the last hidden layer and w_bar the batch's mean pixel weights
   (``hessian="shared"``; exact when all stars share their pixel weights up to a factor,
   e.g. noiseless or constant-SNR data, and a good preconditioner otherwise).
   Radial-velocity rows of the matrix are always exact.  A start stops when chi2 stops
   changing (``ftol`` relative; ``chi2_tol`` absolute for ivar-weighted stars), when it
   runs into a better start of the same star, or when another start converged to a
   chi2 ten times lower.
3. **Restarts** (``n_retries`` rounds, default 3).  The chi2 of a leaky-ReLU emulator is
   piecewise smooth and LM can stop in a wrong basin.  A star whose reduced chi2 is
   above ``retry_factor`` (10) times the median of the stars fitted in the same call with
   the same kind of weights (and, for unit weights, above an RMS residual of 1e-6) is
   fitted again from ``retry_starts`` (8) random offsets (0.05 of the box) around its best
   fit; the better fit is kept.  Decided over the whole ``fit`` call, so results do not
   depend on batches or threads.
4. **Uncertainties.**  At the best fit, (J^T W J)^-1 in physical units: from the shared
   matrix where it is exact (MLP, no RV, the star's weights proportional to w_bar),
   else from the full Jacobian (forward-mode autodiff, L emulator evaluations).  For
   stars fitted with unit weights (noiseless: ivar inf, or ``weighting="uniform"``) it
   is scaled by chi2 / (n_pixels - n_par).
"""
from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from chemtwin.core.files import prepare_output
from chemtwin.core.grids import SPEED_OF_LIGHT_KMS
from chemtwin.core.threads import torch_threads
from chemtwin.data.dataset import open_dataset
from chemtwin.data.spectra import check_spectra, ivar_weights
from chemtwin.errors import InputError
from chemtwin.tagging.labels_file import write_labels
from chemtwin.spectral_models.payne import LEAKY_SLOPE, PayneEmulator

# torch's forward-mode autodiff keeps global state: one thread at a time may use it
_FORWARD_AD = threading.Lock()
RV_UNIT = 10.0  # km/s per unit of the fitted RV parameter (keeps it O(1) like the labels)
WEIGHTINGS = ("ivar", "uniform")  # "ivar" turns to unit weights for noiseless (ivar inf) stars
HESSIANS = ("auto", "exact", "shared")
START_SPREAD = 0.05  # scatter of extra starts around the linear guess (scaled labels; ~the guess's error)
UNIT_WEIGHT_FLOOR = 1e-12  # reduced chi2 of unit-weight fits never retried: RMS residual 1e-6 (float32 noise)


PER_STAR = ("labels", "labels_err", "covariance", "chi2", "n_pixels", "n_iter", "converged", "at_edge", "rv", "rv_err")


@dataclass
class FitResult:
    """Best-fit labels of N stars (physical units) and their formal uncertainties."""

    label_names: list[str]
    labels: np.ndarray  # (N, L)
    labels_err: np.ndarray  # (N, L)
    covariance: np.ndarray  # (N, n, n), n = L (+1 with RV), order = param_names
    chi2: np.ndarray  # (N,)
    n_pixels: np.ndarray  # (N,) pixels with weight > 0
    n_iter: np.ndarray  # (N,) LM iterations of the best start (in its round of restarts)
    converged: np.ndarray  # (N,) bool
    at_edge: np.ndarray  # (N,) bool: some label ended on the box's edge
    rv: np.ndarray | None = None  # (N,) km/s
    rv_err: np.ndarray | None = None
    param_names: list[str] = field(default_factory=list)

    @property
    def reduced_chi2(self) -> np.ndarray:
        dof = self.n_pixels - len(self.param_names)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(dof > 0, self.chi2 / dof, np.nan)

    @staticmethod
    def concatenate(parts: list["FitResult"]) -> "FitResult":
        first = parts[0]
        cat = {}
        for name in PER_STAR:
            values = [getattr(p, name) for p in parts]
            cat[name] = None if values[0] is None else np.concatenate(values)
        return FitResult(first.label_names, param_names=first.param_names, **cat)

    def replace(self, rows: np.ndarray, other: "FitResult", keep: np.ndarray) -> None:
        """Put the stars ``keep`` (bool) of ``other`` into ``rows`` of this result."""
        for name in PER_STAR:
            mine = getattr(self, name)
            if mine is not None:
                mine[rows] = getattr(other, name)[keep]


class PayneFitter:
    """Batched least-squares fits of spectra with a :class:`PayneEmulator`.

    ``fit(flux, ivar)`` takes NumPy arrays (N, P) on the emulator's pixels and returns a
    :class:`FitResult`.  ``wavelength`` (P,) is needed for ``rv=True`` when the emulator
    does not store one.  Stars go in batches of up to ``batch_size``; with ``threads`` > 1
    the batches run in that many threads with one torch thread each (the operations are
    too small for torch's own threading to pay off).
    """

    def __init__(
        self,
        emulator: PayneEmulator,
        *,
        wavelength: np.ndarray | None = None,
        rv: bool = False,
        rv_max: float = 200.0,
        n_starts: int = 2,
        n_retries: int = 3,
        retry_starts: int = 8,
        retry_factor: float = 10.0,
        n_candidates: int = 2048,
        max_iter: int = 50,
        weighting: str = "ivar",
        hessian: str = "auto",
        batch_size: int = 128,
        threads: int = 1,
        seed: int = 0,
        xtol: float = 1e-7,
        ftol: float = 1e-6,
        chi2_tol: float = 1e-4,
    ):
        if weighting not in WEIGHTINGS:
            raise InputError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
        if hessian not in HESSIANS:
            raise InputError(f"hessian must be one of {', '.join(HESSIANS)}, not {hessian!r}")
        if hessian == "shared" and emulator.format != "mlp":
            raise InputError("hessian='shared' needs an MLP-format emulator")
        if min(n_starts, retry_starts, n_candidates, max_iter, batch_size, threads) < 1 or n_retries < 0:
            raise InputError("n_starts, retry_starts, n_candidates, max_iter, batch_size and threads must be positive "
                             "and n_retries >= 0")
        if not retry_factor > 1:
            raise InputError(f"retry_factor must be above 1, not {retry_factor}")
        if not rv_max > 0:
            raise InputError(f"rv_max must be positive, not {rv_max}")
        self.emulator = emulator.eval()
        self.rv = bool(rv)
        self.rv_max = float(rv_max)
        self.n_starts = int(n_starts)
        self.n_retries, self.retry_factor = int(n_retries), float(retry_factor)
        self.n_candidates = max(int(n_candidates), self.n_starts)
        self.max_iter = int(max_iter)
        self.weighting = weighting
        self.shared_hessian = hessian == "shared" or (hessian == "auto" and emulator.format == "mlp")
        self.batch_size = int(batch_size)
        self.threads = int(threads)
        self.seed = seed
        self.xtol, self.ftol, self.chi2_tol = float(xtol), float(ftol), float(chi2_tol)
        self.n_labels = emulator.n_labels
        self.n_par = self.n_labels + int(self.rv)
        self.param_names = list(emulator.label_names) + (["RV"] if self.rv else [])
        self.dtype = emulator.dtype
        self._g_cache = None
        if wavelength is None:
            wavelength = emulator.wavelength
        elif emulator.wavelength is not None and (
            np.shape(wavelength) != emulator.wavelength.shape
            or not np.allclose(wavelength, emulator.wavelength, rtol=1e-7, atol=0)
        ):
            raise InputError("the spectra's wavelength grid differs from the emulator's; resample them first")
        if wavelength is not None and np.size(wavelength) != emulator.n_pixels:
            raise InputError(f"wavelength has {np.size(wavelength)} pixels, the emulator {emulator.n_pixels}")
        if self.rv:
            self._setup_shift(wavelength)
        self._candidates = self._make_candidates()
        with torch.no_grad():
            self._candidate_flux = self._emulate(self._candidates)  # (K, P)
        self._centre = self._candidate_flux.mean(0)
        # two linear inverses: a robust one (strong ridge: for noisy, shifted or imperfect
        # spectra) and a sharp one (weak ridge: closer for spectra the emulator reproduces)
        self._regressions = [self._linear_inverse(1e-2), self._linear_inverse(1e-4)]
        # offsets of the starts from the regression's guess: 0, then random ones of ~its error
        spread = torch.randn(self.n_starts, self.n_labels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self._perturbations = torch.cat([torch.zeros(1, self.n_labels, dtype=torch.float64), START_SPREAD * spread[1:]])
        # offsets of the restarts from a suspect star's best fit, one set per round (the same for every star)
        retry = torch.Generator().manual_seed(seed + 1)
        self._retry_offsets = [
            START_SPREAD * torch.randn(int(retry_starts), self.n_labels, generator=retry, dtype=torch.float64)
            for _ in range(self.n_retries)
        ]

    # ------------------------------------------------------------------ model
    def _make_candidates(self) -> torch.Tensor:
        engine = torch.quasirandom.SobolEngine(self.n_labels, scramble=True, seed=self.seed)
        points = (engine.draw(self.n_candidates - 1, dtype=torch.float64) - 0.5) * 0.9
        return torch.cat([torch.zeros(1, self.n_labels, dtype=torch.float64), points])

    def _linear_inverse(self, ridge: float) -> torch.Tensor:
        """(P, L): ridge regression of the scaled labels on the candidates' spectra.

        A crude inverse of the emulator: ``(flux - centre) @ matrix`` is the first
        starting point of every star (masked pixels take the centre's flux).
        """
        x = (self._candidate_flux - self._centre).double()
        gram = x @ x.T
        gram.diagonal().add_(ridge * float(gram.diagonal().mean()) + 1e-300)
        return (x.T @ torch.linalg.solve(gram, self._candidates)).to(self.dtype)

    def _emulate(self, s: torch.Tensor) -> torch.Tensor:
        return self.emulator.forward_scaled(s.to(self.dtype))

    def _setup_shift(self, wavelength) -> None:
        """Pixel geometry for radial-velocity shifts: log-uniform pixels, in one or more chips."""
        if wavelength is None:
            raise InputError("fitting RV needs a wavelength grid (the emulator stores none; give the spectra's)")
        log_wl = np.log(np.asarray(wavelength, dtype=np.float64))
        steps = np.diff(log_wl)
        if log_wl.size < 4 or not np.all(np.isfinite(log_wl)) or not np.all(steps > 0):
            raise InputError("fitting RV needs a finite, strictly increasing wavelength grid of at least 4 pixels")
        dx = float(np.median(steps))
        gap = steps > 1.5 * dx
        if not np.all(gap | (np.abs(steps - dx) <= 1e-4 * dx)):
            raise InputError("fitting RV needs pixels uniform in log wavelength (within each detector chip); resample first")
        self._pixel_kms = dx * SPEED_OF_LIGHT_KMS
        # each chip padded on both sides with copies of its edge pixels, wide enough for any shift
        pad = int(math.ceil(self.rv_max / self._pixel_kms)) + 3
        starts = np.flatnonzero(np.r_[True, gap])
        stops = np.r_[starts[1:], log_wl.size]
        source, self._pad_chips = [], []  # chips: (first pixel in the padded layout, pixels)
        for a, b in zip(starts, stops):
            self._pad_chips.append((sum(map(len, source)) + pad, int(b - a)))
            source.append(np.r_[np.full(pad, a), np.arange(a, b), np.full(pad, b - 1)])
        self._pad_source = torch.as_tensor(np.concatenate(source))
        self._pad_arange = torch.arange(self._pad_source.numel())
        n_half = int(math.ceil(self.rv_max / (0.5 * self._pixel_kms)))
        self._rv_grid = torch.linspace(-self.rv_max, self.rv_max, 2 * n_half + 1, dtype=torch.float64)

    def _shift(self, flux: torch.Tensor, rv_kms: torch.Tensor) -> torch.Tensor:
        """Model flux (R, P) seen at radial velocity rv (R,): f(lambda / (1 + rv/c)).

        On a log-uniform grid a velocity is the same shift k (in pixels) everywhere, so
        observed pixel i shows the rest-frame flux at position i - k, interpolated by
        cubic convolution (Catmull-Rom: continuous first derivative, so chi2 is smooth in
        rv).  Neighbours beyond a chip's ends repeat its edge pixel.
        """
        position = -torch.log1p(rv_kms / SPEED_OF_LIGHT_KMS) * (SPEED_OF_LIGHT_KMS / self._pixel_kms)  # (R,)
        whole = torch.floor(position.detach())
        t = (position - whole).to(flux.dtype)[:, None]  # (R, 1)
        t2, t3 = t * t, t * t * t
        weights = (0.5 * (-t3 + 2 * t2 - t), 0.5 * (3 * t3 - 5 * t2 + 2), 0.5 * (-3 * t3 + 4 * t2 + t), 0.5 * (t3 - t2))
        padded = flux[:, self._pad_source]
        index = (self._pad_arange[None, :] + whole.long()[:, None]).clamp(0, self._pad_arange.numel() - 1)
        moved = torch.gather(padded, 1, index)  # moved[r, q] = padded[r, q + whole_r]
        return torch.cat(
            [sum(w * moved[:, a + k : a + k + n] for k, w in zip(range(-1, 3), weights)) for a, n in self._pad_chips], 1
        )

    def _model(self, theta: torch.Tensor) -> torch.Tensor:
        """theta (R, n): scaled labels (+ rv / RV_UNIT) -> model flux (R, P)."""
        flux = self._emulate(theta[:, : self.n_labels])
        if self.rv:
            flux = self._shift(flux, theta[:, self.n_labels] * RV_UNIT)
        return flux

    def _full_jacobian(self, theta: torch.Tensor) -> torch.Tensor:
        """Exact d model / d theta, (R, P, n), by forward-mode autodiff (one tangent per parameter)."""
        tangents = torch.eye(self.n_par, dtype=theta.dtype)[:, None, :].expand(-1, theta.shape[0], -1)

        def column(t):
            return torch.func.jvp(self._model, (theta,), (t,))[1]

        with _FORWARD_AD, torch.no_grad():
            cols = torch.func.vmap(column)(tangents)  # (n, R, P)
        return cols.permute(1, 2, 0)

    # ------------------------------------------------------------------ model and derivatives
    def _forward(self, theta: torch.Tensor):
        """Model flux (R, P) at theta (R, n), and what :meth:`_derivatives` needs of it."""
        s = theta[:, : self.n_labels].to(self.dtype)
        if self.shared_hessian:
            base, d0, d1 = _mlp_forward(self.emulator, s)
        else:
            base, d0, d1 = self._emulate(s), None, None
        flux = self._shift(base, theta[:, self.n_labels] * RV_UNIT) if self.rv else base
        return flux, (base, d0, d1)

    def _derivatives(self, theta, r, w, state, shared_g):
        """Gradient half J^T W r (R, n) and Gauss-Newton matrix (R, n, n), float64, at theta (R, n)
        with residuals r = model - data (R, P) and the :meth:`_forward` state there."""
        if not self.shared_hessian:
            jac = self._full_jacobian(theta)
            wj = jac * w[:, :, None]
            return torch.einsum("rpn,rp->rn", wj, r).double(), torch.bmm(wj.transpose(1, 2), jac).double()
        # MLP: the gradient by backpropagation written out (exact, and cheaper than autograd's
        # graph); the label block of the matrix from the shared W2^T diag(w_bar) W2
        em, n_lab = self.emulator, self.n_labels
        base, d0, d1 = state
        scale, g_bar = shared_g
        g = torch.zeros(theta.shape[0], self.n_par, dtype=torch.float64)
        h = torch.zeros(theta.shape[0], self.n_par, self.n_par, dtype=torch.float64)
        h[:, :n_lab, :n_lab] = _mlp_gauss_newton(em, d0, d1, g_bar).double() * scale[:, None, None]
        u = w * r
        if not self.rv:
            g[:, :n_lab] = _mlp_backward(em, d0, d1, u).double()
            return g, h
        # radial velocity: the shift is linear in the rest-frame flux; its rows of the matrix are exact
        v = theta[:, n_lab]

        def shift(f, v_):
            return self._shift(f, v_ * RV_UNIT)

        with _FORWARD_AD:
            _, j_rv = torch.func.jvp(lambda v_: shift(base, v_), (v,), (torch.ones_like(v),))
        _, to_rest = torch.func.vjp(lambda f: shift(f, v), base)
        wj = w * j_rv
        g[:, :n_lab] = _mlp_backward(em, d0, d1, to_rest(u)[0]).double()
        g[:, n_lab] = (wj * r).sum(1, dtype=torch.float64)
        col = _mlp_backward(em, d0, d1, to_rest(wj)[0]).double()
        h[:, :n_lab, n_lab] = col
        h[:, n_lab, :n_lab] = col
        h[:, n_lab, n_lab] = (wj * j_rv).sum(1, dtype=torch.float64)
        return g, h

    def _shared_g(self, w: torch.Tensor):
        """Per-row weight scale (R,), W2^T diag(w_bar) W2 (H2, H2) and w_bar (P,) for the shared
        Gauss-Newton matrix; None when it is not used."""
        if not self.shared_hessian:
            return None
        scale = w.mean(1).clamp_min(1e-30)
        w_bar = (w / scale[:, None]).mean(0)
        cached = self._g_cache  # batches usually share their pixel weights: reuse the (H2, H2) product
        if cached is None or not torch.equal(cached[0], w_bar):
            w2 = self.emulator.w_array_2
            cached = self._g_cache = (w_bar, w2.T @ (w2 * w_bar[:, None]))
        return scale, cached[1], w_bar

    def _fisher(self, theta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """J^T W J (B, n, n) float64 at theta (B, n), exact.

        For MLP emulators without RV and stars whose weights are w_bar up to a factor (noiseless
        or constant-SNR spectra with one mask), the shared matrix is exact and costs about one
        emulator evaluation; the other stars take the full Jacobian (L emulator evaluations).
        """
        fisher = torch.empty(theta.shape[0], self.n_par, self.n_par, dtype=torch.float64)
        general = torch.ones(theta.shape[0], dtype=torch.bool)
        if self.shared_hessian and not self.rv:
            scale, g_bar, w_bar = self._shared_g(w)
            general = (w / scale[:, None] - w_bar).abs().amax(1) > 1e-6 * w_bar.abs().amax()
            shared = ~general
            if shared.any():
                _, d0, d1 = _mlp_forward(self.emulator, theta[shared].to(self.dtype))
                fisher[shared] = (_mlp_gauss_newton(self.emulator, d0, d1, g_bar) * scale[shared, None, None]).double()
        if general.any():
            jac = self._full_jacobian(theta[general])
            fisher[general] = torch.bmm((jac * w[general][:, :, None]).transpose(1, 2), jac).double()
        return fisher

    # ------------------------------------------------------------------ fitting
    def _weights(self, flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flux with bad pixels zeroed, pixel weights, and which stars are fitted unweighted.

        ivar 0 masks a pixel (its flux may be NaN).  ivar inf marks a noiseless pixel: a
        star with any is fitted with unit weights on those pixels only (the limit of its
        ivar weights), as is every star with ``weighting="uniform"``.
        """
        flux = np.asarray(flux, dtype=np.float64)
        ivar = np.asarray(ivar, dtype=np.float64)
        good = ivar > 0
        unweighted = self._unweighted(ivar)
        w = ivar_weights(ivar)
        uniform = unweighted & ~np.isposinf(ivar).any(1)  # weighting="uniform": every unmasked pixel weighs 1
        w[uniform] = good[uniform]
        return np.where(good, flux, 0.0), w, unweighted

    def _unweighted(self, ivar: np.ndarray) -> np.ndarray:
        """(N,) stars fitted with unit weights: any noiseless pixel, or ``weighting="uniform"``."""
        return np.isposinf(ivar).any(1) | (self.weighting == "uniform")

    def fit(self, flux, ivar=None, progress=None, row_offset: int = 0) -> FitResult:
        """Fit spectra (N, P); ``ivar`` None means unit weights on every pixel.

        Raises InputError for NaN or negative ivar and for non-finite flux where ivar > 0
        (naming the star as row ``row_offset + i``).
        """
        flux = np.atleast_2d(np.asarray(flux))
        if flux.ndim != 2 or flux.shape[1] != self.emulator.n_pixels:
            raise InputError(f"spectra have shape {flux.shape}; the emulator needs (N, {self.emulator.n_pixels})")
        if ivar is None:
            ivar = np.ones_like(flux, dtype=np.float64)
        ivar = np.atleast_2d(np.asarray(ivar))
        if ivar.shape != flux.shape:
            raise InputError(f"ivar has shape {ivar.shape}, flux {flux.shape}")
        check_spectra(flux, ivar, row_offset)
        n = flux.shape[0]
        if n == 0:
            empty = np.zeros((0, self.n_labels))
            return FitResult(
                self.emulator.label_names, empty, empty, np.zeros((0, self.n_par, self.n_par)), np.zeros(0),
                np.zeros(0, int), np.zeros(0, int), np.zeros(0, bool), np.zeros(0, bool),
                np.zeros(0) if self.rv else None, np.zeros(0) if self.rv else None, self.param_names,
            )
        result = self._fit_rows(flux, ivar, np.arange(n), None, progress)
        # Restarts for the stars whose chi2 is far above the others' (a local minimum: the leaky
        # ReLUs of MLP emulators make chi2 piecewise smooth), from random offsets around their
        # best fit; decided over the whole call, so the result does not depend on the batching.
        unweighted = self._unweighted(ivar)
        for offsets in self._retry_offsets:
            todo = self._suspects(result, unweighted)
            if todo.size == 0:
                break
            theta = self.emulator.scale(torch.from_numpy(result.labels[todo])).double()
            if self.rv:
                theta = torch.cat([theta, torch.from_numpy(result.rv[todo] / RV_UNIT)[:, None]], 1)
            starts = theta[:, None, :].repeat(1, offsets.shape[0], 1)
            starts[:, :, : self.n_labels] = (starts[:, :, : self.n_labels] + offsets).clamp(-0.5, 0.5)
            retry = self._fit_rows(flux, ivar, todo, starts, None)
            better = retry.chi2 < result.chi2[todo]
            result.replace(todo[better], retry, better)
        return result

    def _fit_rows(self, flux, ivar, rows: np.ndarray, starts, progress) -> FitResult:
        """Fit the stars ``rows`` in batches (in ``threads`` threads, one torch thread each);
        ``starts`` (len(rows), S, n) replaces the screened starting points."""
        size = max(1, min(self.batch_size, math.ceil(rows.size / self.threads)))

        def run(a: int) -> FitResult:
            sel = rows[a : a + size]
            given = None if starts is None else starts[a : a + size]
            part = self._fit_batch(*self._weights(flux[sel], ivar[sel]), given)
            if progress is not None:
                progress.update(sel.size)
            return part

        if self.threads > 1 and rows.size > size:
            with torch_threads(1), ThreadPoolExecutor(self.threads) as pool:
                parts = list(pool.map(run, range(0, rows.size, size)))
        else:
            parts = [run(a) for a in range(0, rows.size, size)]
        return FitResult.concatenate(parts)

    def _suspects(self, result: FitResult, unweighted: np.ndarray) -> np.ndarray:
        """Rows whose reduced chi2 exceeds ``retry_factor`` times the median of the stars fitted
        with the same kind of weights (and, for unit weights, an RMS residual of 1e-6: float32
        noise is not a failure)."""
        red = result.reduced_chi2
        suspect = np.zeros(red.shape, bool)
        for kind in (unweighted, ~unweighted):
            sel = kind & np.isfinite(red) & (result.n_pixels > 0)
            if sel.sum() < 2:
                continue
            limit = self.retry_factor * np.median(red[sel])
            suspect |= sel & (red > limit) & (~unweighted | (red > UNIT_WEIGHT_FLOOR))
        return np.flatnonzero(suspect)

    def _starts(self, data: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Starting points (B, S, n) from the screening."""
        b = data.shape[0]
        cand = self._candidate_flux  # (K, P)
        centre = self._centre
        rest = data
        rv0 = None
        if self.rv:
            shifted = self._shift(cand[:1].expand(self._rv_grid.numel(), -1), self._rv_grid)  # (V, P)
            rv0 = self._rv_grid[_chi2_matrix(data, w, shifted, centre).argmin(1)]
            # move the spectra (and weights) to the rest frame for the label screening
            rest = self._shift(data, -rv0)
            w = self._shift(w, -rv0).clamp_min(0.0)
        masked = bool((w <= 0).any())
        # the best candidate: a start from 3 starts on, and the first fill of masked pixels
        best = self._candidates[_chi2_matrix(rest, w, cand, centre).argmin(1)] if masked or self.n_starts >= 3 else None
        # masked pixels take the flux emulated at the current guess (twice: screened best, then the regression's)
        guesses = []
        for matrix in self._regressions:
            guess = best
            for _ in range(2 if masked else 1):
                filled = torch.where(w > 0, rest.to(self.dtype), self._emulate(guess)) if masked else rest.to(self.dtype)
                guess = ((filled - centre) @ matrix).double().clamp(-0.5, 0.5)
            guesses.append(guess)
        # robust guess, sharp guess, then random offsets from the robust one; the best candidate last
        theta = torch.zeros(b, self.n_starts, self.n_par, dtype=torch.float64)
        theta[:, :, : self.n_labels] = (guesses[0][:, None, :] + self._perturbations).clamp(-0.5, 0.5)
        if self.n_starts >= 2:
            theta[:, 1, : self.n_labels] = guesses[1]
        if self.n_starts >= 3:
            theta[:, -1, : self.n_labels] = best
        if self.rv:
            theta[:, :, self.n_labels] = (rv0 / RV_UNIT)[:, None]
        return theta

    @staticmethod
    def _redundant(theta: torch.Tensor, chi2: torch.Tensor, converged: torch.Tensor) -> torch.Tensor:
        """(B, S) starts not worth iterating further.

        A start is dropped when another start of the same star with a lower chi2 is
        within 1e-3 of it (same basin), or when another start has converged to a chi2
        below a tenth of its own (a different, much better minimum).
        """
        lower = chi2[:, None, :] < chi2[:, :, None]  # [b, i, j]: start j is better than start i
        close = (theta[:, :, None, :] - theta[:, None, :, :]).abs().amax(-1) < 1e-3
        best_done = torch.where(converged, chi2, torch.full_like(chi2, math.inf)).amin(1, keepdim=True)
        return (lower & close).any(2) | (chi2 > 10 * best_done)

    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.full((self.n_par,), -0.5, dtype=torch.float64)
        hi = torch.full((self.n_par,), 0.5, dtype=torch.float64)
        if self.rv:
            lo[self.n_labels], hi[self.n_labels] = -self.rv_max / RV_UNIT, self.rv_max / RV_UNIT
        return lo, hi

    def _levenberg_marquardt(self, theta0: torch.Tensor, data: torch.Tensor, w: torch.Tensor, chi2_atol: torch.Tensor):
        """Levenberg-Marquardt from every start (B, S, n) of B stars at once (data, w: (B, P)).

        Returns the best start of each star: theta (B, n), chi2 (B,), iterations (B,), converged (B,).
        """
        b, s, n = theta0.shape
        theta = theta0.reshape(b * s, n).clone()
        data = data.to(self.dtype).repeat_interleave(s, 0)
        w = w.to(self.dtype).repeat_interleave(s, 0)
        chi2_atol = chi2_atol.repeat_interleave(s)
        lo, hi = self._bounds()
        shared_g = self._shared_g(w)
        shared_g = None if shared_g is None else shared_g[:2]
        flux, state = self._forward(theta)
        r = flux - data
        chi2 = (w * r * r).sum(1, dtype=torch.float64)
        g, h = self._derivatives(theta, r, w, state, shared_g)
        lam = torch.full((b * s,), 1e-3, dtype=torch.float64)
        n_iter = torch.zeros(b * s, dtype=torch.int64)
        active = torch.ones(b * s, dtype=torch.bool)
        converged = torch.zeros(b * s, dtype=torch.bool)
        for _ in range(self.max_iter):
            if s > 1:
                active &= ~self._redundant(theta.reshape(b, s, n), chi2.reshape(b, s), converged.reshape(b, s)).reshape(-1)
            idx = torch.nonzero(active).squeeze(1)
            if idx.numel() == 0:
                break
            n_iter[idx] += 1
            h_a, g_a = h[idx], g[idx]
            diag = torch.diagonal(h_a, dim1=1, dim2=2)
            floor = diag.amax(1, keepdim=True).clamp_min(1e-30) * 1e-12
            damp = lam[idx, None] * diag.clamp_min(floor) + floor
            step = torch.linalg.solve_ex(h_a + torch.diag_embed(damp), -g_a.unsqueeze(-1))[0].squeeze(-1)
            step = torch.nan_to_num(step)
            trial = torch.maximum(torch.minimum(theta[idx] + step, hi), lo)
            # chi2 first; the derivatives only where the step is taken
            w_a = w[idx]
            flux_t, state_t = self._forward(trial)
            r_t = flux_t - data[idx]
            chi2_t = (w_a * r_t * r_t).sum(1, dtype=torch.float64)
            better = chi2_t < chi2[idx]
            acc = idx[better]
            if acc.numel():
                sg = None if shared_g is None else (shared_g[0][acc], shared_g[1])
                state_acc = tuple(None if t is None else t[better] for t in state_t)
                g[acc], h[acc] = self._derivatives(trial[better], r_t[better], w_a[better], state_acc, sg)
            moved = (trial - theta[idx]).abs().amax(1)
            small_change = (chi2[idx] - chi2_t).abs() <= self.ftol * chi2[idx] + chi2_atol[idx]
            theta[acc], chi2[acc] = trial[better], chi2_t[better]
            lam[acc] = (lam[acc] / 5).clamp_min(1e-9)
            rej = idx[~better]
            lam[rej] *= 8
            done = small_change | (moved < self.xtol) | (~better & (lam[idx] > 1e9))
            done |= chi2[idx] == 0
            converged[idx[done]] = True
            active[idx[done]] = False
        rows = torch.arange(b) * s + chi2.reshape(b, s).argmin(1)
        return theta[rows], chi2[rows], n_iter[rows], converged[rows]

    @torch.no_grad()
    def _fit_batch(self, flux_np: np.ndarray, w_np: np.ndarray, unweighted: np.ndarray, starts=None) -> FitResult:
        n_lab, n = self.n_labels, self.n_par
        n_good = (w_np > 0).sum(1)
        data = torch.from_numpy(flux_np)
        w64 = torch.from_numpy(w_np)
        theta0 = self._starts(data, w64) if starts is None else starts
        # A star is done when a step changes chi2 by less than ftol * chi2 + atol (the model is
        # float32: chi2 is not known better), atol = chi2_tol for ivar-weighted stars and
        # about float32's resolution of the flux, squared, per pixel for unit-weight ones.
        chi2_atol = torch.where(torch.from_numpy(unweighted), torch.from_numpy(n_good * 1e-15), self.chi2_tol).double()
        theta_best, chi2, n_iter, converged = self._levenberg_marquardt(theta0, data, w64, chi2_atol)
        w_best = w64.to(self.dtype)
        fisher = self._fisher(theta_best, w_best)
        units = torch.cat([torch.as_tensor(self.emulator.x_max - self.emulator.x_min), torch.full((n - n_lab,), RV_UNIT, dtype=torch.float64)])
        cov = _inverse(fisher) * units[None, :, None] * units[None, None, :]
        if unweighted.any():  # unit weights: the noise level is estimated from the residuals
            dof = torch.as_tensor(n_good - n, dtype=torch.float64).clamp_min(1)
            factor = torch.where(torch.from_numpy(unweighted), chi2 / dof, torch.ones_like(dof))
            cov = cov * factor[:, None, None]
        cov_np = cov.numpy()
        err = np.sqrt(np.clip(np.diagonal(cov_np, axis1=1, axis2=2), 0, None))
        labels = self.emulator.unscale(theta_best[:, :n_lab]).numpy()
        at_edge = (theta_best[:, :n_lab].abs() >= 0.5 - 1e-9).any(1).numpy()
        no_data = n_good == 0
        if no_data.any():
            labels[no_data] = np.nan
            err[no_data] = np.nan
            cov_np[no_data] = np.nan
        result = FitResult(
            list(self.emulator.label_names), labels, err[:, :n_lab], cov_np, chi2.numpy(), n_good.astype(np.int64),
            n_iter.numpy(), converged.numpy() & ~no_data, at_edge,
            param_names=list(self.param_names),
        )
        if self.rv:
            result.rv = (theta_best[:, n_lab] * RV_UNIT).numpy()
            result.rv_err = err[:, n_lab]
            if no_data.any():
                result.rv[no_data] = np.nan
        return result


def _mlp_forward(em: PayneEmulator, s: torch.Tensor):
    """Flux (R, P) of an MLP emulator at scaled labels s (R, L), and the slopes of its two
    leaky ReLUs there, d0 (R, H) and d1 (R, H2) (1 or LEAKY_SLOPE)."""
    z0 = torch.addmm(em.b_array_0, s, em.w_array_0.T)
    d0 = torch.full_like(z0, LEAKY_SLOPE).masked_fill_(z0 > 0, 1.0)
    z1 = torch.addmm(em.b_array_1, z0 * d0, em.w_array_1.T)
    d1 = torch.full_like(z1, LEAKY_SLOPE).masked_fill_(z1 > 0, 1.0)
    return torch.addmm(em.b_array_2, z1 * d1, em.w_array_2.T), d0, d1


def _mlp_backward(em: PayneEmulator, d0: torch.Tensor, d1: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """J^T u (R, L) for cotangents u (R, P): backpropagation through the MLP with slopes d0, d1."""
    return ((u @ em.w_array_2 * d1) @ em.w_array_1 * d0) @ em.w_array_0


def _mlp_gauss_newton(em: PayneEmulator, d0: torch.Tensor, d1: torch.Tensor, g_bar: torch.Tensor) -> torch.Tensor:
    """A^T g_bar A (R, L, L) with A = D1 W1 D0 W0 (R, H2, L), the Jacobian of the last hidden layer."""
    a = _left_multiply(em.w_array_1, d0[:, :, None] * em.w_array_0) * d1[:, :, None]
    return torch.bmm(a.transpose(1, 2), _left_multiply(g_bar, a))


def _left_multiply(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """m (H2, H) times every x[r] (H, L) -> (R, H2, L), as one large matrix product."""
    r, h, n = x.shape
    return (m @ x.permute(1, 0, 2).reshape(h, r * n)).reshape(m.shape[0], r, n).permute(1, 0, 2)


def _chi2_matrix(data: torch.Tensor, w: torch.Tensor, models: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """chi2 of every spectrum (B, P) against every model (K, P): (B, K).

    In float32 (only used to rank), after subtracting ``centre`` (P,) from both sides so
    that the expanded sum keeps its precision.
    """
    d = (data - centre).float()
    m = (models - centre).float()
    wd = w.float() * d
    return (wd * d).sum(1, keepdim=True) - 2 * wd @ m.T + w.float() @ (m * m).T


def _inverse(m: torch.Tensor) -> torch.Tensor:
    """Inverse of symmetric positive semi-definite matrices; NaN where singular."""
    inv, info = torch.linalg.inv_ex(m)
    bad = (info != 0) | ~torch.isfinite(inv).all(-1).all(-1)
    if bad.any():
        inv[bad] = torch.linalg.pinv(m[bad], hermitian=True)
    return inv


# ---------------------------------------------------------------------- datasets
def fit_dataset(
    emulator: PayneEmulator,
    data_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = True,
    rows: slice | None = None,
    **fitter_kwargs,
) -> tuple[Path, FitResult, float]:
    """Fit every spectrum of a chemtwin dataset and write the labels file (see docs/baselines.md).

    Returns the output path, the result and the wall time of the fitting in seconds.
    """
    from tqdm.auto import tqdm

    out_path = prepare_output(out_path, overwrite)
    with open_dataset(data_path) as ds:
        if ds.n_pixels != emulator.n_pixels:
            raise InputError(f"{ds.path}: spectra have {ds.n_pixels} pixels, the emulator {emulator.n_pixels}")
        fitter = PayneFitter(emulator, wavelength=ds.wavelength, **fitter_kwargs)
        start, stop = (0, ds.n_stars) if rows is None else rows.indices(ds.n_stars)[:2]
        chunk = max(fitter.batch_size, 1024)
        parts = []
        t0 = time.perf_counter()
        with tqdm(total=stop - start, desc="payne fit", unit="star", disable=not progress, leave=False) as bar:
            for batch in ds.iter_batches(chunk, start, stop):
                parts.append(fitter.fit(batch.flux, batch.ivar, progress=bar, row_offset=batch.start))
        seconds = time.perf_counter() - t0
        result = FitResult.concatenate(parts) if parts else fitter.fit(np.zeros((0, ds.n_pixels)))
        group = ds.group[start:stop]
        star_id = ds.star_id
        attrs = {
            "method": "payne",
            "model": str(emulator.source),
            "data": str(ds.path),
            "rows": f"{start}:{stop}",
            "weighting": fitter.weighting,
            "rv_fitted": fitter.rv,
            "n_starts": fitter.n_starts,
            "fit_seconds": seconds,
        }
    columns = {"chi2": result.chi2, "reduced_chi2": result.reduced_chi2, "n_pixels": result.n_pixels,
               "n_iter": result.n_iter, "converged": result.converged, "at_edge": result.at_edge}
    if result.rv is not None:
        columns.update(rv=result.rv, rv_err=result.rv_err)
    write_labels(out_path, result.label_names, result.labels, result.labels_err, result.covariance, columns=columns,
                 covariance_names=result.param_names, units={"rv": "km/s"}, group=group,
                 star_id=None if star_id is None else star_id[start:stop], attrs=attrs)
    return out_path, result, seconds

