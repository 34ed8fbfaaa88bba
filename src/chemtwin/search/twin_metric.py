"""The twin metric: a distance between latents learned from stars of known twin groups.

``TwinMetric().fit(z_train, group_train)`` measures the pooled scatter of latents within
twin groups (for pairs: half the covariance of twin-to-twin differences) and
``transform(z)`` whitens it: ``(z - centre) @ W^-1.T``, ``W`` its Cholesky factor.
Directions in which twins differ (TEFF/LOGG the adversary left behind, noise) shrink;
directions twins share stretch.  L2 in the whitened space is the Mahalanobis distance of
the twin scatter, as the oracle and the label baselines use for their abundances.

The training groups can be the synthetic training set's twin pairs (free, as the model is
trained on it) or known co-natal stars such as open-cluster members.  It is supervision
the 2019/2021 papers did not use (their ranks are L1 on raw latents), so the bench reports
it in separate rows.  ``chemtwin whiten`` applies it to latent files.
"""

from __future__ import annotations

import numpy as np

from chemtwin.core.ranks import group_sizes
from chemtwin.core.whitening import whitening_matrix
from chemtwin.errors import InputError


class TwinMetric:
    """Whitening of the within-twin scatter; ``fit(z, group)``, ``transform(z)``."""

    def fit(self, z, group) -> "TwinMetric":
        z = np.asarray(z, np.float64)
        group = np.asarray(group, np.int64)
        if z.ndim != 2 or group.shape != (len(z),):
            raise InputError(f"latents {z.shape} and groups {group.shape} do not match")
        usable = np.isfinite(z).all(axis=1)
        in_group = usable & (group_sizes(np.where(usable, group, -1)) >= 2)
        if not in_group.any():
            raise InputError("the twin metric needs training stars in twin groups (a group id shared by >= 2 stars)")
        x = z[in_group]
        _, inverse, counts = np.unique(group[in_group], return_inverse=True, return_counts=True)
        sums = np.zeros((len(counts), x.shape[1]))
        np.add.at(sums, inverse, x)
        resid = x - sums[inverse] / counts[inverse, None]
        within = resid.T @ resid / (len(x) - len(counts))
        if not np.trace(within) > 0:
            raise InputError("the training latents have no scatter within twin groups (every twin identical): "
                             "a twin metric cannot be learned from them")
        # a latent dimension the encoder left constant has no within-twin scatter: keep it finite
        within += np.eye(len(within)) * 1e-12 * max(float(np.trace(within)) / len(within), 1e-300)
        self.whitening_ = whitening_matrix(within)
        # centred, a dimension with no scatter stays near 0 rather than a huge constant float32 rounds
        self.centre_ = z[usable].mean(axis=0)
        self.n_groups_ = len(counts)
        return self

    def transform(self, z) -> np.ndarray:
        if not hasattr(self, "whitening_"):
            raise InputError("this TwinMetric is not fitted; call fit(z, group)")
        z = np.asarray(z, np.float64)
        if z.ndim != 2 or z.shape[1] != len(self.centre_):
            raise InputError(f"latents of shape {z.shape}; the twin metric was fitted on {len(self.centre_)} dimensions")
        out = (z - self.centre_) @ self.whitening_.T
        if not np.isfinite(out.astype(np.float32)[np.isfinite(z).all(axis=1)]).all():
            raise InputError("whitened latents overflow float32: the training set's twin scatter is far smaller "
                             "than these latents' spread (a degenerate twin metric)")
        return out
