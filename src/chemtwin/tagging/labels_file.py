"""The labels file: the labels a label-fitting method estimated for every star of a dataset
(``chemtwin cannon test``, ``chemtwin payne fit``), written here only.

Layout (HDF5, ``LAYOUT_VERSION`` 1, attribute ``layout_version``; docs/baselines.md):

* ``labels``      float32 (N, L), attribute ``names``; NaN where no fit could be made
* ``labels_err``  float32 (N, L) formal 1-sigma, attribute ``names``
* ``covariance``  float32 (N, n, n), attribute ``names`` (the labels, then any other fitted
                  parameter: ``RV``)
* per-star columns of the method (``chi2``, ``reduced_chi2``, ``n_pixels``, ``converged``; the
  Payne adds ``n_iter``, ``at_edge``, ``rv``, ``rv_err``), each (N,)
* ``group`` and ``star_id`` copied from the dataset (``chemtwin.data.dataset_writer.write_star_columns``)
* attributes: ``chemtwin_version``, ``layout_version`` and the method's (``method``, ``model``,
  ``data``, ``rows``, ``fit_seconds``, ...)
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np

from chemtwin import __version__
from chemtwin.core.files import atomic_output, check_free_space, new_hdf5
from chemtwin.data.dataset_writer import write_star_columns

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1


def write_labels(path, names, labels, labels_err, covariance, *, columns: dict, covariance_names=None,
                 units: dict | None = None, group=None, star_id=None, attrs=None, overwrite: bool = True) -> Path:
    """Write a labels file atomically: ``names`` (L,), ``labels``/``labels_err`` (N, L),
    ``covariance`` (N, n, n) over ``covariance_names`` (default ``names``), the per-star
    ``columns`` {name: (N,) array} with optional ``units`` {name: unit}, the dataset's ``group``
    and ``star_id`` and the method's ``attrs``; without ``overwrite``, refused if ``path`` appeared meanwhile."""
    check_free_space(path, 4 * (2 * np.size(labels) + np.size(covariance)), f"labels of {len(labels)} stars")
    columns = _flag_unmeasured(labels, labels_err, covariance, columns)
    h5names = np.array(list(names), dtype=h5py.string_dtype())
    with atomic_output(path, overwrite) as tmp, new_hdf5(tmp) as f:
        f.create_dataset("labels", data=_stored(labels)).attrs["names"] = h5names
        f.create_dataset("labels_err", data=_stored(labels_err)).attrs["names"] = h5names
        cov = f.create_dataset("covariance", data=_stored(covariance))
        cov.attrs["names"] = h5names if covariance_names is None else np.array(list(covariance_names),
                                                                             dtype=h5py.string_dtype())
        for name, values in columns.items():
            f[name] = values
            if units and name in units:
                f[name].attrs["unit"] = units[name]
        write_star_columns(f, group, star_id)
        f.attrs["chemtwin_version"] = __version__
        f.attrs["layout_version"] = LAYOUT_VERSION
        f.attrs.update(attrs or {})
    return Path(path)


def _flag_unmeasured(labels, labels_err, covariance, columns: dict) -> dict:
    """``columns`` with ``converged`` False for every star whose labels, errors, covariance or chi2
    are not all finite (an overflowed chi2, a singular covariance), counted in a warning: an
    output is finite or flagged, never silently NaN."""
    n = len(labels)
    finite = np.ones(n, bool)
    for values in (labels, labels_err, covariance, columns.get("chi2"), columns.get("reduced_chi2")):
        if values is not None and n:
            finite &= np.isfinite(_stored(values).reshape(n, -1)).all(1)
    given = np.asarray(columns.get("converged", np.ones(n, bool)), bool)
    if newly := int((given & ~finite).sum()):
        log.warning("%d star(s) with non-finite labels, errors or chi2 flagged converged = False", newly)
    return {**columns, "converged": given & finite}


def _stored(values) -> np.ndarray:
    """``values`` as the file stores them, float32: beyond its range a value is inf (and flagged)."""
    with np.errstate(over="ignore"):
        return np.asarray(values, np.float32)
