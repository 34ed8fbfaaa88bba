"""Label-fitting baselines in the evaluation style: The Cannon and The Payne.

Each method estimates every star's labels from its spectrum; the abundances (FE_H and the
16 X_FE that the method estimates) are whitened and ranked for twins exactly like any
other tag (``chemtwin.evaluation.metrics``), as the 2018 "Galactic doppelgangers" study did
with ASPCAP abundances.  Both functions return the standard result dict (``method`` =
"cannon" / "payne"), with a ``label_fit`` entry on what the fit did.

* :func:`evaluate_cannon` trains a Cannon on the training set's true labels and runs it
  on the evaluation set.
* :func:`evaluate_payne` fits the evaluation set with a Payne emulator (all its labels
  free): a ``.npz`` file, a :class:`PayneEmulator`, or one trained here on a training set.

**Whitening** (why: the abundances have very different precisions, and a plain distance
would be dominated by the noisiest elements).  Tags are ``x @ W^-1.T`` with ``W`` the
Cholesky factor of one pooled covariance ``C`` of the abundance errors, so that the L2
distance (the default metric) is the Mahalanobis distance of the errors, as for the
Cramer-Rao oracle.  Two choices of ``C`` (``whiten=``):

* ``"errors"``: the covariance of (estimate - truth) over labelled stars the method did not
  learn from: training stars held out of the Cannon's training or of the emulator's, or
  stars of a ``calibration`` set.  These are the method's real errors, model misfit and
  mismatch included.  The default whenever labelled stars are at hand (always for the
  Cannon).
* ``"formal"``: the mean formal covariance (J^T W J)^-1 of the evaluated stars.  Needs no
  labels (the Payne's default with a ready emulator and no calibration set), but misses
  the model's own errors: the Cannon's formal errors are ~5x too small, unevenly across
  labels, and a quick emulator's ~2x.

Measured on 500 SNR-100 validation pairs (Cannon trained on 4,000 stars, the quick
emulator of benchmarks/payne.py): rank 0 for 89% of the pairs with "errors" against 79%
with "formal" for the Cannon, 50% against 41% for the Payne.

**Default labels** of the Cannon and of emulators trained here: TEFF, LOGG, FE_H and the
16 X_FE, plus VMICRO / VMACRO when they vary independently of TEFF and LOGG in the
training set (in the default red-giant prior they are functions of LOGG, which makes the
quadratic Cannon's design matrix singular and the emulator's direction meaningless).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from chemtwin.core.ranks import check_metric
from chemtwin.core.whitening import whitening_matrix
from chemtwin.data.dataset import dataset_info
from chemtwin.errors import InputError
from chemtwin.evaluation.metrics import _group, _open, _require_twins, _result, evaluate_tags
from chemtwin.spectral_models.labels import CHEMICAL_LABELS

log = logging.getLogger(__name__)

__all__ = ["evaluate_cannon", "evaluate_payne", "independent_labels", "WHITENINGS"]

WHITENINGS = ("errors", "formal")
CANNON_TRAIN_STARS = 5000  # ~35 s of training on one core with 19 labels (quadratic: 210 terms)
CANNON_HOLDOUT_STARS = 1000  # training stars kept out of the fit to measure the errors for whitening
PAYNE_TRAIN_STARS = 5000  # spectra an emulator trained here learns from (~0.3 GB in memory)
PAYNE_TIME_LIMIT = 300.0  # seconds of emulator training
PAYNE_HOLDOUT_STARS = 1000  # labelled stars fitted to measure the errors for whitening
READ_BATCH = 1024
WHITENING_NOTES = {"errors": "pooled covariance of the errors on held-out labelled stars",
                   "formal": "mean formal covariance of the evaluated stars"}


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


def _chemical(names) -> list[int]:
    cols = [k for k, n in enumerate(names) if n in CHEMICAL_LABELS]
    if not cols:
        raise InputError(f"no abundance (FE_H or X_FE) among the fitted labels {', '.join(names)}")
    return cols


def _error_covariance(estimates, truth, names, source) -> tuple[np.ndarray, dict]:
    """Covariance (d, d) of estimate - truth over the stars with a result, and its summary."""
    err = np.asarray(estimates, dtype=np.float64) - truth
    err = err[np.isfinite(err).all(1)]
    if len(err) < 2:
        raise InputError(f"{source}: fewer than 2 held-out stars have a fit; nothing to whiten with")
    cov = np.cov(err, rowvar=False).reshape(len(names), len(names))
    return cov, {"n_stars": int(len(err)), "rmse": dict(zip(names, np.sqrt(np.mean(err**2, 0)).tolist()))}


def _truth(ds, names) -> np.ndarray | None:
    """True labels of the evaluated stars (for reporting the accuracy only), when the dataset has them."""
    if not all(n in ds.label_names for n in names):
        return None
    values = np.asarray(ds.labels(list(names)), dtype=np.float64)
    return values if np.isfinite(values).any() else None


def _accuracy(names, estimates, truth) -> dict | None:
    """RMS and median absolute error per label against the truth (finite rows only)."""
    if truth is None:
        return None
    ok = np.isfinite(estimates).all(1) & np.isfinite(truth).all(1)
    if not ok.any():
        return None
    err = estimates[ok] - truth[ok]
    return {n: {"rmse": float(np.sqrt(np.mean(err[:, k] ** 2))), "median_abs": float(np.median(np.abs(err[:, k])))}
            for k, n in enumerate(names)}


def _over_rows(source, rows, fn, desc: str, progress: bool) -> list:
    """``fn(batch, start)`` for the rows of a dataset (all when ``rows`` is None), READ_BATCH at a
    time; ``start``: the position of the batch's first row among those asked (for error messages)."""
    from tqdm.auto import tqdm

    parts = []
    n = source.n_stars if rows is None else rows.size
    with tqdm(total=n, desc=desc, unit="star", disable=not progress, leave=False) as bar:
        for a in range(0, n, READ_BATCH):
            b = source.read(a, min(a + READ_BATCH, n)) if rows is None else source.take(rows[a : a + READ_BATCH])
            parts.append(fn(b, a))
            bar.update(len(b.flux))
    return parts


