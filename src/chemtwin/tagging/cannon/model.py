"""The Cannon model, scikit-learn style: ``fit(flux, ivar, labels)``, ``predict_flux(labels)``,
``predict(flux, ivar)``, ``test(flux, ivar)`` (labels, covariances, chi^2),
``score(flux, ivar, labels)``, ``save(path)`` / ``load(path)`` (``cannon.model_file``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chemtwin.data.spectra import check_spectra
from chemtwin.errors import InputError
from chemtwin.spectral_models.labels import is_table, label_table
from chemtwin.tagging.cannon import model_file
from chemtwin.tagging.cannon.fitting import (
    IVAR_CAP,
    Design,
    levenberg_marquardt,
    linear_estimate,
    parallel_map,
    resolve_jobs,
    train_pixels,
)
from chemtwin.tagging.cannon.vectorizer import PolynomialVectorizer

log = logging.getLogger(__name__)


@dataclass
@dataclass
class CannonTestResult:
    """Output of the test step for S stars and L labels."""

    labels: np.ndarray  # (S, L), NaN where the fit failed
    cov: np.ndarray  # (S, L, L) formal covariance (J^T W J)^-1
    chi2: np.ndarray  # (S,) chi^2 with weights 1/(sigma^2 + s^2)
    n_pixels: np.ndarray  # (S,) pixels used
    converged: np.ndarray  # (S,) bool

    @property
    def uncertainties(self) -> np.ndarray:
        return np.sqrt(np.diagonal(self.cov, axis1=-2, axis2=-1))

    @classmethod
    def concatenate(cls, parts: list["CannonTestResult"], n_labels: int) -> "CannonTestResult":
        if not parts:
            return cls(np.zeros((0, n_labels)), np.zeros((0, n_labels, n_labels)), np.zeros(0),
                       np.zeros(0, np.int64), np.zeros(0, bool))
        return cls(*(np.concatenate(arrays) for arrays in zip(*(
            (p.labels, p.cov, p.chi2, p.n_pixels, p.converged) for p in parts))))

    @property
    def reduced_chi2(self) -> np.ndarray:
        dof = self.n_pixels - self.labels.shape[1]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(dof > 0, self.chi2 / dof, np.nan)



class Cannon:
    """The Cannon: a per-pixel polynomial model of flux in the labels, with intrinsic scatter.

    >>> model = Cannon(["TEFF", "LOGG", "FE_H"], order=2).fit(flux, ivar, labels)
    >>> labels, cov = model.predict(flux_test, ivar_test, return_cov=True)

    Parameters
    ----------
    label_names : the labels, in column order of every label array.
    order : polynomial order (2: quadratic with all cross terms).
    max_iter : training rounds of (WLS for theta, 1-D fit of s^2).
    tol : a pixel has converged when its s^2 moves by less than ``tol`` times
        (s^2 + its typical sigma^2, the harmonic mean over training stars).
    fit_scatter : False fixes s^2 = 0 (plain weighted least squares).
    n_starts : starting points of the test step beyond the two always used (the
        training median and the linear-algebra estimate): ``n_starts`` points taken
        at +-1 sigma along the label axes, in label order; None uses all 2L.
    n_fits : the starting points with the lowest chi^2 that each star's fit is run
        from (the best result is kept).
    max_lm_iter : Levenberg-Marquardt iterations in the test step.
    batch_size : stars per batch in the test step.
    n_jobs : threads for training (over blocks of pixels) and the test step (over
        batches of stars); None or -1: every CPU available.  Results do not depend
        on it beyond rounding.
    """

    def __init__(
        self,
        label_names,
        order: int = 2,
        *,
        max_iter: int = 20,
        tol: float = 1e-3,
        fit_scatter: bool = True,
        n_starts: int | None = None,
        n_fits: int = 2,
        max_lm_iter: int = 100,
        batch_size: int = 256,
        n_jobs: int | None = None,
    ):
        self.label_names = [str(n) for n in label_names]
        self.order = int(order)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.fit_scatter = bool(fit_scatter)
        self.n_starts = n_starts
        self.n_fits = max(1, int(n_fits))
        self.max_lm_iter = int(max_lm_iter)
        self.batch_size = int(batch_size)
        self.n_jobs = n_jobs
        self.vectorizer = PolynomialVectorizer(self.label_names, self.order)

    # ---------------------------------------------------------------- fitted state

    theta_: np.ndarray  # (P, T)
    s2_: np.ndarray  # (P,)
    pixel_mask_: np.ndarray  # (P,) bool: pixel is modelled
    censors_: np.ndarray  # (L, P) bool
    wavelength_: np.ndarray | None

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "theta_")

    @property
    def n_pixels(self) -> int:
        self._check_fitted()
        return self.theta_.shape[0]

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError("this Cannon is not trained yet; call fit() or Cannon.load()")

    # ---------------------------------------------------------------- training

    def fit(self, flux, ivar, labels, *, pixel_mask=None, censors=None, wavelength=None) -> "Cannon":
        """Train on N stars: flux, ivar (N, P); labels (N, L) in ``label_names`` order, or a table
        with those columns (dict, structured array, astropy Table, pandas DataFrame).

        ``pixel_mask`` (P,) bool: True for pixels to model (default all).
        ``censors`` (L, P) bool or {label: (P,) bool}: pixel p may depend on label l
        only where True (default all True).  ``wavelength`` (P,) is stored with the model.
        """
        flux, ivar = _as_spectra(flux, ivar, None, "training")
        n_stars, n_pixels = flux.shape
        labels = _label_array(labels, self.label_names, "the training label table")
        if labels.ndim != 2 or labels.shape != (n_stars, len(self.label_names)):
            raise InputError(
                f"expected training labels of shape ({n_stars}, {len(self.label_names)}) for "
                f"{', '.join(self.label_names)}, got {labels.shape}"
            )
        bad = ~np.isfinite(labels)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise InputError(f"training label {self.label_names[col]} is not finite for {int(bad.any(1).sum())} star(s) (first: row {row})")
        pixel_mask = _pixel_vector(pixel_mask, n_pixels, "pixel_mask")
        censors = self._censor_matrix(censors, n_pixels)
        if wavelength is not None:
            wavelength = np.asarray(wavelength, dtype=np.float64)
            if wavelength.shape != (n_pixels,):
                raise InputError(f"wavelength has shape {wavelength.shape}, expected ({n_pixels},)")

        if n_stars < 2:  # before the vectorizer, whose label scaling needs stars
            raise InputError(f"{n_stars} training star(s): The Cannon needs more stars than polynomial terms")
        vec = PolynomialVectorizer(self.label_names, self.order).fit(labels)
        design = Design(vec, vec.scale(labels))
        X = design.X  # (N, T)
        n_terms = X.shape[1]
        if n_stars <= n_terms:
            raise InputError(f"{n_stars} training stars cannot constrain {n_terms} polynomial terms; give more stars")
        rank = np.linalg.matrix_rank(X / np.linalg.norm(X, axis=0))
        if rank < n_terms:
            raise InputError(
                f"the training labels are degenerate for an order-{self.order} model "
                f"(design matrix rank {rank} < {n_terms} terms): labels are collinear or take too few values"
            )

        good = ivar > 0
        n_good = good.sum(axis=0)
        usable = pixel_mask & (n_good > n_terms)
        if np.any(pixel_mask & ~usable):
            log.warning("%d pixel(s) have too few good training stars and are left out of the model", int((pixel_mask & ~usable).sum()))
        term_mask = vec.term_mask(censors)

        if not usable.any():
            raise InputError(f"no pixel has more than {n_terms} training stars with ivar > 0 (and is not masked)")
        theta = np.zeros((n_pixels, n_terms))
        s2 = np.zeros(n_pixels)
        idx = np.flatnonzero(usable)
        theta[idx], s2[idx] = train_pixels(
            design, flux, ivar, idx, term_mask[idx],
            fit_scatter=self.fit_scatter, max_iter=self.max_iter, tol=self.tol, n_jobs=self.n_jobs,
        )
        self.vectorizer = vec
        self.theta_ = theta
        self.s2_ = s2
        self.pixel_mask_ = usable
        self.censors_ = censors
        self.wavelength_ = wavelength
        self.n_training_stars_ = n_stars
        self._gram_cache = None
        return self

    def _censor_matrix(self, censors, n_pixels) -> np.ndarray:
        n_labels = len(self.label_names)
        if censors is None:
            return np.ones((n_labels, n_pixels), dtype=bool)
        if isinstance(censors, dict):
            unknown = [k for k in censors if k not in self.label_names]
            if unknown:
                raise InputError(f"censors name label(s) the model does not have: {', '.join(map(str, unknown))}")
            out = np.ones((n_labels, n_pixels), dtype=bool)
            for name, row in censors.items():
                out[self.label_names.index(name)] = _pixel_vector(row, n_pixels, f"censors[{name}]")
            return out
        censors = np.asarray(censors)
        if censors.shape != (n_labels, n_pixels) or censors.dtype != bool:
            raise InputError(f"censors must be a bool array of shape ({n_labels}, {n_pixels}), got {censors.dtype} {censors.shape}")
        return censors.copy()

    # ---------------------------------------------------------------- prediction

    def predict_flux(self, labels) -> np.ndarray:
        """Model spectra (N, P) for labels (N, L); NaN at pixels the model leaves out."""
        self._check_fitted()
        X = self.vectorizer(labels)
        flux = X @ self.theta_.T
        flux[:, ~self.pixel_mask_] = np.nan
        return flux

    def test(self, flux, ivar, *, initial_labels=None) -> CannonTestResult:
        """Fit the labels of S spectra: flux, ivar (S, P).  See :class:`CannonTestResult`.

        ``initial_labels`` (L,) or (K, L) adds starting points (physical units), screened
        by chi^2 together with the default ones.
        """
        self._check_fitted()
        flux, ivar = _as_spectra(flux, ivar, self.n_pixels, "test")
        extra = None
        if initial_labels is not None:
            extra = self.vectorizer.scale(self.vectorizer._check_labels(initial_labels))
        self._gram_terms()  # build the shared cache before the threads start
        # every star's G is copied once per fit: keep that under ~128 MB a batch
        n_terms = self.theta_.shape[1]
        size = max(1, min(self.batch_size, 2**24 // ((self.n_fits + 1) * n_terms * n_terms)))
        # at least one batch per thread: a lone batch would run with BLAS's own threads, which
        # are many times slower on these small stacked matrices (and on a shared machine)
        size = max(1, min(size, -(-flux.shape[0] // resolve_jobs(self.n_jobs))))
        parts = parallel_map(
            lambda a: self._test_batch(flux[a : a + size], ivar[a : a + size], extra),
            range(0, flux.shape[0], size), self.n_jobs,
        )
        return CannonTestResult.concatenate(parts, len(self.label_names))

    def predict(self, flux, ivar, *, return_cov: bool = False):
        """Labels (S, L) of spectra; with ``return_cov`` also their covariances (S, L, L)."""
        result = self.test(flux, ivar)
        return (result.labels, result.cov) if return_cov else result.labels

    def score(self, flux, ivar, labels) -> float:
        """Coefficient of determination R^2 of the predicted labels, averaged over labels.

        As scikit-learn's regressors: 1 is perfect, 0 is no better than the mean.
        Stars whose fit failed (NaN labels) count as missing.
        """
        truth = _label_array(labels, self.label_names, "the label table")
        pred = self.predict(flux, ivar)
        if truth.shape != pred.shape:
            raise InputError(f"labels have shape {truth.shape}, expected {pred.shape}")
        ok = np.all(np.isfinite(pred), axis=1) & np.all(np.isfinite(truth), axis=1)
        if ok.sum() < 2:
            return float("nan")
        t, p = truth[ok], pred[ok]
        ss_res = ((t - p) ** 2).sum(axis=0)
        ss_tot = ((t - t.mean(axis=0)) ** 2).sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.where(ss_res == 0, 1.0, 0.0))
        return float(r2.mean())

    def _gram_terms(self):
        """(theta, products): theta (P, T) with left-out pixels zeroed, and theta_t * theta_u
        for t <= u (P, M) when that table fits in 256 MB (else None).  Shared by all batches."""
        if getattr(self, "_gram_cache", None) is None:
            theta = np.where(self.pixel_mask_[:, None], self.theta_, 0.0)
            iu = np.triu_indices(theta.shape[1])
            products = theta[:, iu[0]] * theta[:, iu[1]] if theta.shape[0] * iu[0].size <= 2**25 else None
            self._gram_cache = (theta, products)
        return self._gram_cache

    def _star_gram(self, weight) -> np.ndarray:
        """G = theta^T diag(w) theta for each star's weights w: (S, P) -> (S, T, T).

        Stars with identical weights (constant-SNR or noiseless spectra sharing one mask:
        every synthetic set) share one G, computed once."""
        unique, inverse = np.unique(weight, axis=0, return_inverse=True)
        if len(unique) < len(weight):
            return self._star_gram(unique)[inverse.reshape(-1)]
        theta, products = self._gram_terms()
        n_stars, n_terms = weight.shape[0], theta.shape[1]
        G = np.empty((n_stars, n_terms, n_terms))
        if products is not None:
            iu = np.triu_indices(n_terms)
            upper = weight @ products
            G[:, iu[0], iu[1]] = upper
            G[:, iu[1], iu[0]] = upper
        else:  # many terms: one (T, P) x (P, T) product per star
            for s in range(n_stars):
                G[s] = (theta.T * weight[s]) @ theta
        return G

    def _start_points(self, extra) -> np.ndarray:
        """Scaled starting points (K, L), not counting the linear-algebra one."""
        n_labels = len(self.label_names)
        # 0 = training median; +-0.25 = about +-1 sigma (scales span 95% of the training set)
        axis = np.concatenate([np.eye(n_labels) * 0.25, -np.eye(n_labels) * 0.25])
        axis = axis[np.argsort(np.tile(np.arange(n_labels), 2), kind="stable")]
        if self.n_starts is not None:
            axis = axis[: max(0, int(self.n_starts))]
        points = [np.zeros((1, n_labels)), axis]
        if extra is not None:
            points.append(extra)
        return np.concatenate(points)

    def _test_batch(self, flux, ivar, extra) -> CannonTestResult:
        n_stars, n_labels = flux.shape[0], len(self.label_names)
        vec = self.vectorizer
        theta, _ = self._gram_terms()

        iv = np.minimum(ivar, IVAR_CAP, dtype=np.float64)
        good = iv > 0
        good &= self.pixel_mask_
        weight = iv / (1.0 + iv * self.s2_)  # 0 where ivar = 0
        weight *= self.pixel_mask_
        f = np.where(good, flux, 0.0)
        wf = weight * f
        # chi^2(v) = c - 2 b.v + v.G v for the design vector v of the labels
        G = self._star_gram(weight)
        b = wf @ theta
        c = np.einsum("sp,sp->s", wf, f)
        n_used = good.sum(axis=1)

        # Screen every starting point by its chi^2 (cheap: no derivatives), then run
        # Levenberg-Marquardt from the best ``n_fits`` of each star; keep the lower chi^2.
        points = self._start_points(extra)
        starts = np.broadcast_to(points, (n_stars,) + points.shape)
        z_lin = linear_estimate(vec, G, b)
        if z_lin is not None:
            starts = np.concatenate([starts, z_lin[:, None, :]], axis=1)
        n_fits = min(self.n_fits, starts.shape[1])
        if starts.shape[1] > n_fits:
            v = vec.design_from_scaled(starts)  # (S, K, T)
            screen = np.einsum("skt,skt->sk", v, v @ G - 2.0 * b[:, None, :])  # chi^2 - c
            best = np.argsort(np.where(np.isfinite(screen), screen, np.inf), axis=1, kind="stable")[:, :n_fits]
            starts = np.take_along_axis(starts, best[..., None], axis=1)
        star = np.repeat(np.arange(n_stars), n_fits)
        z, chi2, H, converged = levenberg_marquardt(
            vec, G[star], b[star], c[star], starts.reshape(-1, n_labels).copy(), self.max_lm_iter
        )
        pick = np.arange(n_stars) * n_fits + np.argmin(np.where(np.isfinite(chi2), chi2, np.inf).reshape(n_stars, n_fits), axis=1)
        z, H, converged = z[pick], H[pick], converged[pick]

        labels = vec.unscale(z)
        empty = n_used <= n_labels  # nothing to fit: H is 0 there
        H[empty] = np.eye(n_labels)
        try:
            cov_z = np.linalg.inv(H)
        except np.linalg.LinAlgError:
            cov_z = np.linalg.pinv(H, hermitian=True)
        cov = cov_z * np.outer(vec.scales, vec.scales)
        # chi^2 from the quadratic form: exact up to ~1e-16 * c (c = sum w f^2)
        v = vec.design_from_scaled(z)
        chi2 = np.maximum(c + np.einsum("st,st->s", v, (G @ v[..., None])[..., 0] - 2.0 * b), 0.0)

        failed = empty | ~np.all(np.isfinite(labels), axis=1) | ~np.all(np.isfinite(cov), axis=(1, 2))
        labels[failed] = np.nan
        cov[failed] = np.nan
        chi2[failed] = np.nan
        return CannonTestResult(labels, cov, chi2, n_used, converged & ~failed)

    # ---------------------------------------------------------------- persistence

    def save(self, path, overwrite: bool = True) -> Path:
        """Write the model to ``path`` (.npz, no pickle), atomically (``cannon.model_file``)."""
        return model_file.save(self, path, overwrite)

    @classmethod
    def load(cls, path) -> "Cannon":
        """Read a model written by :meth:`save`; InputError for anything else."""
        return model_file.load(cls, path)


def _label_array(labels, names, what: str) -> np.ndarray:
    """Labels as a float64 array: a table's columns ``names`` in that order, an array as it is."""
    return label_table(labels, names, what=what)[1] if is_table(labels) else np.asarray(labels, dtype=np.float64)


