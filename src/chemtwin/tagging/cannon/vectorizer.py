"""The Cannon's design matrix: labels -> polynomial terms ``v(l)`` and their derivatives.

Terms are monomials of total degree <= ``order`` in the labels, scaled as
``(l - offsets) / scales`` with offsets and scales taken from the training labels (median and
the 2.5-97.5 percentile range, as in the reference implementation AnniesLasso).
"""

from __future__ import annotations

from itertools import combinations_with_replacement

import numpy as np

from chemtwin.errors import InputError
from chemtwin.spectral_models.labels import is_table, label_table


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
        if is_table(labels):  # a dict, structured array, astropy Table or pandas DataFrame
            labels = label_table(labels, self.label_names)[1]
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