def _rank(method, tags, ds, group, metric, model_info, fit_info, *, progress, max_queries, seed, return_ranks):
    summary, ranks = evaluate_tags(tags, group, metric, progress=progress, max_queries=max_queries, seed=seed,
                                   return_ranks=True)
    out = _result(method, summary, dataset_info(ds), model_info, extra={"label_fit": fit_info})
    return (out, ranks) if return_ranks else out


# ---------------------------------------------------------------------- The Cannon
def evaluate_cannon(train, data, metric: str = "l2", *, label_names=None, order: int = 2, whiten: str = "errors",
                    max_train_stars: int = CANNON_TRAIN_STARS, holdout_stars: int = CANNON_HOLDOUT_STARS,
                    n_jobs: int | None = None, seed: int = 0, progress: bool = True, max_queries: int | None = None,
                    return_ranks: bool = False):
    """The Cannon row: trained on ``train``'s true labels, run on ``data``, abundances whitened and ranked.

    ``label_names``: the Cannon's labels (default: :func:`independent_labels` of the
    training set).  Of the training stars, ``holdout_stars`` (at most a fifth) are kept out
    for the whitening and up to ``max_train_stars`` of the rest train the model (a random
    subset from ``seed``; memory ~ 0.12 GB per 1,000 stars with 19 labels).
    """
    from threadpoolctl import threadpool_limits

    from chemtwin.tagging.cannon import Cannon, CannonTestResult

    check_metric(metric)
    if whiten not in WHITENINGS:
        raise InputError(f"whiten must be one of {', '.join(WHITENINGS)}, not {whiten!r}")
    if max_train_stars < 1 or holdout_stars < 0:
        raise InputError("max_train_stars must be positive and holdout_stars >= 0")
    ds, close = _open(data)
    tr, close_tr = _open(train)
    # BLAS's own threads make the Cannon's small stacked matrix operations many times slower
    # (measured: 20x on 2 shared cores); the Cannon runs its own threads with one BLAS thread each
    limits = threadpool_limits(1, user_api="blas")
    try:
        group = _group(ds)
        _require_twins(group, ds.path)
        if tr.n_pixels != ds.n_pixels:
            raise InputError(f"{tr.path} has {tr.n_pixels} pixels but {ds.path} has {ds.n_pixels}")
        all_labels = np.asarray(tr.labels(), dtype=np.float64)
        names = list(label_names) if label_names is not None else independent_labels(tr.label_names, all_labels)
        values = all_labels[:, tr.label_columns(names)]
        chem = _chemical(names)
        rng = np.random.default_rng(seed)
        order_rows = rng.permutation(tr.n_stars)
        n_hold = min(holdout_stars, tr.n_stars // 5) if whiten == "errors" else 0
        if whiten == "errors" and n_hold < 2:
            raise InputError(f"{tr.path}: too few training stars ({tr.n_stars}) to hold some out for the whitening")
        hold_rows = np.sort(order_rows[:n_hold])
        fit_rows = np.sort(order_rows[n_hold : n_hold + max_train_stars])
        batch = tr.take(fit_rows)
        model = Cannon(names, order=order, n_jobs=n_jobs)
        t0 = time.perf_counter()
        model.fit(batch.flux, batch.ivar, values[fit_rows], wavelength=tr.wavelength)
        train_s = time.perf_counter() - t0
        del batch
        log.info("cannon: %d labels, %d terms, trained on %d stars in %.1f s", len(names), model.vectorizer.n_terms,
                 fit_rows.size, train_s)

        def test(source, rows=None, desc="cannon test"):
            parts = _over_rows(source, rows, lambda b, _: model.test(b.flux, b.ivar), desc, progress)
            return CannonTestResult.concatenate(parts, len(names))

        t0 = time.perf_counter()
        result = test(ds)
        test_s = time.perf_counter() - t0
        holdout = None
        if whiten == "errors":
            held = test(tr, hold_rows, "cannon hold-out")
            cov, holdout = _error_covariance(held.labels[:, chem], values[hold_rows][:, chem], [names[k] for k in chem],
                                             str(tr.path))
        else:
            cov = result.cov[:, chem][:, :, chem]
        tags = result.labels[:, chem] @ whitening_matrix(cov).T
        failed = ~np.isfinite(result.labels).all(1)
        fit_info = {
            "labels": names, "abundances": [names[k] for k in chem], "whitening": whiten,
            "whitening_note": WHITENING_NOTES[whiten],
            "n_train": int(fit_rows.size), "holdout": holdout, "train_s": train_s, "test_s": test_s,
            "test_ms_per_star": 1e3 * test_s / max(ds.n_stars, 1), "n_failed": int(failed.sum()),
            "median_formal_error": dict(zip(names, np.nanmedian(result.uncertainties, 0).tolist()))
            if (~failed).any() else None,
            "accuracy": _accuracy(names, result.labels, _truth(ds, names)),
        }
        model_info = {"path": None, "class": "Cannon", "order": model.order, "n_terms": model.vectorizer.n_terms,
                      "label_names": names, "train": dataset_info(tr)}
        return _rank("cannon", tags, ds, group, metric, model_info, fit_info, progress=progress,
                     max_queries=max_queries, seed=seed, return_ranks=return_ranks)
    finally:
        limits.restore_original_limits()
        if close:
            ds.close()
        if close_tr:
            tr.close()


# ---------------------------------------------------------------------- The Payne
def _is_emulator(source) -> bool:
    from chemtwin.spectral_models.payne import PayneEmulator

    if isinstance(source, PayneEmulator):
        return True
    return isinstance(source, (str, os.PathLike)) and Path(source).suffix == ".npz"


def _train_here(source, *, label_names, max_train_stars, holdout_stars, time_limit, hidden, seed, progress):
    """An emulator trained on the first stars of a dataset (time-bounded), and the rows kept
    out of its training for the whitening (the last ``holdout_stars``, at most a fifth)."""
    from chemtwin.tagging.payne_train import train_emulator

    tr, close = _open(source)
    try:
        n_hold = min(holdout_stars, tr.n_stars // 5)
        n = min(tr.n_stars - n_hold, max_train_stars)
        names = list(label_names) if label_names is not None else independent_labels(
            tr.label_names, np.asarray(tr.labels(), dtype=np.float64)[:n])
        path, total = tr.path, tr.n_stars
    finally:
        if close:
            tr.close()
    emulator, report = train_emulator(path, labels=names, hidden=hidden, epochs=None, time_limit=time_limit,
                                      max_stars=n, seed=seed, progress=progress)
    info = {"source": f"trained on {path}", "trained_here": True, "n_train": report.n_train, "epochs": report.epochs,
            "train_s": report.seconds, "val_median_abs_error": report.val_median_abs_error}
    log.info("payne: emulator trained on %d spectra, %d epochs in %.0f s; held-out median |error| %.4f",
             report.n_train, report.epochs, report.seconds, report.val_median_abs_error)
    return emulator, info, np.arange(total - n_hold, total)


def evaluate_payne(emulator_or_train, data, metric: str = "l2", *, whiten: str | None = None, calibration=None,
                   holdout_stars: int = PAYNE_HOLDOUT_STARS, label_names=None,
                   max_train_stars: int = PAYNE_TRAIN_STARS, time_limit: float = PAYNE_TIME_LIMIT, hidden: int = 300,
                   threads: int | None = None, seed: int = 0, progress: bool = True, max_queries: int | None = None,
                   return_ranks: bool = False, **fitter_options):
    """The Payne row: ``data`` fitted with all the emulator's labels free, abundances whitened and ranked.

    ``emulator_or_train``: a ``.npz`` emulator file, a :class:`PayneEmulator`, or a training
    dataset on which an MLP emulator is trained first (``hidden`` neurons, the first
    ``max_train_stars`` spectra, ``time_limit`` seconds; ``label_names`` default:
    :func:`independent_labels`).  ``whiten``: "errors" (the covariance of the fit errors of
    ``holdout_stars`` labelled stars: the training stars the emulator did not see, or a
    random subset of ``calibration``, a labelled dataset like ``data``) or "formal" (the
    mean formal covariance); default "errors" when labelled stars are at hand, else
    "formal".  ``fitter_options`` go to :class:`PayneFitter`.
    """
    from chemtwin.spectral_models.payne import PayneEmulator
    from chemtwin.tagging.payne_fit import FitResult, PayneFitter

    check_metric(metric)
    here = not _is_emulator(emulator_or_train)
    whiten = whiten or ("errors" if here or calibration is not None else "formal")
    if whiten not in WHITENINGS:
        raise InputError(f"whiten must be one of {', '.join(WHITENINGS)}, not {whiten!r}")
    if whiten == "errors" and not here and calibration is None:
        raise InputError("whitening by the fit errors needs labelled stars: give a calibration dataset")
    if max_train_stars < 2 or not time_limit > 0 or holdout_stars < 2:
        raise InputError("max_train_stars and holdout_stars must be at least 2 and time_limit positive")
    ds, close = _open(data)
    try:
        group = _group(ds)
        _require_twins(group, ds.path)
        hold_rows = None
        if here:
            own = whiten == "errors" and calibration is None  # the training stars the emulator does not see
            emulator, emu_info, tail = _train_here(
                emulator_or_train, label_names=label_names, max_train_stars=max_train_stars,
                holdout_stars=holdout_stars if own else 0, time_limit=time_limit, hidden=hidden, seed=seed,
                progress=progress)
            if own:
                calibration, hold_rows = emulator_or_train, tail
        elif isinstance(emulator_or_train, PayneEmulator):
            emulator, emu_info = emulator_or_train, {"source": str(emulator_or_train.source), "trained_here": False}
        else:
            emulator = PayneEmulator.load(emulator_or_train, label_names)
            emu_info = {"source": os.path.abspath(str(emulator_or_train)), "trained_here": False}
        if emulator.n_pixels != ds.n_pixels:
            raise InputError(f"{ds.path}: spectra have {ds.n_pixels} pixels, the emulator {emulator.n_pixels}")
        names = list(emulator.label_names)
        chem = _chemical(names)
        threads = threads or min(2, os.cpu_count() or 1)
        fitter = PayneFitter(emulator, wavelength=ds.wavelength, threads=threads, seed=seed, **fitter_options)

        def fit(source, rows=None, desc="payne fit"):
            parts = _over_rows(source, rows, lambda b, a: fitter.fit(b.flux, b.ivar, row_offset=a), desc, progress)
            return FitResult.concatenate(parts)

        t0 = time.perf_counter()
        result = fit(ds)
        fit_s = time.perf_counter() - t0
        holdout = None
        if whiten == "errors":
            cal, close_cal = _open(calibration)
            try:
                if cal.n_pixels != ds.n_pixels:
                    raise InputError(f"{cal.path} has {cal.n_pixels} pixels but {ds.path} has {ds.n_pixels}")
                truth = np.asarray(cal.labels(names), dtype=np.float64)
                if hold_rows is None:
                    hold_rows = np.sort(np.random.default_rng(seed).permutation(cal.n_stars)[:holdout_stars])
                held = fit(cal, hold_rows, "payne hold-out")
                source = str(cal.path)
            finally:
                if close_cal:
                    cal.close()
            cov, holdout = _error_covariance(held.labels[:, chem], truth[hold_rows][:, chem], [names[k] for k in chem],
                                             source)
        else:
            cov = result.covariance[:, chem][:, :, chem]
        tags = result.labels[:, chem] @ whitening_matrix(cov).T
        failed = ~np.isfinite(result.labels).all(1)
        fit_info = {
            "labels": names, "abundances": [names[k] for k in chem], "whitening": whiten,
            "whitening_note": WHITENING_NOTES[whiten], "holdout": holdout, "emulator": emu_info,
            "fit_s": fit_s, "stars_per_s": ds.n_stars / fit_s if fit_s > 0 else math.nan,
            "n_failed": int(failed.sum()), "n_at_edge": int(result.at_edge.sum()),
            "n_converged": int(result.converged.sum()),
            "median_reduced_chi2": float(np.nanmedian(result.reduced_chi2)) if (~failed).any() else None,
            "median_formal_error": dict(zip(names, np.nanmedian(result.labels_err, 0).tolist()))
            if (~failed).any() else None,
            "accuracy": _accuracy(names, result.labels, _truth(ds, names)),
        }
        model_info = {"path": emu_info["source"], "class": "PayneEmulator", "format": emulator.format,
                      "hidden": emulator.n_hidden, "label_names": names}
        return _rank("payne", tags, ds, group, metric, model_info, fit_info, progress=progress,
                     max_queries=max_queries, seed=seed, return_ranks=return_ranks)
    finally:
        if close:
            ds.close()
