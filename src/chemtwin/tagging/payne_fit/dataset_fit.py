"""Fit every spectrum of a chemtwin dataset with a Payne emulator and write the labels file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from chemtwin.core.files import prepare_output
from chemtwin.data.dataset import open_dataset
from chemtwin.errors import InputError
from chemtwin.spectral_models.payne import PayneEmulator
from chemtwin.tagging.labels_file import write_labels
from chemtwin.tagging.payne_fit.fitter import PayneFitter
from chemtwin.tagging.payne_fit.result import FitResult


def fit_dataset(
    emulator: PayneEmulator,
    data_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = True,
    rows: slice | None = None,
    **fitter_kwargs,
) -> tuple[Path, FitResult, float]:
    """Fit every spectrum of a chemtwin dataset and write the labels file (see docs/baselines.md).

    Returns the output path, the result and the wall time of the fitting in seconds.
    """
    out_path = prepare_output(out_path, overwrite)
    with open_dataset(data_path) as ds:
        if ds.n_pixels != emulator.n_pixels:
            raise InputError(f"{ds.path}: spectra have {ds.n_pixels} pixels, the emulator {emulator.n_pixels}")
        fitter = PayneFitter(emulator, wavelength=ds.wavelength, **fitter_kwargs)
        start, stop = (0, ds.n_stars) if rows is None else rows.indices(ds.n_stars)[:2]
        chunk = max(fitter.batch_size, 1024)
        parts = []
        t0 = time.perf_counter()
        with tqdm(total=stop - start, desc="payne fit", unit="star", disable=not progress, leave=False) as bar:
            for batch in ds.iter_batches(chunk, start, stop):
                parts.append(fitter.fit(batch.flux, batch.ivar, progress=bar, row_offset=batch.start))
        seconds = time.perf_counter() - t0
        result = FitResult.concatenate(parts) if parts else fitter.fit(np.zeros((0, ds.n_pixels)))
        group = ds.group[start:stop]
        star_id = ds.star_id
        attrs = {
            "method": "payne",
            "model": str(emulator.source),
            "data": str(ds.path),
            "rows": f"{start}:{stop}",
            "weighting": fitter.weighting,
            "rv_fitted": fitter.rv,
            "n_starts": fitter.n_starts,
            "fit_seconds": seconds,
        }
    columns = {"chi2": result.chi2, "reduced_chi2": result.reduced_chi2, "n_pixels": result.n_pixels,
               "n_iter": result.n_iter, "converged": result.converged, "at_edge": result.at_edge}
    if result.rv is not None:
        columns.update(rv=result.rv, rv_err=result.rv_err)
    write_labels(out_path, result.label_names, result.labels, result.labels_err, result.covariance, columns=columns,
                 covariance_names=result.param_names, units={"rv": "km/s"}, group=group,
                 star_id=None if star_id is None else star_id[start:stop], attrs=attrs, overwrite=overwrite)
    return out_path, result, seconds
