"""The result of fitting N spectra with a Payne emulator."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
