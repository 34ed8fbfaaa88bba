"""The Cannon's model file, written and read here only.

``.npz`` read with ``allow_pickle=False`` (``FORMAT_NAME`` "chemtwin-cannon", ``FORMAT_VERSION``
1; docs/baselines.md): ``header`` (JSON: format, version, label names, order, term names,
settings), ``theta`` (P, T), ``s2`` (P,), ``pixel_mask`` (P,), ``censors`` (L, P), ``terms``
(T, L) exponents, ``offsets``, ``scales`` (L,), ``wavelength`` (P,) or empty, ``label_names`` (L,).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from chemtwin import __version__
from chemtwin.core.files import atomic_output, prepare_output
from chemtwin.errors import InputError
from chemtwin.tagging.cannon.vectorizer import PolynomialVectorizer

FORMAT_NAME = "chemtwin-cannon"
FORMAT_VERSION = 1
MODEL_ARRAYS = ("theta", "s2", "pixel_mask", "censors", "terms", "offsets", "scales", "wavelength", "label_names")
SETTINGS = ("max_iter", "tol", "fit_scatter", "n_starts", "n_fits", "max_lm_iter", "batch_size", "n_jobs")


def save(model, path, overwrite: bool = True) -> Path:
    """Write ``model`` (a fitted Cannon) to ``path`` (.npz, no pickle), atomically."""
    model._check_fitted()
    path = prepare_output(path, overwrite)
    vec = model.vectorizer
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "chemtwin_version": __version__,
        "label_names": model.label_names,
        "order": model.order,
        "term_names": vec.term_names,
        "n_training_stars": int(getattr(model, "n_training_stars_", 0)),
        "settings": {
            "max_iter": model.max_iter, "tol": model.tol, "fit_scatter": model.fit_scatter,
            "n_starts": model.n_starts, "n_fits": model.n_fits, "max_lm_iter": model.max_lm_iter, "batch_size": model.batch_size,
            "n_jobs": model.n_jobs,
        },
    }
    arrays = {
        "header": np.array(json.dumps(header)),
        "theta": model.theta_,
        "s2": model.s2_,
        "pixel_mask": model.pixel_mask_,
        "censors": model.censors_,
        "terms": vec.terms,
        "offsets": vec.offsets,
        "scales": vec.scales,
        "wavelength": np.zeros(0) if model.wavelength_ is None else model.wavelength_,
        "label_names": np.array(model.label_names, dtype=str),
    }
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def load(cls, path):
    """The model of class ``cls`` (``Cannon``) in the file ``path``; InputError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("header",) + MODEL_ARRAYS if k not in data.files]
            if missing:
                raise InputError(f"{path}: not a chemtwin Cannon model (missing {', '.join(missing)})")
            arrays = {k: data[k] for k in ("header",) + MODEL_ARRAYS}
        header = json.loads(str(arrays["header"]))
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise InputError(f"{path}: not a readable chemtwin Cannon model ({exc.__class__.__name__})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise InputError(f"{path}: not a chemtwin Cannon model")
    if header.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path}: Cannon model format version {header.get('format_version')} is not supported (need {FORMAT_VERSION})")
    try:
        names = [str(n) for n in arrays["label_names"]]
        theta = arrays["theta"].astype(np.float64)
        n_pixels, n_terms = theta.shape
        n_labels = len(names)
        consistent = (
            names == list(header.get("label_names", []))
            and arrays["terms"].shape == (n_terms, n_labels)
            and arrays["s2"].shape == (n_pixels,)
            and arrays["pixel_mask"].shape == (n_pixels,) and arrays["pixel_mask"].dtype == bool
            and arrays["censors"].shape == (n_labels, n_pixels)
            and arrays["offsets"].shape == (n_labels,)
            and arrays["scales"].shape == (n_labels,)
            and arrays["wavelength"].shape in ((0,), (n_pixels,))
            and np.all(np.isfinite(theta)) and np.all(np.isfinite(arrays["s2"])) and np.all(arrays["s2"] >= 0)
            and np.all(np.isfinite(arrays["offsets"])) and np.all(arrays["scales"] > 0)
        )
    except (ValueError, TypeError, AttributeError):
        consistent = False
    if not consistent:
        raise InputError(f"{path}: corrupt chemtwin Cannon model (arrays disagree)")
    settings = header.get("settings", {})
    model = cls(names, int(header.get("order", 2)), **{k: v for k, v in settings.items() if k in SETTINGS})
    model.vectorizer = PolynomialVectorizer(names, terms=arrays["terms"], offsets=arrays["offsets"], scales=arrays["scales"])
    model.order = model.vectorizer.order
    model.theta_ = theta
    model.s2_ = arrays["s2"].astype(np.float64)
    model.pixel_mask_ = arrays["pixel_mask"]
    model.censors_ = arrays["censors"].astype(bool)
    model.wavelength_ = arrays["wavelength"].astype(np.float64) if arrays["wavelength"].size else None
    model.n_training_stars_ = int(header.get("n_training_stars", 0))
    model._gram_cache = None
    return model
