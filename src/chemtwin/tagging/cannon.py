"""The Cannon (Ness et al. 2015), vectorized over pixels and over stars.

Each pixel's flux is a polynomial in the (scaled) labels, f_np = theta_p . v(l_n),
with Gaussian noise of variance sigma_np^2 + s_p^2, where s_p^2 is the pixel's
intrinsic scatter.  Two small classes:

* :class:`PolynomialVectorizer`: labels -> design matrix ``v(l)`` (and its
  derivative).  Terms are monomials of total degree <= ``order`` in the labels,
  scaled as ``(l - offsets) / scales`` with offsets and scales taken from the
  training labels (median and the 2.5-97.5 percentile range, as in the reference
  implementation AnniesLasso).
* :class:`Cannon`: the model, scikit-learn style: ``fit(flux, ivar, labels)``,
  ``predict_flux(labels)``, ``predict(flux, ivar)``, ``test(flux, ivar)`` (labels,
  covariances, chi^2), ``score(flux, ivar, labels)``, ``save(path)``/``load(path)``.

Training maximizes the per-pixel likelihood
``-2 ln L_p = sum_n (f_np - theta_p . v_n)^2 / (sigma_np^2 + s_p^2) + ln(sigma_np^2 + s_p^2)``
by alternating, for all pixels at once, (1) weighted least squares for theta with
weights 1/(sigma^2 + s^2) (normal matrices of every pixel from one matrix product)
and (2) the exact 1-D minimization in s^2 (bracketed Newton on the derivative,
vectorized over pixels).  Each step lowers the likelihood; a pixel stops when its
s^2 stops moving.

The test step fits each spectrum's labels by Levenberg-Marquardt, vectorized over
stars.  Because the model is linear in v(l), a star's chi^2 is a quadratic form in v:
chi^2 = c - 2 b.v + v.G v with G = theta^T W theta and b = theta^T W f (W: the star's
weights).  G and b cost one matrix product per batch of stars; everything after that
works on T x T matrices (T = number of terms) instead of on pixels.  Starting points
(the training median, +-1 sigma along each label, and the linear-algebra estimate:
the linear terms of the v that minimizes the quadratic form) are screened by chi^2
and the fit runs from the best ``n_fits`` of each star; the lower chi^2 wins.  The
formal covariance is (J^T W J)^-1 at the best fit.

Masks: ``pixel_mask`` (P,) excludes pixels from the model (continuum pixels, known
bad regions); ``censors`` (L, P) lets pixel p depend on label l only where True
(AnniesLasso's censoring); ivar = 0 marks a bad pixel of one star (its flux may be
NaN); ivar = inf a noiseless one (counted as sigma = 1e-6).

Work is spread over ``n_jobs`` threads (blocks of pixels in training, batches of
stars in the test step) with BLAS held to one thread; results do not depend on it
(beyond rounding).

Models are saved as ``.npz`` (read with ``allow_pickle=False``): arrays plus a
JSON header, no pickle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations_with_replacement
from pathlib import Path

import numpy as np

from chemtwin import __version__
from chemtwin.data.spectra import check_spectra
from chemtwin.errors import InputError

log = logging.getLogger(__name__)

FORMAT_NAME = "chemtwin-cannon"
FORMAT_VERSION = 1
# ivar = inf marks a noiseless pixel (project convention); the Cannon counts it as
# sigma = 1e-6, far below any real noise, so that every weight stays finite.  (Its noise
# model adds the intrinsic scatter to 1/ivar: it needs variances, not the relative weights
# of chemtwin.data.spectra.ivar_weights.)
IVAR_CAP = 1e12
_MODEL_ARRAYS = ("theta", "s2", "pixel_mask", "censors", "terms", "offsets", "scales", "wavelength", "label_names")


# --------------------------------------------------------------------------- vectorizer


class PolynomialVectorizer:
    """Labels -> polynomial design matrix, in labels scaled by training offsets/scales.

    ``terms`` is an integer matrix (T, L): row t holds the exponent of each label in
    term t.  Row 0 is the constant term; then the linear terms in label order, then
    the quadratic terms (``l_i * l_j`` for i <= j), and so on up to ``order``.
    """

    def __init__(self, label_names, order: int = 2, offsets=None, scales=None, terms=None):
        self.label_names = [str(name) for name in label_names]
        if not self.label_names:
            raise InputError("the Cannon needs at least one label")
        if len(set(self.label_names)) != len(self.label_names):
            raise InputError(f"duplicate label names in {', '.join(self.label_names)}")
        n_labels = len(self.label_names)
        if terms is None:
            if int(order) != order or order < 1:
                raise InputError(f"polynomial order must be a positive integer, got {order!r}")
            terms = polynomial_terms(n_labels, int(order))
        terms = np.asarray(terms, dtype=np.int64)
        if terms.ndim != 2 or terms.shape[1] != n_labels or np.any(terms < 0) or np.any(terms[0] != 0):
            raise InputError("vectorizer terms must be a (T, L) matrix of exponents >= 0 starting with the constant term")
        self.terms = terms
        self.order = int(terms.sum(axis=1).max())
        self.offsets = None if offsets is None else np.asarray(offsets, dtype=np.float64)
        self.scales = None if scales is None else np.asarray(scales, dtype=np.float64)
        self._plan = _recurrence(terms)

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_terms(self) -> int:
        return self.terms.shape[0]

    @property
    def term_names(self) -> list[str]:
        """Human-readable terms: '1', 'TEFF', 'TEFF^2', 'TEFF*LOGG', ..."""
        names = []
        for row in self.terms:
            parts = [name if e == 1 else f"{name}^{e}" for name, e in zip(self.label_names, row) if e]
            names.append("*".join(parts) or "1")
        return names

    def fit(self, labels: np.ndarray) -> "PolynomialVectorizer":
        """Set offsets (median) and scales (2.5-97.5 percentile range) from training labels."""
        labels = np.asarray(labels, dtype=np.float64)
        lo, mid, hi = np.percentile(labels, [2.5, 50.0, 97.5], axis=0)
        scales = hi - lo
        flat = ~(scales > 0)
        if np.any(flat):  # fall back on the full range, e.g. for a label with few distinct values
            scales[flat] = np.ptp(labels[:, flat], axis=0)
        if np.any(~(scales > 0)):
            bad = [n for n, s in zip(self.label_names, scales) if not s > 0]
            raise InputError(f"label(s) {', '.join(bad)} take a single value in the training set; the Cannon cannot learn them")
        self.offsets, self.scales = mid, scales
        return self

    def scale(self, labels: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return (np.asarray(labels, dtype=np.float64) - self.offsets) / self.scales

    def unscale(self, scaled: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return np.asarray(scaled, dtype=np.float64) * self.scales + self.offsets

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        """Design matrix (N, T) of physical labels (N, L)."""
        return self.design_from_scaled(self.scale(self._check_labels(labels)))

    def design_from_scaled(self, z: np.ndarray) -> np.ndarray:
        """Design matrix (..., T) of scaled labels (..., L)."""
        return self._evaluate(z, derivative=False)[0]

    def jacobian_from_scaled(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Design matrix (..., T) and its derivative (..., T, L) w.r.t. the scaled labels."""
        return self._evaluate(z, derivative=True)

    def _evaluate(self, z, derivative):
        """Every term is an earlier term times one label: v_t = v_parent * z_l, so
        dv_t = dv_parent * z_l + v_parent e_l.  One vectorized step per degree."""
        z = np.asarray(z, dtype=np.float64)
        v = np.empty(z.shape[:-1] + (self.n_terms,))
        v[..., 0] = 1.0
        dv = np.zeros(z.shape[:-1] + (self.n_terms, self.n_labels)) if derivative else None
        for idx, parent, label in self._plan:
            zl = z[..., label]
            v[..., idx] = v[..., parent] * zl
            if derivative:
                dv[..., idx, :] = dv[..., parent, :] * zl[..., None]
                dv[..., idx, label] += v[..., parent]
        return v, dv

    def product_terms(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct monomials among the products of two terms, and where each product is.

        Returns (exponents (M, L), index (T, T)): v_t v_u = monomial ``exponents[index[t, u]]``.
        A quadratic model in 4 labels has 120 distinct products v_t v_u (t <= u) but only
        70 distinct monomials, so normal matrices cost 70 columns instead of 120.
        """
        pairs = (self.terms[:, None, :] + self.terms[None, :, :]).reshape(-1, self.n_labels)
        exponents, index = np.unique(pairs, axis=0, return_inverse=True)
        return exponents, index.reshape(self.n_terms, self.n_terms)

    def term_mask(self, censors: np.ndarray) -> np.ndarray:
        """(P, T) bool: term t may be used at pixel p (all labels in it are uncensored there)."""
        censors = np.asarray(censors, dtype=bool)  # (L, P)
        uses = self.terms > 0  # (T, L)
        # term allowed iff no label it uses is censored at the pixel
        return ~((~censors.T)[:, None, :] & uses[None, :, :]).any(axis=-1)

    def _check_labels(self, labels) -> np.ndarray:
        labels = np.asarray(labels, dtype=np.float64)
        if labels.ndim == 1:
            labels = labels[None, :]
        if labels.ndim != 2 or labels.shape[1] != self.n_labels:
            raise InputError(f"expected labels of shape (N, {self.n_labels}) for {', '.join(self.label_names)}, got {labels.shape}")
        return labels

    def _check_fitted(self) -> None:
        if self.offsets is None or self.scales is None:
            raise RuntimeError("vectorizer offsets/scales are not set; call fit(labels) first")


def monomials(z: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """prod_l z_l ** exponents[k, l] for every row k: (..., L) -> (..., K)."""
    z = np.asarray(z, dtype=np.float64)
    powers = z[..., None] ** np.arange(int(exponents.max(initial=0)) + 1)  # (..., L, E)
    out = powers[..., 0, exponents[:, 0]]
    for l in range(1, exponents.shape[1]):
        out = out * powers[..., l, exponents[:, l]]
    return out


def _recurrence(terms: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each degree: (term rows, their parent rows, the label multiplied in).

    Needs every term's parent (the term with one exponent lowered by one) among the
    terms, as in any full polynomial; InputError otherwise.
    """
    rows = {tuple(r): i for i, r in enumerate(terms.tolist())}
    degree = terms.sum(axis=1)
    plan = []
    for d in range(1, int(degree.max(initial=0)) + 1):
        idx = np.flatnonzero(degree == d)
        parent, label = np.empty_like(idx), np.empty_like(idx)
        for k, t in enumerate(idx):
            l = int(np.flatnonzero(terms[t])[0])
            lowered = terms[t].copy()
            lowered[l] -= 1
            if tuple(lowered.tolist()) not in rows:
                raise InputError("vectorizer terms must include every lower-order factor of each term")
            parent[k], label[k] = rows[tuple(lowered.tolist())], l
        plan.append((idx, parent, label))
    return plan


def polynomial_terms(n_labels: int, order: int) -> np.ndarray:
    """Exponent matrix (T, L) of all monomials of total degree <= order, constant first."""
    rows = [np.zeros(n_labels, dtype=np.int64)]
    for degree in range(1, order + 1):
        for combo in combinations_with_replacement(range(n_labels), degree):
            row = np.zeros(n_labels, dtype=np.int64)
            np.add.at(row, list(combo), 1)
            rows.append(row)
    return np.array(rows)


# --------------------------------------------------------------------------- results


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


# --------------------------------------------------------------------------- the model


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
        """Train on N stars: flux, ivar (N, P); labels (N, L) in ``label_names`` order.

        ``pixel_mask`` (P,) bool: True for pixels to model (default all).
        ``censors`` (L, P) bool or {label: (P,) bool}: pixel p may depend on label l
        only where True (default all True).  ``wavelength`` (P,) is stored with the model.
        """
        flux, ivar = _as_spectra(flux, ivar, None, "training")
        n_stars, n_pixels = flux.shape
        labels = np.asarray(labels, dtype=np.float64)
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

        vec = PolynomialVectorizer(self.label_names, self.order).fit(labels)
        design = _Design(vec, vec.scale(labels))
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
        theta[idx], s2[idx] = _train_pixels(
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
        size = max(1, min(size, -(-flux.shape[0] // _n_jobs(self.n_jobs))))
        parts = _parallel_map(
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
        truth = np.asarray(labels, dtype=np.float64)
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
        z_lin = _linear_estimate(vec, G, b)
        if z_lin is not None:
            starts = np.concatenate([starts, z_lin[:, None, :]], axis=1)
        n_fits = min(self.n_fits, starts.shape[1])
        if starts.shape[1] > n_fits:
            v = vec.design_from_scaled(starts)  # (S, K, T)
            screen = np.einsum("skt,skt->sk", v, v @ G - 2.0 * b[:, None, :])  # chi^2 - c
            best = np.argsort(np.where(np.isfinite(screen), screen, np.inf), axis=1, kind="stable")[:, :n_fits]
            starts = np.take_along_axis(starts, best[..., None], axis=1)
        star = np.repeat(np.arange(n_stars), n_fits)
        z, chi2, H, converged = _levenberg_marquardt(
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
        """Write the model to ``path`` (.npz, no pickle), atomically."""
        from chemtwin.core.files import atomic_output, prepare_output

        self._check_fitted()
        path = prepare_output(path, overwrite)
        vec = self.vectorizer
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "chemtwin_version": __version__,
            "label_names": self.label_names,
            "order": self.order,
            "term_names": vec.term_names,
            "n_training_stars": int(getattr(self, "n_training_stars_", 0)),
            "settings": {
                "max_iter": self.max_iter, "tol": self.tol, "fit_scatter": self.fit_scatter,
                "n_starts": self.n_starts, "n_fits": self.n_fits, "max_lm_iter": self.max_lm_iter, "batch_size": self.batch_size,
                "n_jobs": self.n_jobs,
            },
        }
        arrays = {
            "header": np.array(json.dumps(header)),
            "theta": self.theta_,
            "s2": self.s2_,
            "pixel_mask": self.pixel_mask_,
            "censors": self.censors_,
            "terms": vec.terms,
            "offsets": vec.offsets,
            "scales": vec.scales,
            "wavelength": np.zeros(0) if self.wavelength_ is None else self.wavelength_,
            "label_names": np.array(self.label_names, dtype=str),
        }
        with atomic_output(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        return path

    @classmethod
    def load(cls, path) -> "Cannon":
        """Read a model written by :meth:`save`; InputError for anything else."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such model file")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in ("header",) + _MODEL_ARRAYS if k not in data.files]
                if missing:
                    raise InputError(f"{path}: not a chemtwin Cannon model (missing {', '.join(missing)})")
                arrays = {k: data[k] for k in ("header",) + _MODEL_ARRAYS}
            header = json.loads(str(arrays["header"]))
        except InputError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise InputError(f"{path}: not a readable chemtwin Cannon model ({exc.__class__.__name__})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise InputError(f"{path}: not a chemtwin Cannon model")
        if header.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{path}: Cannon model format version {header.get('format_version')} is not supported (need {FORMAT_VERSION})")
        try:
            names = [str(n) for n in arrays["label_names"]]
            theta = arrays["theta"].astype(np.float64)
            n_pixels, n_terms = theta.shape
            n_labels = len(names)
            consistent = (
                names == list(header.get("label_names", []))
                and arrays["terms"].shape == (n_terms, n_labels)
                and arrays["s2"].shape == (n_pixels,)
                and arrays["pixel_mask"].shape == (n_pixels,) and arrays["pixel_mask"].dtype == bool
                and arrays["censors"].shape == (n_labels, n_pixels)
                and arrays["offsets"].shape == (n_labels,)
                and arrays["scales"].shape == (n_labels,)
                and arrays["wavelength"].shape in ((0,), (n_pixels,))
                and np.all(np.isfinite(theta)) and np.all(np.isfinite(arrays["s2"])) and np.all(arrays["s2"] >= 0)
                and np.all(np.isfinite(arrays["offsets"])) and np.all(arrays["scales"] > 0)
            )
        except (ValueError, TypeError, AttributeError):
            consistent = False
        if not consistent:
            raise InputError(f"{path}: corrupt chemtwin Cannon model (arrays disagree)")
        settings = header.get("settings", {})
        model = cls(names, int(header.get("order", 2)), **{k: v for k, v in settings.items() if k in _SETTINGS})
        model.vectorizer = PolynomialVectorizer(names, terms=arrays["terms"], offsets=arrays["offsets"], scales=arrays["scales"])
        model.order = model.vectorizer.order
        model.theta_ = theta
        model.s2_ = arrays["s2"].astype(np.float64)
        model.pixel_mask_ = arrays["pixel_mask"]
        model.censors_ = arrays["censors"].astype(bool)
        model.wavelength_ = arrays["wavelength"].astype(np.float64) if arrays["wavelength"].size else None
        model.n_training_stars_ = int(header.get("n_training_stars", 0))
        model._gram_cache = None
        return model


_SETTINGS = ("max_iter", "tol", "fit_scatter", "n_starts", "n_fits", "max_lm_iter", "batch_size", "n_jobs")


# --------------------------------------------------------------------------- helpers


def _linear_estimate(vec: PolynomialVectorizer, G, b) -> np.ndarray | None:
    """Starting labels from linear algebra: solve G v = b for an unconstrained design
    vector v and read the scaled labels off its linear terms.  (S, L), or None when
    the model has no linear term for some label."""
    rows = []
    for k in range(vec.n_labels):
        unit = np.zeros(vec.n_labels, dtype=vec.terms.dtype)
        unit[k] = 1
        hit = np.flatnonzero(np.all(vec.terms == unit, axis=1))
        if hit.size == 0:
            return None
        rows.append(int(hit[0]))
    d = np.sqrt(np.diagonal(G, axis1=1, axis2=2))
    d = np.where(d > 0, d, 1.0)
    A = G / d[:, :, None] / d[:, None, :] + 1e-9 * np.eye(G.shape[1])
    try:
        v = np.linalg.solve(A, (b / d)[..., None])[..., 0] / d
    except np.linalg.LinAlgError:
        return None
    z = v[:, rows]
    return np.clip(np.where(np.isfinite(z), z, 0.0), -1.5, 1.5)


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


def _block(flux, ivar, cols) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 copies of the columns ``cols`` (a slice), flux zeroed where ivar = 0, and the good mask."""
    iv = np.minimum(ivar[:, cols], IVAR_CAP, dtype=np.float64)
    good = iv > 0
    f = np.where(good, flux[:, cols], 0.0)
    return f, iv, good


class _Design:
    """The training design matrix X (N, T) and the distinct products of its columns.

    ``products`` (N, M) holds each distinct monomial v_t v_u once; ``index`` (T, T)
    says which column is v_t v_u.  A pixel's normal matrix X^T W X is then
    ``(W^T products)[index]``.
    """

    def __init__(self, vec: PolynomialVectorizer, z: np.ndarray):
        self.X = vec.design_from_scaled(z)
        exponents, self.index = vec.product_terms()
        self.products = monomials(z, exponents)


def _wls(design: _Design, F, W, term_mask):
    """Weighted least squares for every pixel of a block at once.

    F, W (N, B) flux and weights; term_mask (B, T).  Returns theta (B, T).
    """
    X = design.X
    n_terms = X.shape[1]
    A = (W.T @ design.products)[:, design.index]  # (B, T, T): all normal matrices from one product
    rhs = (W * F).T @ X  # (B, T)
    if term_mask is not None and not term_mask.all():
        off = ~term_mask
        A[off[:, :, None] | off[:, None, :]] = 0.0
        A[:, np.arange(n_terms), np.arange(n_terms)] += off
        rhs[off] = 0.0
    d = np.sqrt(np.diagonal(A, axis1=1, axis2=2))
    d = np.where(d > 0, d, 1.0)
    A /= d[:, :, None]
    A /= d[:, None, :]
    rhs /= d
    try:
        sol = np.linalg.solve(A, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        sol = (np.linalg.pinv(A, hermitian=True) @ rhs[..., None])[..., 0]
    return sol / d


def _fit_s2(r2, ivar, s2_start, var_scale, tol, max_iter=60):
    """Per-pixel maximum-likelihood intrinsic scatter, all pixels at once.

    Minimizes sum_n r2_n/(v_n + s2) + ln(v_n + s2) over s2 >= 0 (v = 1/ivar; entries
    with ivar = 0 drop out).  The root of the derivative g(s2) = sum d (1 - r2 d),
    d = 1/(v + s2), is found by Newton's method kept inside a bracket [lo, hi]
    (bisection when Newton leaves it); g(max r2) >= 0, so the root lies in [0, max r2],
    and g(0) >= 0 means s2 = 0.  r2, ivar: (N, B).  Returns s2 (B,).
    """
    s2 = np.zeros(r2.shape[1])
    g0 = np.einsum("np,np->p", ivar, 1.0 - r2 * ivar)
    todo = np.flatnonzero(g0 < 0)
    if todo.size == 0:
        return s2
    # The iterations run in float32 (twice the SIMD width, half the memory traffic):
    # the root moves by ~1e-6 (sigma^2 + s2), far below the tolerance.
    R, I = r2[:, todo].astype(np.float32), ivar[:, todo].astype(np.float32)
    lo = np.zeros(todo.size)
    hi = R.max(axis=0).astype(np.float64)
    x = np.clip(s2_start[todo], 0.0, hi)
    x = np.where(x > 0, x, 0.5 * hi)
    scale = var_scale[todo]
    active = np.arange(todo.size)  # positions in todo; R, I hold exactly these columns
    d = np.empty_like(R)
    q = np.empty_like(R)
    for _ in range(max_iter):
        xa = x[active]
        np.multiply(I, xa.astype(np.float32), out=d)
        d += 1.0
        np.divide(I, d, out=d)  # d = 1 / (v + s2)
        np.multiply(R, d, out=q)
        q *= d  # q = r2 d^2
        sd, sq = d.sum(axis=0, dtype=np.float64), q.sum(axis=0, dtype=np.float64)
        g = sd - sq
        h = 2.0 * np.einsum("np,np->p", q, d, dtype=np.float64) - np.einsum("np,np->p", d, d, dtype=np.float64)
        neg = g < 0
        la = lo[active] = np.where(neg, xa, lo[active])
        ha = hi[active] = np.where(neg, hi[active], xa)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = xa - g / h
        new = np.where((h > 0) & (newton > la) & (newton < ha), newton, 0.5 * (la + ha))
        x[active] = new
        done = (np.abs(new - xa) <= tol * (new + scale[active])) | (ha - la <= tol * (la + scale[active]))
        if done.all():
            break
        if done.any():
            active = active[~done]
            R, I = R[:, ~done], I[:, ~done]
            d, q = d[:, ~done], q[:, ~done]
    s2[todo] = x
    return s2


def _train_pixels(design, flux, ivar, columns, term_mask, fit_scatter, max_iter, tol, n_jobs=1, block_pixels=None):
    """theta (C, T) and s2 (C,) for the pixel ``columns`` (C,) of flux/ivar (N, P).

    Pixels are independent; they are processed in blocks of columns sized to stay in
    the CPU cache (each block fully vectorized), spread over ``n_jobs`` threads.
    """
    n_stars = flux.shape[0]
    n_cols = columns.size
    if block_pixels is None:
        block_pixels = int(np.clip(2**18 // max(n_stars, 1), 16, 4096))  # ~2 MB per float64 array

    def train(a):
        sel = slice(a, min(a + block_pixels, n_cols))
        cols = columns[sel]
        if cols[-1] - cols[0] == cols.size - 1:  # contiguous: a view, not a fancy-index copy
            cols = slice(int(cols[0]), int(cols[-1]) + 1)
        f, iv, good = _block(flux, ivar, cols)
        return _train_block(design, f, iv, good, term_mask[sel], fit_scatter, max_iter, tol)

    parts = _parallel_map(train, range(0, n_cols, block_pixels), n_jobs)
    unconverged = sum(p[2] for p in parts)
    if unconverged:
        log.warning("the Cannon's training did not converge at %d pixel(s) in %d rounds", unconverged, max_iter)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _n_jobs(n_jobs) -> int:
    """Threads to use: None or -1 = every CPU this process may run on."""
    if n_jobs is None or n_jobs < 0:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1
    return max(1, int(n_jobs))


def _parallel_map(func, items, n_jobs) -> list:
    """``[func(x) for x in items]`` on ``n_jobs`` threads (NumPy releases the GIL).

    BLAS is held to one thread meanwhile, so threads do not fight over the cores.
    """
    items = list(items)
    n = min(_n_jobs(n_jobs), len(items))
    if n <= 1:
        return [func(x) for x in items]
    try:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(1, user_api="blas")
    except ImportError:  # threadpoolctl comes with scikit-learn; without it, BLAS keeps its threads
        limits = contextlib.nullcontext()
    with limits, ThreadPoolExecutor(n) as pool:
        return list(pool.map(func, items))


def _train_block(design, F, IV, good, term_mask, fit_scatter, max_iter, tol):
    """Alternate WLS for theta and the 1-D s2 fit on one block of pixels (N, B).

    Returns theta (B, T), s2 (B,) and the number of pixels still moving after
    ``max_iter`` rounds.
    """
    n_pix = F.shape[1]
    X = design.X
    theta = _wls(design, F, IV, term_mask)
    s2 = np.zeros(n_pix)
    if not fit_scatter:
        return theta, s2, 0
    n_good = good.sum(axis=0)
    # typical sigma^2 of a pixel (harmonic mean): the scale of convergence tests
    var_scale = n_good / np.maximum(IV.sum(axis=0), 1e-300)
    # pixels whose stars all share one ivar: theta does not depend on s2
    homoscedastic = np.where(good, IV, np.inf).min(axis=0) == IV.max(axis=0)
    active = np.arange(n_pix)
    f, iv, gd = F, IV, good
    for it in range(max(1, max_iter)):
        r = f - X @ theta[active].T
        r *= r
        r2 = np.where(gd, r, 0.0)
        if it == 0:
            # moment estimate mean(r^2) - sigma^2: the exact answer where all sigmas are
            # equal, the starting point elsewhere
            new = np.maximum(r2.sum(axis=0) / n_good - var_scale, 0.0)
            het = np.flatnonzero(~homoscedastic)
            if het.size:
                new[het] = _fit_s2(r2[:, het], iv[:, het], new[het], var_scale[het], tol=0.1 * tol)
        else:  # only heteroscedastic pixels are left
            new = _fit_s2(r2, iv, s2[active], var_scale[active], tol=0.1 * tol)
        refit = (np.abs(new - s2[active]) > tol * (new + var_scale[active])) & ~homoscedastic[active]
        s2[active] = new
        if not refit.any():
            return theta, s2, 0
        active = active[refit]
        f, iv, gd = f[:, refit], iv[:, refit], gd[:, refit]
        theta[active] = _wls(design, f, iv / (1.0 + iv * s2[active]), term_mask[active])
    return theta, s2, active.size


def _levenberg_marquardt(vec: PolynomialVectorizer, G, b, c, z, max_iter):
    """Minimize chi2(z) = c - 2 b.v(z) + v(z).G v(z) for B problems at once.

    G (B, T, T), b (B, T), c (B,), z (B, L) starting scaled labels.  Returns the best
    z (B, L), chi2 (B,), the Gauss-Newton matrix J^T W J (B, L, L) at z, converged (B,).
    Steps are accepted on the chi^2 change computed as (v1 - v0).(G (v1 + v0) - 2 b),
    which keeps its digits when chi^2 itself is a small difference of large numbers.
    """
    n_prob, n_labels = z.shape
    eye = np.eye(n_labels)

    def evaluate(zz, GG, bb):
        v, dv = vec.jacobian_from_scaled(zz)  # (B, T), (B, T, L)
        dvT = dv.transpose(0, 2, 1)
        Gv = (GG @ v[..., None])[..., 0]
        grad = (dvT @ (bb - Gv)[..., None])[..., 0]  # J^T W r
        H = dvT @ (GG @ dv)  # J^T W J
        return v, Gv, grad, H

    v, Gv, grad, H = evaluate(z, G, b)
    chi2 = c - 2.0 * np.einsum("bt,bt->b", b, v) + np.einsum("bt,bt->b", v, Gv)
    lam = np.full(n_prob, 1e-3)
    converged = np.zeros(n_prob, dtype=bool)
    active = np.arange(n_prob)
    for _ in range(max_iter):
        a = active
        Ha = H[a]
        diag = np.diagonal(Ha, axis1=1, axis2=2)
        damp = Ha + (lam[a][:, None] * np.maximum(diag, 1e-12))[:, :, None] * eye
        try:
            step = np.linalg.solve(damp, grad[a][..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = (np.linalg.pinv(damp, hermitian=True) @ grad[a][..., None])[..., 0]
        z_new = z[a] + step
        v_new, Gv_new, grad_new, H_new = evaluate(z_new, G[a], b[a])
        change = np.einsum("bt,bt->b", v_new - v[a], Gv_new + Gv[a] - 2.0 * b[a])
        better = np.isfinite(change) & (change <= 0)
        small = np.abs(step).max(axis=1) < 1e-9
        tiny_gain = -change <= 1e-10 * np.maximum(chi2[a], 1.0)
        acc = a[better]
        z[acc], v[acc], Gv[acc], grad[acc], H[acc] = z_new[better], v_new[better], Gv_new[better], grad_new[better], H_new[better]
        chi2[acc] += change[better]
        lam[a] = np.where(better, np.maximum(lam[a] * 0.3, 1e-9), lam[a] * 10.0)
        ok = (better & (tiny_gain | small)) | (~better & small)
        stuck = ~ok & (lam[a] > 1e10)
        converged[a[ok]] = True
        active = a[~(ok | stuck)]
        if active.size == 0:
            break
    return z, chi2, H, converged
