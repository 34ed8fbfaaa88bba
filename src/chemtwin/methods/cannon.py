"""The Cannon as a method: trained on the training set's true labels, run on the evaluated stars,
abundances whitened (``methods.label_fit``) and ranked with L2."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from threadpoolctl import threadpool_limits

from chemtwin.core.whitening import whitening_matrix
from chemtwin.data.dataset import dataset_info, open_dataset
from chemtwin.errors import InputError
from chemtwin.methods import label_fit
from chemtwin.methods.base import Fitted, Inputs, Method, Tags
from chemtwin.tagging.cannon import Cannon, CannonTestResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CannonLabels(Method):
    """``label_names``: the Cannon's labels (default: ``label_fit.independent_labels`` of the
    training set).  Of the training stars, ``holdout_stars`` (at most a fifth) are kept out for
    the whitening and up to ``max_train_stars`` of the rest train the model (a random subset
    from the seed; memory ~ 0.12 GB per 1,000 stars with 19 labels)."""

    name: ClassVar[str] = "cannon"
    label: ClassVar[str] = "The Cannon"
    needs: ClassVar[dict] = {"train": "labelled stars: its training set"}
    whitened: ClassVar[bool] = True
    learns_labels: ClassVar[bool] = True
    label_names: tuple | None = None
    order: int = 2
    whiten: str = "errors"
    max_train_stars: int = 5000  # ~35 s of training on one core with 19 labels (quadratic: 210 terms)
    holdout_stars: int = 1000    # training stars kept out of the fit to measure the errors for whitening
    n_jobs: int | None = None

    def __post_init__(self):
        label_fit.check_whiten(self.whiten)
        if self.max_train_stars < 2:
            raise InputError(f"max_train_stars must be at least 2, got {self.max_train_stars}", "max_train_stars")
        if self.holdout_stars < 0:
            raise InputError(f"holdout_stars must be >= 0, got {self.holdout_stars}", "holdout_stars")

    def fit(self, inputs: Inputs, target=None) -> Fitted:
        if inputs.train is None:
            raise InputError("the Cannon needs its training set (train=...)", "train")
        progress = inputs.progress
        # BLAS's own threads make the Cannon's small stacked matrix operations many times slower
        # (measured: 20x on 2 shared cores); the Cannon runs its own threads with one BLAS thread each
        with open_dataset(inputs.train) as tr, threadpool_limits(1, user_api="blas"):
            names, values, chem, abundances, hold_rows, fit_rows = label_fit.training_split(
                tr, self.label_names, inputs.seed, self.holdout_stars if self.whiten == "errors" else None,
                self.max_train_stars, target)
            batch = tr.take(fit_rows)
            model = Cannon(names, order=self.order, n_jobs=self.n_jobs)
            t0 = time.perf_counter()
            model.fit(batch.flux, batch.ivar, values[fit_rows], wavelength=tr.wavelength)
            train_s = time.perf_counter() - t0
            del batch
            log.info("cannon: %d labels, %d terms, trained on %d stars in %.1f s", len(names),
                     model.vectorizer.n_terms, fit_rows.size, train_s)

            def test(source, rows=None, desc="cannon test"):
                parts = label_fit.over_rows(source, rows, lambda b, _: model.test(b.flux, b.ivar), desc, progress)
                return CannonTestResult.concatenate(parts, len(names))

            holdout, white = None, None
            if self.whiten == "errors":
                held = test(tr, hold_rows, "cannon hold-out")
                cov, holdout = label_fit.error_covariance(held.labels[:, chem], values[hold_rows][:, chem], abundances,
                                                          str(tr.path))
                white = whitening_matrix(cov)
            info = {"path": None, "class": "Cannon", "order": model.order, "n_terms": model.vectorizer.n_terms,
                    "label_names": names, "train": dataset_info(tr)}

        def tag(ds, evaluated: bool = True) -> Tags:
            with threadpool_limits(1, user_api="blas"):
                t0 = time.perf_counter()
                result = test(ds)
                test_s = time.perf_counter() - t0
            w = white if white is not None else whitening_matrix(result.cov[:, chem][:, :, chem])
            failed = ~np.isfinite(result.labels).all(1)
            fit_info = {
                "labels": names, "abundances": abundances, "whitening": self.whiten,
                "whitening_note": label_fit.WHITENING_NOTES[self.whiten],
                "n_train": int(fit_rows.size), "holdout": holdout, "train_s": train_s, "test_s": test_s,
                "test_ms_per_star": 1e3 * test_s / max(ds.n_stars, 1), "n_failed": int(failed.sum()),
                "median_formal_error": dict(zip(names, np.nanmedian(result.uncertainties, 0).tolist()))
                if (~failed).any() else None,
                "accuracy": label_fit.accuracy(names, result.labels, label_fit.true_labels(ds, names)),
            }
            return Tags(result.labels[:, chem] @ w.T, extra={"label_fit": fit_info})

        return Fitted(info, tag)
