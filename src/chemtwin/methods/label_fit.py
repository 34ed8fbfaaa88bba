"""What the label-fitting methods share (The Cannon, The Payne; StarNet-like ones next): labels
estimated from each spectrum, the abundances among them whitened, and ranked.

**Whitening** (why: the abundances have very different precisions, and a plain distance
would be dominated by the noisiest elements).  Tags are ``x @ W^-1.T`` with ``W`` the
Cholesky factor of one pooled covariance ``C`` of the abundance errors, so that the L2
distance (the default metric) is the Mahalanobis distance of the errors, as for the
Cramer-Rao oracle.  Two choices of ``C`` (``whiten=``):

* ``"errors"``: the covariance of (estimate - truth) over labelled stars the method did not
  learn from: training stars held out of its training, or stars of a calibration set.
  These are the method's real errors, model misfit and mismatch included.
* ``"formal"``: the mean formal covariance (J^T W J)^-1 of the evaluated stars.  Needs no
  labels, but misses the model's own errors: the Cannon's formal errors are ~5x too small,
  unevenly across labels, and a quick emulator's ~2x.

Measured on 500 SNR-100 validation pairs (Cannon trained on 4,000 stars, the quick
emulator of benchmarks/payne.py): rank 0 for 89% of the pairs with "errors" against 79%
with "formal" for the Cannon, 50% against 41% for the Payne.

**Default labels** of the Cannon and of emulators trained here: TEFF, LOGG, FE_H and the
16 X_FE, plus VMICRO / VMACRO when they vary independently of TEFF and LOGG in the
training set (in the default red-giant prior they are functions of LOGG, which makes the
quadratic Cannon's design matrix singular and the emulator's direction meaningless).
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from chemtwin.errors import InputError
from chemtwin.spectral_models.labels import CHEMICAL_LABELS

WHITENINGS = ("errors", "formal")
WHITENING_NOTES = {"errors": "pooled covariance of the errors on held-out labelled stars",
                   "formal": "mean formal covariance of the evaluated stars"}
READ_BATCH = 1024


def check_whiten(whiten) -> None:
    if whiten not in WHITENINGS:
        raise InputError(f"whiten must be one of {', '.join(WHITENINGS)}, not {whiten!r}", "whiten")


def independent_labels(names, values, candidates=("VMICRO", "VMACRO")) -> list[str]:
    """TEFF, LOGG, FE_H and the X_FE among ``names``, plus each of ``candidates`` whose values
    are not an affine function of TEFF and LOGG (residual scatter above 1e-3 of its own)."""
    names = list(names)
    values = np.asarray(values, dtype=np.float64)
    base = [n for n in ("TEFF", "LOGG") + CHEMICAL_LABELS if n in names]
    extra = []
    physical = [values[:, names.index(n)] for n in ("TEFF", "LOGG") if n in names]
    design = np.column_stack([np.ones(len(values))] + physical)
    for name in candidates:
        if name not in names:
            continue
        column = values[:, names.index(name)]
        spread = np.std(column)
        if not spread > 0:
            continue
        residual = column - design @ np.linalg.lstsq(design, column, rcond=None)[0]
        if np.std(residual) > 1e-3 * spread:
            extra.append(name)
    order = {n: k for k, n in enumerate(names)}
    return sorted(base + extra, key=order.__getitem__)


def chemical_columns(names) -> list[int]:
    """Positions of the abundances (FE_H and the X_FE) among the fitted labels ``names``."""
    cols = [k for k, n in enumerate(names) if n in CHEMICAL_LABELS]
    if not cols:
        raise InputError(f"no abundance (FE_H or X_FE) among the fitted labels {', '.join(names)}")
    return cols


def error_covariance(estimates, truth, names, source) -> tuple[np.ndarray, dict]:
    """Covariance (d, d) of estimate - truth over the stars with a result, and its summary."""
    err = np.asarray(estimates, dtype=np.float64) - truth
    err = err[np.isfinite(err).all(1)]
    if len(err) < 2:
        raise InputError(f"{source}: fewer than 2 held-out stars have a fit; nothing to whiten with")
    cov = np.cov(err, rowvar=False).reshape(len(names), len(names))
    return cov, {"n_stars": int(len(err)), "rmse": dict(zip(names, np.sqrt(np.mean(err**2, 0)).tolist()))}


def true_labels(ds, names) -> np.ndarray | None:
    """True labels of the evaluated stars (for reporting the accuracy only), when the dataset has them."""
    if not all(n in ds.label_names for n in names):
        return None
    values = np.asarray(ds.true_labels(list(names)), dtype=np.float64)
    return values if np.isfinite(values).any() else None


def accuracy(names, estimates, truth) -> dict | None:
    """RMS and median absolute error per label against the truth (finite rows only)."""
    if truth is None:
        return None
    ok = np.isfinite(estimates).all(1) & np.isfinite(truth).all(1)
    if not ok.any():
        return None
    err = estimates[ok] - truth[ok]
    return {n: {"rmse": float(np.sqrt(np.mean(err[:, k] ** 2))), "median_abs": float(np.median(np.abs(err[:, k])))}
            for k, n in enumerate(names)}


def over_rows(source, rows, fn, desc: str, progress: bool) -> list:
    """``fn(batch, start)`` for the rows of a dataset (all when ``rows`` is None), READ_BATCH at a
    time; ``start``: the position of the batch's first row among those asked (for error messages)."""
    parts = []
    n = source.n_stars if rows is None else rows.size
    with tqdm(total=n, desc=desc, unit="star", disable=not progress, leave=False) as bar:
        for a in range(0, n, READ_BATCH):
            b = source.read(a, min(a + READ_BATCH, n)) if rows is None else source.take(rows[a : a + READ_BATCH])
            parts.append(fn(b, a))
            bar.update(len(b.flux))
    return parts


def training_split(tr, label_names, seed: int, holdout_stars: int | None, max_train_stars: int, target=None):
    """The labels a label-fitting method trains on and a random split of a training dataset:
    (names, values (N, L), abundance columns, abundance names, held-out rows, training rows).  ``label_names`` None
    takes every independent label; ``holdout_stars`` (at most a fifth of the stars, at least 2) are
    held out to measure errors on, none when it is None."""
    if target is not None and tr.n_pixels != target.n_pixels:
        raise InputError(f"{tr.path} has {tr.n_pixels} pixels but {target.path} has {target.n_pixels}")
    all_labels = np.asarray(tr.labels(), dtype=np.float64)
    names = list(label_names) if label_names is not None else independent_labels(tr.label_names, all_labels)
    values = all_labels[:, tr.label_columns(names)]
    chem = chemical_columns(names)
    order_rows = np.random.default_rng(seed).permutation(tr.n_stars)
    n_hold = 0 if holdout_stars is None else min(holdout_stars, tr.n_stars // 5)
    if holdout_stars is not None and n_hold < 2:
        raise InputError(f"{tr.path}: too few training stars ({tr.n_stars}) to hold some out for the whitening")
    return (names, values, chem, [names[k] for k in chem], np.sort(order_rows[:n_hold]),
            np.sort(order_rows[n_hold : n_hold + max_train_stars]))
