"""Whitening tags by a covariance, so that L2 between them is the Mahalanobis distance.

Used wherever tags have very different precisions per dimension: the oracle's and the
label baselines' abundances (their errors) and the twin metric (the scatter between twins).
"""

from __future__ import annotations

import numpy as np

from chemtwin.errors import InputError


def whitening_matrix(covariance) -> np.ndarray:
    """``W^-1`` with ``W`` the Cholesky factor of a pooled covariance (d, d), or of the mean of a
    per-star covariance (N, d, d) over the stars whose covariance is finite and non-zero (a
    noiseless star carries no information on the noise).  Tags ``x @ W^-1.T`` then have unit
    pooled noise.  The identity when the covariance is zero (noiseless: nothing to whiten)."""
    cov = np.asarray(covariance, dtype=np.float64)
    if cov.ndim == 3:
        finite = np.isfinite(cov).all(axis=(1, 2))
        if not finite.any():
            raise InputError("no star has a finite covariance: nothing to whiten with")
        keep = finite & (cov != 0).any(axis=(1, 2))
        cov = cov[keep].mean(axis=0) if keep.any() else np.zeros(cov.shape[1:])
    if not np.any(cov):
        return np.eye(len(cov))
    # factor at unit diagonal: errors from 0.001 to 0.3 dex make the raw matrix badly scaled
    d = np.sqrt(np.clip(np.diag(cov), 1e-300, None))
    try:
        chol = np.linalg.cholesky(cov / d[:, None] / d[None, :]) * d[:, None]
    except np.linalg.LinAlgError:
        raise InputError("the abundance error covariance is not positive definite (an abundance the method "
                         "does not constrain?)") from None
    return np.linalg.inv(chol)
