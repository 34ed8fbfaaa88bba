"""The labels file: the labels a label-fitting method estimated for every star of a dataset
(``chemtwin cannon test``, ``chemtwin payne fit``), written here only.

Layout (HDF5, ``LAYOUT_VERSION`` 1, attribute ``layout_version``; docs/baselines.md):

* ``labels``      float32 (N, L), attribute ``names``; NaN where no fit could be made
* ``labels_err``  float32 (N, L) formal 1-sigma, attribute ``names``
* ``covariance``  float32 (N, n, n), attribute ``names`` (the labels, then any other fitted
                  parameter: ``RV``)
* per-star columns of the method (``chi2``, ``reduced_chi2``, ``n_pixels``, ``converged``; the
  Payne adds ``n_iter``, ``at_edge``, ``rv``, ``rv_err``), each (N,)
* ``group`` and ``star_id`` copied from the dataset (``chemtwin.data.dataset.write_star_columns``)
* attributes: ``chemtwin_version``, ``layout_version`` and the method's (``method``, ``model``,
  ``data``, ``rows``, ``fit_seconds``, ...)
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from chemtwin import __version__
from chemtwin.core.files import atomic_output
from chemtwin.data.dataset import write_star_columns

LAYOUT_VERSION = 1


def write_labels(path, names, labels, labels_err, covariance, *, columns: dict, covariance_names=None,
                 units: dict | None = None, group=None, star_id=None, attrs=None) -> Path:
    """Write a labels file atomically: ``names`` (L,), ``labels``/``labels_err`` (N, L),
    ``covariance`` (N, n, n) over ``covariance_names`` (default ``names``), the per-star
    ``columns`` {name: (N,) array} with optional ``units`` {name: unit}, the dataset's ``group``
    and ``star_id`` and the method's ``attrs``."""
    h5names = np.array(list(names), dtype=h5py.string_dtype())
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("labels", data=np.asarray(labels, np.float32)).attrs["names"] = h5names
        f.create_dataset("labels_err", data=np.asarray(labels_err, np.float32)).attrs["names"] = h5names
        cov = f.create_dataset("covariance", data=np.asarray(covariance, np.float32))
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
