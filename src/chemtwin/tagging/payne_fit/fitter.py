"""PayneFitter: batched Levenberg-Marquardt fits of spectra with a Payne emulator (the
package's docstring describes the starts, the iteration, the restarts and the uncertainties)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from chemtwin.core.threads import torch_threads
from chemtwin.data.spectra import check_spectra, ivar_weights
from chemtwin.errors import InputError
from chemtwin.spectral_models.payne import PayneEmulator
from chemtwin.tagging.payne_fit.forward import RV_UNIT, SpectrumModel
from chemtwin.tagging.payne_fit.result import FitResult

WEIGHTINGS = ("ivar", "uniform")  # "ivar" turns to unit weights for noiseless (ivar inf) stars
HESSIANS = ("auto", "exact", "shared")
START_SPREAD = 0.05  # scatter of extra starts around the linear guess (scaled labels; ~the guess's error)
UNIT_WEIGHT_FLOOR = 1e-12  # reduced chi2 of unit-weight fits never retried: RMS residual 1e-6 (float32 noise)


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
        if min(n_starts, retry_starts, n_candidates, max_iter, batch_size, threads) < 1 or n_retries < 0:
            raise InputError("n_starts, retry_starts, n_candidates, max_iter, batch_size and threads must be positive "
                             "and n_retries >= 0")
        if not retry_factor > 1:
            raise InputError(f"retry_factor must be above 1, not {retry_factor}")
        self.model = SpectrumModel(emulator, wavelength, rv=rv, rv_max=rv_max,
                                   shared_hessian=hessian == "shared" or (hessian == "auto" and emulator.format == "mlp"))
        self.emulator = self.model.emulator
        self.rv, self.rv_max = self.model.rv, self.model.rv_max
        self.n_starts = int(n_starts)
        self.n_retries, self.retry_factor = int(n_retries), float(retry_factor)
        self.n_candidates = max(int(n_candidates), self.n_starts)
        self.max_iter = int(max_iter)
        self.weighting = weighting
        self.batch_size = int(batch_size)
        self.threads = int(threads)
        self.seed = seed
        self.xtol, self.ftol, self.chi2_tol = float(xtol), float(ftol), float(chi2_tol)
        self.n_labels, self.n_par = self.model.n_labels, self.model.n_par
        self.param_names = list(emulator.label_names) + (["RV"] if self.rv else [])
        self._candidates = self._make_candidates()
        with torch.no_grad():
            self._candidate_flux = self.model.emulate(self._candidates)  # (K, P)
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
        return (x.T @ torch.linalg.solve(gram, self._candidates)).to(self.model.dtype)

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
            shifted = self.model.shift(cand[:1].expand(self.model.rv_grid.numel(), -1), self.model.rv_grid)  # (V, P)
            rv0 = self.model.rv_grid[_chi2_matrix(data, w, shifted, centre).argmin(1)]
            # move the spectra (and weights) to the rest frame for the label screening
            rest = self.model.shift(data, -rv0)
            w = self.model.shift(w, -rv0).clamp_min(0.0)
        masked = bool((w <= 0).any())
        # the best candidate: a start from 3 starts on, and the first fill of masked pixels
        best = self._candidates[_chi2_matrix(rest, w, cand, centre).argmin(1)] if masked or self.n_starts >= 3 else None
        # masked pixels take the flux emulated at the current guess (twice: screened best, then the regression's)
        guesses = []
        for matrix in self._regressions:
            guess = best
            for _ in range(2 if masked else 1):
                filled = torch.where(w > 0, rest.to(self.model.dtype), self.model.emulate(guess)) if masked else rest.to(self.model.dtype)
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
        data = data.to(self.model.dtype).repeat_interleave(s, 0)
        w = w.to(self.model.dtype).repeat_interleave(s, 0)
        chi2_atol = chi2_atol.repeat_interleave(s)
        lo, hi = self._bounds()
        shared_g = self.model.shared_g(w)
        shared_g = None if shared_g is None else shared_g[:2]
        flux, state = self.model.forward(theta)
        r = flux - data
        chi2 = (w * r * r).sum(1, dtype=torch.float64)
        g, h = self.model.derivatives(theta, r, w, state, shared_g)
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
            flux_t, state_t = self.model.forward(trial)
            r_t = flux_t - data[idx]
            chi2_t = (w_a * r_t * r_t).sum(1, dtype=torch.float64)
            better = chi2_t < chi2[idx]
            acc = idx[better]
            if acc.numel():
                sg = None if shared_g is None else (shared_g[0][acc], shared_g[1])
                state_acc = tuple(None if t is None else t[better] for t in state_t)
                g[acc], h[acc] = self.model.derivatives(trial[better], r_t[better], w_a[better], state_acc, sg)
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
        w_best = w64.to(self.model.dtype)
        fisher = self.model.fisher(theta_best, w_best)
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
    finite = torch.isfinite(m).all(-1).all(-1)  # an overflowed Fisher matrix (absurd ivar) has none
    inv[~finite] = torch.nan
    bad = finite & ((info != 0) | ~torch.isfinite(inv).all(-1).all(-1))
    if bad.any():
        try:
            inv[bad] = torch.linalg.pinv(m[bad], hermitian=True)
        except torch.linalg.LinAlgError:  # eigh did not converge: too ill-conditioned to invert
            inv[bad] = torch.nan
    return inv