def _pixel_vector(values, n_pixels: int, what: str) -> np.ndarray:
    if values is None:
        return np.ones(n_pixels, dtype=bool)
    values = np.asarray(values)
    if values.shape != (n_pixels,) or values.dtype != bool:
        raise InputError(f"{what} must be a bool array of {n_pixels} pixels, got {values.dtype} {values.shape}")
    return values.copy()


def _as_spectra(flux, ivar, n_pixels: int | None, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated flux/ivar (S, P) (``check_spectra``); float32 stays float32 (no copy), anything else
    becomes float64.

    Flux where ivar = 0 may be anything (NaN included); callers zero it blockwise.
    """
    def as_float(a):
        a = np.asarray(a)
        return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)

    flux, ivar = as_float(flux), as_float(ivar)
    if flux.ndim == 1 and ivar.ndim == 1:
        flux, ivar = flux[None], ivar[None]
    if flux.ndim != 2 or ivar.shape != flux.shape:
        raise InputError(f"{what} flux {flux.shape} and ivar {ivar.shape} must be (stars, pixels) arrays of one shape")
    if n_pixels is not None and flux.shape[1] != n_pixels:
        raise InputError(f"{what} spectra have {flux.shape[1]} pixels; the model has {n_pixels}")
    check_spectra(flux, ivar, source=f"{what} spectra")
    return flux, ivar
