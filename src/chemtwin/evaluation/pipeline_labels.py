"""Pipeline labels: what a survey's catalogue says about its stars, for the bench's survey protocol.

A survey's label-trained methods (The Cannon, StarNet) learn from catalogue labels, and those
carry the catalogue pipeline's model mismatch.  Here the pipeline is The Payne with an emulator of
another code than the one that made the spectra: it fits every star of a training set, all
labels free, and the fitted values replace the set's labels, except TEFF and LOGG, which stay
as the set gives them (already with survey errors: a catalogue's TEFF/LOGG are calibrated
to photometry and asteroseismology, not the pipeline's raw fit).  Stars whose fit failed are left
out; a fit that ended on the edge of the emulator's label box keeps its edge value, as a
catalogue reports grid-edge values with a flag rather than dropping the star.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from chemtwin.data.dataset import open_dataset

from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.errors import InputError
from chemtwin.methods.label_fit import READ_BATCH
from chemtwin.spectral_models.payne import PayneEmulator
from chemtwin.tagging.payne_fit import PayneFitter

log = logging.getLogger(__name__)

KEPT = ("TEFF", "LOGG")  # the catalogue's own, calibrated values (chemtwin.data.label_errors)


def write_pipeline_labels(train, emulator, out, n_stars: int, *, seed: int = 0, threads: int | None = None,
                          progress: bool = True) -> Path:
    """The first ``n_stars`` stars of the dataset ``train`` with the labels the Payne
    ``emulator`` (a path or a PayneEmulator) fits to them, written to ``out``; ``true_labels``
    keep the truth for scoring."""
    if not isinstance(emulator, PayneEmulator):
        emulator = PayneEmulator.load(emulator)
    with open_dataset(train) as tr:
        replaced = [n for n in emulator.label_names if n not in KEPT]
        missing = [n for n in replaced if n not in tr.label_names]
        if missing:
            raise InputError(f"{tr.path} has no label {', '.join(missing)} that the emulator fits")
        if emulator.n_pixels != tr.n_pixels:
            raise InputError(f"{tr.path}: spectra have {tr.n_pixels} pixels, the emulator {emulator.n_pixels}")
        fitter = PayneFitter(emulator, wavelength=tr.wavelength, threads=threads or min(2, os.cpu_count() or 1),
                             seed=seed)
        columns = tr.label_columns(replaced)
        fitted = [emulator.label_names.index(n) for n in replaced]
        n = min(n_stars, tr.n_stars)
        kept, truth = 0, tr.true_labels()[:n]
        attrs = dict(tr.attrs, pipeline_emulator=str(emulator.source), pipeline_rows=n)
        with DatasetWriter(out, tr.wavelength, tr.label_names, attrs=attrs, overwrite=True, expected_rows=n,
                           with_true_labels=True) as writer, \
                tqdm(total=n, desc="pipeline labels", unit="star", disable=not progress, leave=False) as bar:
            for a in range(0, n, READ_BATCH):
                b = tr.read(a, min(a + READ_BATCH, n))
                result = fitter.fit(b.flux, b.ivar, row_offset=a)
                labels = b.labels.copy()
                labels[:, columns] = result.labels[:, fitted]
                ok = np.isfinite(labels).all(1)
                writer.append(b.flux[ok], b.ivar[ok], labels[ok], b.group[ok], true_labels=truth[a : a + len(ok)][ok])
                kept += int(ok.sum())
                bar.update(len(labels))
    if kept < 10:
        Path(out).unlink(missing_ok=True)
        raise InputError(f"the pipeline fitted only {kept} of {n} stars of {train}; too few to train on")
    log.info("pipeline labels: %d of %d training stars fitted (%s)", kept, n, out)
    return Path(out)
