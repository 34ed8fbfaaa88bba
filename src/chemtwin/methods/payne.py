"""The Payne as a method: the evaluated stars fitted with an emulator, all its labels free,
abundances whitened (``methods.label_fit``) and ranked with L2.

The emulator: ``Inputs.emulator`` (a ``.npz`` file or a ``PayneEmulator``), or one trained
here on ``Inputs.train`` (``hidden`` neurons, the first ``max_train_stars`` spectra,
``time_limit`` seconds; ``label_names`` default: ``label_fit.independent_labels``).
``whiten``: "errors" (the covariance of the fit errors of ``holdout_stars`` labelled stars:
the training stars an emulator trained here did not see, or a random subset of the
calibration set: ``Inputs.calibration``, else ``Inputs.train`` beside a given emulator) or
"formal" (the mean formal covariance); default "errors" when labelled stars are at hand,
else "formal".  ``fitter`` options go to ``PayneFitter``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from chemtwin.core.whitening import whitening_matrix
from chemtwin.data.dataset import open_dataset
from chemtwin.errors import InputError
from chemtwin.methods import label_fit
from chemtwin.methods.base import Fitted, Inputs, Method, Tags
from chemtwin.spectral_models.payne import PayneEmulator
from chemtwin.tagging.payne_fit import FitResult, PayneFitter
from chemtwin.tagging.payne_train import train_emulator

log = logging.getLogger(__name__)


def _train_here(path, *, label_names, max_train_stars, holdout_stars, time_limit, hidden, seed, progress):
    """An emulator trained on the first stars of a dataset (time-bounded), its summary, and the
    rows kept out of its training for the whitening (the last ``holdout_stars``, at most a fifth)."""
    with open_dataset(path) as tr:
        n_hold = min(holdout_stars, tr.n_stars // 5)
        n = min(tr.n_stars - n_hold, max_train_stars)
        names = list(label_names) if label_names is not None else label_fit.independent_labels(
            tr.label_names, np.asarray(tr.labels(), dtype=np.float64)[:n])
        path, total = tr.path, tr.n_stars
    emulator, report = train_emulator(path, labels=names, hidden=hidden, epochs=None, time_limit=time_limit,
                                      max_stars=n, seed=seed, progress=progress)
    info = {"source": f"trained on {path}", "trained_here": True, "n_train": report.n_train, "epochs": report.epochs,
            "train_s": report.seconds, "val_median_abs_error": report.val_median_abs_error}
    log.info("payne: emulator trained on %d spectra, %d epochs in %.0f s; held-out median |error| %.4f",
             report.n_train, report.epochs, report.seconds, report.val_median_abs_error)
    return emulator, info, np.arange(total - n_hold, total)


@dataclass(frozen=True)
class PayneLabels(Method):
    name: ClassVar[str] = "payne"
    label: ClassVar[str] = "The Payne"
    needs: ClassVar[dict] = {"train": "labelled stars: to measure its errors"}
    uses: ClassVar[frozenset] = frozenset({"emulator", "calibration"})
    whitened: ClassVar[bool] = True
    whiten: str | None = None
    holdout_stars: int = 1000      # labelled stars fitted to measure the errors for whitening
    label_names: tuple | None = None
    max_train_stars: int = 5000    # spectra an emulator trained here learns from (~0.3 GB in memory)
    time_limit: float = 300.0      # seconds of training of an emulator trained here
    hidden: int = 300
    threads: int | None = None
    fitter: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.whiten is not None:
            label_fit.check_whiten(self.whiten)
        if self.max_train_stars < 2:
            raise InputError(f"max_train_stars must be at least 2, got {self.max_train_stars}", "max_train_stars")
        if not self.time_limit > 0:
            raise InputError(f"time_limit must be positive, got {self.time_limit}", "time_limit")
        if self.holdout_stars < 2:
            raise InputError(f"holdout_stars must be at least 2, got {self.holdout_stars}", "holdout_stars")

    def fit(self, inputs: Inputs, target=None) -> Fitted:
        here = inputs.emulator is None
        calibration = inputs.calibration if inputs.calibration is not None or here else inputs.train
        whiten = self.whiten or ("errors" if here or calibration is not None else "formal")
        if whiten == "errors" and not here and calibration is None:
            raise InputError("whitening by the fit errors needs labelled stars: give a calibration dataset",
                             "calibration")
        hold_rows = None
        if here:
            if inputs.train is None:
                raise InputError("the Payne needs an emulator or a training set to train one on", "emulator", "train")
            own = whiten == "errors" and calibration is None  # the training stars the emulator does not see
            emulator, emu_info, tail = _train_here(
                inputs.train, label_names=self.label_names, max_train_stars=self.max_train_stars,
                holdout_stars=self.holdout_stars if own else 0, time_limit=self.time_limit, hidden=self.hidden,
                seed=inputs.seed, progress=inputs.progress)
            if own:
                calibration, hold_rows = inputs.train, tail
        elif isinstance(inputs.emulator, PayneEmulator):
            emulator, emu_info = inputs.emulator, {"source": str(inputs.emulator.source), "trained_here": False}
        else:
            emulator = PayneEmulator.load(inputs.emulator, self.label_names)
            emu_info = {"source": os.path.abspath(str(inputs.emulator)), "trained_here": False}
        if target is not None and emulator.n_pixels != target.n_pixels:
            raise InputError(f"{target.path}: spectra have {target.n_pixels} pixels, the emulator {emulator.n_pixels}")
        names = list(emulator.label_names)
        chem = label_fit.chemical_columns(names)
        fitter = PayneFitter(emulator, wavelength=None if target is None else target.wavelength,
                             threads=self.threads or min(2, os.cpu_count() or 1), seed=inputs.seed, **self.fitter)

        def fit(source, rows=None, desc="payne fit"):
            parts = label_fit.over_rows(source, rows, lambda b, a: fitter.fit(b.flux, b.ivar, row_offset=a), desc,
                                        inputs.progress)
            return FitResult.concatenate(parts)

        holdout, white = None, None
        if whiten == "errors":
            with open_dataset(calibration) as cal:
                if target is not None and cal.n_pixels != target.n_pixels:
                    raise InputError(f"{cal.path} has {cal.n_pixels} pixels but {target.path} has {target.n_pixels}")
                truth = np.asarray(cal.labels([names[k] for k in chem]), dtype=np.float64)
                if hold_rows is None:
                    hold_rows = np.sort(np.random.default_rng(inputs.seed).permutation(cal.n_stars)[:self.holdout_stars])
                held = fit(cal, hold_rows, "payne hold-out")
                source = str(cal.path)
            cov, holdout = label_fit.error_covariance(held.labels[:, chem], truth[hold_rows],
                                                      [names[k] for k in chem], source)
            white = whitening_matrix(cov)
        info = {"path": emu_info["source"], "class": "PayneEmulator", "format": emulator.format,
                "hidden": emulator.n_hidden, "label_names": names}

        def tag(ds, evaluated: bool = True) -> Tags:
            t0 = time.perf_counter()
            result = fit(ds)
            fit_s = time.perf_counter() - t0
            w = white if white is not None else whitening_matrix(result.covariance[:, chem][:, :, chem])
            failed = ~np.isfinite(result.labels).all(1)
            known = [k for k, n in enumerate(names) if n in ds.label_names]
            fit_info = {
                "labels": names, "abundances": [names[k] for k in chem], "whitening": whiten,
                "whitening_note": label_fit.WHITENING_NOTES[whiten], "holdout": holdout, "emulator": emu_info,
                "fit_s": fit_s, "stars_per_s": ds.n_stars / fit_s if fit_s > 0 else math.nan,
                "n_failed": int(failed.sum()), "n_at_edge": int(result.at_edge.sum()),
                "n_converged": int(result.converged.sum()),
                "median_reduced_chi2": float(np.nanmedian(result.reduced_chi2)) if (~failed).any() else None,
                "median_formal_error": dict(zip(names, np.nanmedian(result.labels_err, 0).tolist()))
                if (~failed).any() else None,
                # labels the data has a truth for (an adapted emulator's nuisance parameters have none)
                "accuracy": label_fit.accuracy([names[k] for k in known], result.labels[:, known],
                                               label_fit.true_labels(ds, [names[k] for k in known])),
            }
            return Tags(result.labels[:, chem] @ w.T, extra={"label_fit": fit_info})

        return Fitted(info, tag)
