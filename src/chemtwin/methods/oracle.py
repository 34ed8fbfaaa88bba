"""The Cramer-Rao oracle as a method: abundances drawn at the bound (``chemtwin.tagging.oracle``),
whitened by the pooled Cramer-Rao covariance and ranked with L2 (the Mahalanobis distance of
the noise).  Datasets made by the embedded synthesizer only; not the mismatch scenario, whose
true model is, by design, unknown."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from chemtwin.core.whitening import whitening_matrix
from chemtwin.methods.base import Fitted, Inputs, Method, Tags
from chemtwin.spectral_models.labels import CHEMICAL_LABELS, LABEL_NAMES
from chemtwin.tagging.oracle import check_given, draw_abundances, oracle_covariance


@dataclass(frozen=True)
class Oracle(Method):
    name: ClassVar[str] = "oracle"
    label: ClassVar[str] = "oracle (Cramer-Rao)"
    whitened: ClassVar[bool] = True
    applies_to_mismatch: ClassVar[bool] = False
    jacobian_file: object = None   # HDF5 cache of the Fisher matrices, shared by sets with the same labels
    jacobian_batch: int = 32       # stars per Jacobian computation
    threads: int | None = None
    given_labels: tuple = ()       # ((label, 1-sigma), ...): TEFF/LOGG as a method is given them (0: exactly);
                                   # the others are free.  The bench sets it from its protocol.

    def __post_init__(self):
        check_given(self.given_labels)

    def fit(self, inputs: Inputs, target=None) -> Fitted:
        seed = inputs.seed
        given = check_given(self.given_labels)
        # the grid, and whether the velocities follow LOGG, are the tagged dataset's: filled in by tag()
        info = {"path": None, "class": "CramerRaoOracle", "grid": None, "seed": seed, "given_labels": given,
                "velocities": None, "free_labels": None}

        def tag(ds, evaluated: bool = True) -> Tags:
            cov, labels, stats = oracle_covariance(ds, jacobian_file=self.jacobian_file, batch_size=self.jacobian_batch,
                                                   threads=self.threads, progress=inputs.progress,
                                                   given=given)
            info.update(grid=stats["grid"], velocities=stats["velocities"])
            held = {n for n, sigma in given.items() if sigma == 0}
            if stats["velocities"] == "tied to LOGG":
                held |= {"VMICRO", "VMACRO"}
            info["free_labels"] = [n for n in LABEL_NAMES if n not in held]
            tags = draw_abundances(labels, cov, seed) @ whitening_matrix(cov).T
            sigma = np.sqrt(np.einsum("nii->ni", cov))
            finite = np.isfinite(sigma).all(axis=1)
            oracle = {
                "whitening": "pooled: inverse Cholesky factor of the mean Cramer-Rao covariance",
                "seed": seed,
                "n_noiseless": int((finite & (sigma == 0).all(axis=1)).sum()),
                "sigma_median": dict(zip(CHEMICAL_LABELS, np.median(sigma[finite], axis=0).tolist()))
                if finite.any() else None,
                "jacobian_cache": stats,
            }
            return Tags(tags, extra={"oracle": oracle})

        return Fitted(info, tag)
