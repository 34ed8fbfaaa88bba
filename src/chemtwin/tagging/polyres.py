"""Non-neural baselines: polynomial residuals (Price-Jones & Bovy 2019) and raw spectra.

:class:`PolyResiduals` removes the part of every spectrum that the non-chemical labels
explain, then compresses what is left:

1. The conditioning labels (``TEFF, LOGG`` by default, optionally ``FE_H``) are
   standardized with the training mean and standard deviation, and expanded into all
   monomials of total degree ``<= degree`` (default 4: 15 terms for two labels, 35 for
   three).
2. Each pixel's flux is fitted as a polynomial in those labels by weighted least squares
   over the training set, with the inverse variance as weight.  All pixels are fitted
   at once: the normal equations ``G_p = sum_n w_np a_n a_n^T`` and
   ``b_p = sum_n w_np f_np a_n`` are accumulated batch by batch with two matrix products,
   then ``P`` small systems are solved together (float64, with a ridge of ``1e-10 x``
   the mean diagonal for conditioning).
3. Residuals ``f - model`` are projected on their first ``n_components`` (50) principal
   components, fitted on the training residuals (covariance accumulated in batches;
   above 2,000 pixels its top eigenvectors come from randomized subspace iteration).

Masked pixels (``ivar == 0``) have weight 0 in the fit, whatever their flux (NaN
included), and their residual is set to 0 before the PCA and before projection, i.e.
"no information, assume the model".  A pixel with no unmasked training star gets the
all-zero polynomial and residual 0 everywhere.  ``ivar = +inf`` marks noiseless pixels:
the weights are ``chemtwin.data.spectra.ivar_weights``: a star holding +inf weighs those pixels 1
and its finite ones 0 (do not mix noiseless and noisy stars in one training set).
Stars whose ivar is all zero get a NaN tag.

:class:`RawSpectrum` is the simplest baseline: the spectrum itself is the tag (compared
with L1), masked pixels filled with the per-pixel mean flux of the fitted set.

Both follow the scikit-learn pattern: ``fit(flux, ivar, cond)`` returns ``self``,
``transform(flux, ivar, cond)`` returns the tags.  ``fit_dataset`` / ``transform_dataset``
stream a chemtwin dataset in batches.
"""

from __future__ import annotations

import logging
from itertools import combinations_with_replacement

import numpy as np
from scipy.linalg.blas import ssyrk
from tqdm.auto import tqdm

from chemtwin.data.dataset import label_columns, open_dataset
from chemtwin.data.spectra import check_spectra, ivar_weights
from chemtwin.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_CONDITION = ("TEFF", "LOGG")




def _check(flux, ivar, source="input", row0=0):
    flux = np.atleast_2d(np.asarray(flux, dtype=np.float32))
    ivar = np.ones_like(flux) if ivar is None else np.atleast_2d(np.asarray(ivar, dtype=np.float32))
    ok = check_spectra(flux, ivar, row0, source)
    return flux, ivar, ok


def _check_cond(cond, n: int, k: int, names) -> np.ndarray:
    if isinstance(cond, dict):
        missing = [c for c in names if c not in cond]
        if missing:
            raise InputError(f"cond lacks label(s) {', '.join(missing)}")
        cond = np.column_stack([np.asarray(cond[c], float) for c in names])
    if cond is None:
        raise InputError(f"cond (labels {', '.join(names)}) is required")
    cond = np.asarray(cond, dtype=np.float64).reshape(n, -1) if n else np.zeros((0, k))
    if cond.shape != (n, k):
        raise InputError(f"cond must be ({n}, {k}) for labels {', '.join(names)}, got {cond.shape}")
    bad = ~np.isfinite(cond).all(axis=1)
    if bad.any():
        raise InputError(f"{', '.join(names)} not finite for {int(bad.sum())} star(s) (first: row {int(np.flatnonzero(bad)[0])});"
                         " a conditioning label must be known for every star")
    return cond


def _array_batches(flux, ivar, cond, batch_size):
    n = len(flux)
    for a in range(0, n, batch_size):
        yield a, flux[a : a + batch_size], None if ivar is None else ivar[a : a + batch_size], cond[a : a + batch_size]


def _dataset_batches(ds, names, batch_size):
    if isinstance(ds, (str, bytes)) or hasattr(ds, "__fspath__"):
        raise TypeError("open the dataset first")
    cols = label_columns(ds, names)
    for a in range(0, ds.n_stars, batch_size):
        b = ds.read(a, min(a + batch_size, ds.n_stars))
        yield a, np.asarray(b.flux), np.asarray(b.ivar), np.asarray(b.labels)[:, cols]




def _all_labels(ds, names) -> np.ndarray:
    cols = label_columns(ds, names)
    labels = ds.labels() if callable(getattr(ds, "labels", None)) else ds.labels_
    return np.asarray(labels)[:, cols]


def _open(data):

    if isinstance(data, str) or hasattr(data, "__fspath__"):
        return open_dataset(data), True
    return data, False


class PolyResiduals:
    """Price-Jones & Bovy polynomial-residual tags (see the module docstring)."""

    def __init__(self, degree: int = 4, n_components: int = 50, condition=DEFAULT_CONDITION,
                 ridge: float = 1e-10, batch_size: int = 1024):
        if int(degree) < 0:
            raise InputError(f"degree must be >= 0, got {degree}")
        if int(n_components) < 1:
            raise InputError(f"n_components must be >= 1, got {n_components}")
        self.degree = int(degree)
        self.n_components = int(n_components)
        self.condition = (condition,) if isinstance(condition, str) else tuple(condition)
        self.ridge = float(ridge)
        self.batch_size = int(batch_size)
        self.exponents = np.array(
            [np.bincount(np.array(c, dtype=np.int64), minlength=len(self.condition))
             for deg in range(self.degree + 1)
             for c in combinations_with_replacement(range(len(self.condition)), deg)],
            dtype=np.int64,
        ).reshape(-1, len(self.condition))
        self.coef_ = None  # (n_terms, P) polynomial coefficients per pixel
        self.label_mean_ = self.label_scale_ = None
        self.pixel_ok_ = None  # (P,) bool: pixel had training data
        self.mean_ = None  # (P,) mean training residual
        self.components_ = None  # (n_components, P)
        self.explained_variance_ = None
        self.n_train_ = 0

    # ------------------------------------------------------------------ pieces
    @property
    def n_terms(self) -> int:
        return len(self.exponents)

    def design(self, cond) -> np.ndarray:
        """Monomials (N, n_terms) of the standardized labels (float64)."""
        s = (np.asarray(cond, dtype=np.float64) - self.label_mean_) / self.label_scale_
        return np.prod(s[:, None, :] ** self.exponents[None, :, :], axis=2)

    def predict(self, cond) -> np.ndarray:
        """The polynomial model spectrum (N, P) at the conditioning labels ``cond``."""
        self._fitted()
        n = len(next(iter(cond.values()))) if isinstance(cond, dict) else len(np.atleast_2d(cond))
        cond = _check_cond(cond, n, len(self.condition), self.condition)
        return (self.design(cond) @ self.coef_).astype(np.float32)

    def residuals(self, flux, ivar=None, cond=None) -> tuple[np.ndarray, np.ndarray]:
        """``(r, ok)``: residual spectra (N, P) float32, 0 at masked pixels; ``ok`` marks
        stars with at least one usable pixel."""
        self._fitted()
        flux, ivar, ok = _check(flux, ivar)
        cond = _check_cond(cond, len(flux), len(self.condition), self.condition)
        return self._residuals(flux, ivar, cond), ok

    def _residuals(self, flux, ivar, cond) -> np.ndarray:
        model = self.design(cond) @ self.coef_
        good = (ivar_weights(ivar) > 0) & self.pixel_ok_[None, :]
        return np.where(good, np.nan_to_num(flux.astype(np.float64)) - model, 0.0).astype(np.float32)

    def _fitted(self):
        if self.components_ is None:
            raise InputError("this PolyResiduals is not fitted; call fit() first")

    # ------------------------------------------------------------------ fit
    def fit(self, flux, ivar=None, cond=None) -> "PolyResiduals":
        """Fit the per-pixel polynomials and the residual PCA on arrays (N, P)."""
        flux = np.atleast_2d(np.asarray(flux, dtype=np.float32))
        cond = _check_cond(cond, len(flux), len(self.condition), self.condition)
        ivar = None if ivar is None else np.asarray(ivar, dtype=np.float32)
        if ivar is not None and ivar.shape != flux.shape:
            raise InputError(f"flux {flux.shape} and ivar {ivar.shape} must both be (stars, pixels)")
        return self._fit(lambda: _array_batches(flux, ivar, cond, self.batch_size), cond, "input")

    def fit_dataset(self, data, progress: bool = False) -> "PolyResiduals":
        """Fit on a chemtwin dataset (path or opened dataset), streamed in batches."""
        ds, close = _open(data)
        try:
            cond = _check_cond(_all_labels(ds, self.condition), ds.n_stars, len(self.condition), self.condition)
            return self._fit(lambda: _dataset_batches(ds, self.condition, self.batch_size), cond, str(ds.path), progress)
        finally:
            if close:
                ds.close()

    def _fit(self, batches, cond_all, source, progress=False) -> "PolyResiduals":
        if len(cond_all) == 0:
            raise InputError(f"{source}: no training spectra")
        self.label_mean_ = cond_all.mean(axis=0)
        scale = cond_all.std(axis=0)
        self.label_scale_ = np.where(scale > 0, scale, 1.0)
        t = self.n_terms
        gram = rhs = None
        n_total = len(cond_all)
        # pass 1: normal equations of every pixel
        for a, flux, ivar, cond in tqdm(batches(), total=-(-n_total // self.batch_size), desc="polyres fit",
                                        disable=not progress, leave=False):
            flux, ivar, ok = _check(flux, ivar, source, a)
            cond = _check_cond(cond, len(flux), len(self.condition), self.condition)
            w = ivar_weights(ivar)
            f = np.where(w > 0, np.nan_to_num(flux.astype(np.float64)), 0.0)
            design = self.design(cond)
            outer = (design[:, :, None] * design[:, None, :]).reshape(len(design), t * t)
            if gram is None:
                gram = np.zeros((t * t, flux.shape[1]))
                rhs = np.zeros((t, flux.shape[1]))
            gram += outer.T @ w
            rhs += design.T @ (w * f)
        p = gram.shape[1]
        gram = gram.T.reshape(p, t, t)
        diag = np.einsum("pii->p", gram) / t
        self.pixel_ok_ = diag > 0
        coef = np.zeros((p, t))
        if self.pixel_ok_.any():
            g = gram[self.pixel_ok_] + (self.ridge * diag[self.pixel_ok_])[:, None, None] * np.eye(t)
            coef[self.pixel_ok_] = np.linalg.solve(g, rhs.T[self.pixel_ok_][:, :, None])[:, :, 0]
        if not self.pixel_ok_.all():
            log.warning("%d pixels have no unmasked training star: residual 0 there", int((~self.pixel_ok_).sum()))
        self.coef_ = coef.T.copy()
        # pass 2: residual covariance

        total = np.zeros(p)
        cross = np.zeros((p, p))  # upper triangle of sum r^T r
        n_used = 0
        for a, flux, ivar, cond in tqdm(batches(), total=-(-n_total // self.batch_size), desc="polyres pca",
                                        disable=not progress, leave=False):
            flux, ivar, ok = _check(flux, ivar, source, a)
            cond = np.asarray(cond, dtype=np.float64)
            r = self._residuals(flux[ok], ivar[ok], cond[ok])
            total += r.sum(axis=0, dtype=np.float64)
            if len(r):
                np.add(cross, ssyrk(1.0, r, trans=1, lower=0), out=cross)  # float32 per batch, float64 sum
            n_used += len(r)
        if n_used < 2:
            raise InputError(f"{source}: need at least 2 usable training spectra, got {n_used}")
        self.mean_ = total / n_used
        cov = cross  # in place, row block by row block: the P x P matrix is 400 MB at P = 7,214
        for a in range(0, p, 512):
            b = min(p, a + 512)
            block = cov[a:b, a:b]
            block[:] = np.triu(block) + np.triu(block, 1).T
            cov[a:b, :a] = cov[:a, a:b].T  # lower triangle from the upper one
        for a in range(0, p, 512):
            cov[a : a + 512] -= n_used * np.outer(self.mean_[a : a + 512], self.mean_)
            cov[a : a + 512] /= n_used - 1
        k = min(self.n_components, p, n_used - 1)
        if k < self.n_components:
            log.warning("only %d principal components possible (%d pixels, %d training stars)", k, p, n_used)
        if not np.isfinite(cov).all():  # float32 residual products overflow above ~1e19
            raise InputError(f"{source}: residual flux too large for its covariance (float32 overflow); "
                             "continuum-normalised flux (of order 1) is expected")
        values, vectors = _top_eigen(cov, k)
        self.components_ = vectors.T.astype(np.float32)
        self.explained_variance_ = values
        self.n_train_ = n_used
        return self

    # ------------------------------------------------------------------ transform
    def transform(self, flux, ivar=None, cond=None) -> np.ndarray:
        """Tags (N, n_components) float32: residuals projected on the principal components;
        NaN rows for stars whose ivar is all zero."""
        self._fitted()
        flux, ivar, ok = _check(flux, ivar)
        cond = _check_cond(cond, len(flux), len(self.condition), self.condition)
        out = np.full((len(flux), len(self.components_)), np.nan, np.float32)
        for a in range(0, len(flux), self.batch_size):
            s = slice(a, a + self.batch_size)
            r = self._residuals(flux[s], ivar[s], cond[s])
            out[s] = (r - self.mean_.astype(np.float32)) @ self.components_.T
        out[~ok] = np.nan
        return out

    def transform_dataset(self, data, progress: bool = False) -> np.ndarray:
        """Tags of every star of a dataset, streamed in batches."""
        self._fitted()
        ds, close = _open(data)
        try:
            parts = []

            for a, flux, ivar, cond in tqdm(_dataset_batches(ds, self.condition, self.batch_size),
                                            total=-(-ds.n_stars // self.batch_size), desc="polyres tags",
                                            disable=not progress, leave=False):
                flux, ivar, ok = _check(flux, ivar, str(ds.path), a)
                cond = np.asarray(cond, dtype=np.float64)
                if (~np.isfinite(cond[ok])).any():
                    row = a + int(np.flatnonzero(ok & ~np.isfinite(cond).all(1))[0])
                    raise InputError(f"{ds.path}: row {row} has a non-finite condition label")
                parts.append(self.transform(flux, ivar, np.nan_to_num(cond)))
            return np.concatenate(parts) if parts else np.zeros((0, len(self.components_)), np.float32)
        finally:
            if close:
                ds.close()

    def fit_transform(self, flux, ivar=None, cond=None) -> np.ndarray:
        return self.fit(flux, ivar, cond).transform(flux, ivar, cond)


def _top_eigen(cov: np.ndarray, k: int, dense_max: int = 2000, n_iter: int = 10,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Largest ``k`` eigenpairs of a symmetric PSD matrix, sign fixed (largest |entry| > 0).

    Up to ``dense_max`` rows: a full ``eigh``.  Above: randomized subspace iteration
    (``2k`` vectors, ``n_iter`` multiplications with orthonormalization, then Rayleigh-Ritz),
    seconds instead of minutes for the 7,214-pixel APOGEE grid."""
    p = len(cov)
    if p <= dense_max or 2 * k >= p:
        values, vectors = np.linalg.eigh(cov)
        values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
    else:
        q = np.random.default_rng(seed).standard_normal((p, min(p, 2 * k + 10)))
        for _ in range(n_iter):
            q, _ = np.linalg.qr(cov @ q)
        values, small = np.linalg.eigh(q.T @ cov @ q)
        values, vectors = values[::-1][:k], (q @ small[:, ::-1])[:, :k]
    pivot = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[pivot, np.arange(vectors.shape[1])])
    return values, vectors * np.where(signs == 0, 1.0, signs)


class RawSpectrum:
    """The spectrum itself as the tag; masked pixels take the per-pixel mean flux of the
    fitted set (1, the continuum, before ``fit``)."""

    def __init__(self):
        self.fill_ = None

    def fit(self, flux, ivar=None, cond=None) -> "RawSpectrum":
        flux, ivar, ok = _check(flux, ivar)
        w = ivar_weights(ivar) > 0
        count = w.sum(axis=0)
        total = np.where(w, np.nan_to_num(flux.astype(np.float64)), 0.0).sum(axis=0)
        self.fill_ = np.where(count > 0, total / np.maximum(count, 1), 1.0).astype(np.float32)
        return self

    def transform(self, flux, ivar=None, cond=None) -> np.ndarray:
        flux, ivar, ok = _check(flux, ivar)
        fill = self.fill_ if self.fill_ is not None else np.ones(flux.shape[1], np.float32)
        if fill.shape[0] != flux.shape[1]:
            raise InputError(f"flux has {flux.shape[1]} pixels, the fitted set had {fill.shape[0]}")
        out = np.where(ivar_weights(ivar) > 0, flux, fill[None, :]).astype(np.float32)
        out[~ok] = np.nan
        return out

    def fit_transform(self, flux, ivar=None, cond=None) -> np.ndarray:
        return self.fit(flux, ivar, cond).transform(flux, ivar, cond)
