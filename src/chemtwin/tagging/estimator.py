"""``ChemTwin``: the fader model as a scikit-learn estimator (NumPy or tables in, NumPy out).

>>> ct = ChemTwin(latent_dim=20, time_limit=300).fit("train.h5")
>>> z = ct.transform("stars.h5")                     # a dataset: its own TEFF, LOGG condition the latents
>>> z = ct.transform(flux, ivar, cond)               # cond: (N, k) in ct.condition order, or a table
>>> ct.save("model/"); ct = ChemTwin.load("model/")

It follows scikit-learn's rules: the constructor's arguments are the ``FaderConfig`` fields,
stored as given (``get_params``, ``set_params``, ``sklearn.base.clone``) and checked by ``fit``;
what ``fit`` learns ends in ``_`` (``net_``, ``config_``, ``history_``, ...).  Labels may be a
dict of columns, a NumPy structured array, an astropy ``Table`` or a pandas ``DataFrame``
(``chemtwin.spectral_models.labels.label_table``), or an array with ``label_names``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin

from chemtwin.data.dataset import BaseDataset, label_columns, open_dataset
from chemtwin.data.spectra import check_spectra, pixel_weights
from chemtwin.errors import InputError
from chemtwin.spectral_models.labels import is_table, label_table
from chemtwin.tagging import model_folder
from chemtwin.tagging.fader import FaderNet
from chemtwin.tagging.fader_config import FIELD_ORDER, PARTS, FaderConfig
from chemtwin.tagging.model_folder import load_model, read_history
from chemtwin.tagging.training import pick_device, train
from chemtwin.tagging.training_data import ArraySource

log = logging.getLogger(__name__)


def _is_dataset(data) -> bool:
    return isinstance(data, (str, os.PathLike, BaseDataset, ArraySource))


def _as_source(data, ivar=None, labels=None, label_names=None, group=None):
    if isinstance(data, (str, os.PathLike)):
        return open_dataset(data)
    if isinstance(data, (BaseDataset, ArraySource)):
        return data
    if labels is None:
        raise InputError("fit(flux, ivar, labels) needs labels for array input: a table (dict, structured array, "
                         "astropy Table, pandas DataFrame) or an array with label_names", "labels", "label_names")
    label_names, labels = label_table(labels, label_names)
    return ArraySource(data, ivar, labels, label_names, group)


def _defaults() -> dict:
    """Every parameter of ``ChemTwin`` with its default: the ``FaderConfig`` fields in
    ``FIELD_ORDER``; None = the preset's value."""
    field_defaults = {f.name: (None if f.default is dataclasses.MISSING else f.default)
                      for cls in PARTS.values() for f in dataclasses.fields(cls)}
    return {name: {"model": "fader", "preset": "fast"}.get(name, field_defaults.get(name)) for name in FIELD_ORDER}


_PARAMS = _defaults()


class ChemTwin(TransformerMixin, BaseEstimator):
    """Fader-style disentangling autoencoder; ``ChemTwin(**FaderConfig fields)`` (keyword only).

    ``model`` ("fader" | "cae") and ``preset`` ("fast" | "paper") choose the model; every other
    parameter left None takes the preset's value (docs/model.md)."""

    def __init__(self, **params):
        unknown = sorted(set(params) - set(_PARAMS))
        if unknown:
            raise TypeError(f"ChemTwin got unknown parameter(s) {', '.join(unknown)}")
        for name, default in _PARAMS.items():
            setattr(self, name, params.get(name, default))

    # the parameters scikit-learn (get_params, clone, repr) and help() see
    __init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default) for name, default in _PARAMS.items()])

    @property
    def config(self) -> FaderConfig:
        """The fitted model's configuration (``config_``); before ``fit``, the parameters' (checked)."""
        fitted = getattr(self, "config_", None)
        return fitted if fitted is not None else FaderConfig(**self.get_params())

    @property
    def condition_(self) -> tuple:
        """The conditioned labels, in the order of ``cond`` columns."""
        return self.config.net.condition

    # the names before scikit-learn's conventions, for code that reads a fitted model
    meta = property(lambda self: getattr(self, "meta_", {}))
    history = property(lambda self: getattr(self, "history_", []))
    wavelength = property(lambda self: getattr(self, "wavelength_", None))

    def _fitted(self, net: FaderNet, meta: dict, wavelength, history: list, config: FaderConfig) -> None:
        self.net_, self.meta_, self.wavelength_, self.history_, self.config_ = net, meta, wavelength, history, config
        self.n_features_in_ = net.n_pixels

    def _device(self) -> torch.device:
        return next(self.net_.parameters()).device

    def fit(self, data, ivar=None, labels=None, *, label_names=None, group=None, val_data=None,
            out_dir=None, resume=False, overwrite=False, progress=True) -> "ChemTwin":
        """Train on a dataset (path or ``SpectraDataset``, streamed when large) or on arrays
        ``flux, ivar, labels``: labels as a table (dict, structured array, astropy Table, pandas
        DataFrame; ``label_names`` picks columns) or an array with ``label_names``; ``group`` for
        the validation split by group.  ``out_dir`` keeps the checkpoints and history; without it
        they go to a temporary folder."""
        config = FaderConfig(**self.get_params())
        source = _as_source(data, ivar, labels, label_names, group)
        val = _as_source(val_data) if val_data is not None else None
        with tempfile.TemporaryDirectory(prefix="chemtwin-") as tmp:
            target = Path(out_dir) if out_dir is not None else Path(tmp) / "model"
            train(source, target, config, val_source=val, resume=resume, overwrite=overwrite, progress=progress)
            net, meta, wavelength = load_model(target, pick_device(config.run.device))
            self._fitted(net, meta, wavelength, read_history(target), config)
        return self

    def fit_transform(self, data, ivar=None, labels=None, **fit_params) -> np.ndarray:
        """``fit(data, ivar, labels, ...)`` then the latents of the same stars: ``transform(data)``
        for a dataset, else ``transform(flux, ivar, cond)`` with the condition columns of ``labels``."""
        self.fit(data, ivar, labels, **fit_params)
        if _is_dataset(data):
            return self.transform(data)
        names, values = label_table(labels, fit_params.get("label_names"))
        cond = {name: values[:, k] for k, name in enumerate(names)}
        return self.transform(data, ivar, cond)

    # ---------------------------------------------------------------- inference
    def _check(self):
        if getattr(self, "net_", None) is None:
            raise InputError("this ChemTwin is not fitted; call fit() or ChemTwin.load()")

    def _cond(self, cond, n) -> np.ndarray:
        condition = self.condition_
        if cond is None:
            raise InputError(f"cond is missing: the latents are conditioned on {','.join(condition)}; pass "
                             f"cond= an ({n}, {len(condition)}) array in that order or a table with those columns "
                             "(dict, astropy Table, pandas DataFrame), or transform a dataset file instead", "cond")
        if is_table(cond):
            cond = label_table(cond, condition, what="cond")[1]
        cond = np.asarray(cond, dtype=np.float32).reshape(n, -1) if n else np.zeros((0, len(condition)), np.float32)
        if cond.shape != (n, len(condition)):
            raise InputError(f"cond must be ({n}, {len(condition)}) for labels {','.join(condition)}, got {cond.shape}")
        bad = ~np.isfinite(cond).all(axis=1)
        if bad.any():
            raise InputError(f"{','.join(condition)} not finite for {int(bad.sum())} star(s) (first: row "
                             f"{int(np.flatnonzero(bad)[0])}); a conditioning label must be known for every star")
        return cond

    def _inputs(self, flux, ivar):
        flux = np.atleast_2d(np.asarray(flux, dtype=np.float32))
        ivar = np.ones_like(flux) if ivar is None else np.atleast_2d(np.asarray(ivar, dtype=np.float32))
        if flux.ndim != 2 or flux.shape[1] != self.net_.n_pixels:
            raise InputError(f"flux must be (stars, {self.net_.n_pixels}) for this model, got {flux.shape}")
        ok = check_spectra(flux, ivar)
        return flux, ivar, ok

    @torch.no_grad()
    def _run(self, flux, ivar, cond, batch_size, fn, width) -> np.ndarray:
        flux, ivar, ok = self._inputs(flux, ivar)
        cond = self._cond(cond, len(flux))
        out = np.full((len(flux), width), np.nan, np.float32)
        if (~ok).any():
            log.warning("%d rows have ivar all zero: their output is NaN", int((~ok).sum()))
        dev = self._device()
        for a in range(0, len(flux), batch_size):
            sel = np.flatnonzero(ok[a : a + batch_size]) + a
            if sel.size:
                x = torch.from_numpy(np.nan_to_num(flux[sel])).to(dev)
                w = torch.from_numpy(pixel_weights(ivar[sel])).to(dev)
                u = torch.from_numpy(cond[sel]).to(dev)
                out[sel] = fn(x, w, u).cpu().numpy()
        return out

    def transform(self, flux, ivar=None, cond=None, batch_size: int = 1024) -> np.ndarray:
        """Latents z (N, latent_dim) float32 of spectra ``flux, ivar`` (N, P) at their conditioned
        labels ``cond`` (an (N, k) array in ``condition_`` order, or a table with those columns);
        ``flux`` may also be a dataset (path or ``SpectraDataset``), which carries its own labels.
        Rows whose ivar is all zero give NaN."""
        self._check()
        if _is_dataset(flux):
            if ivar is not None or cond is not None:
                raise InputError("transform(dataset) takes ivar and cond from the dataset; pass neither", "ivar", "cond")
            return self.embed_dataset(flux, batch_size)
        return self._run(flux, ivar, cond, batch_size, self.net_.encode, self.config.net.latent_dim)

    def reconstruct(self, flux, ivar=None, cond=None, batch_size: int = 1024) -> np.ndarray:
        """D(E(x, u), u): the model's rebuild of each spectrum (N, P)."""
        self._check()
        fn = lambda x, w, u: self.net_.decode(self.net_.encode(x, w, u), u)  # noqa: E731
        return self._run(flux, ivar, cond, batch_size, fn, self.net_.n_pixels)

    @torch.no_grad()
    def swap(self, z, cond, batch_size: int = 1024) -> np.ndarray:
        """D(z, u): the spectrum of chemistry ``z`` at the conditioned labels ``cond`` (N, P)."""
        self._check()
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        if z.shape[1:] != (self.config.net.latent_dim,) or not np.isfinite(z).all():
            raise InputError(f"z must be finite with shape (N, {self.config.net.latent_dim}), got {z.shape}")
        cond = self._cond(cond, len(z))
        parts = [self.net_.decode(torch.from_numpy(z[a : a + batch_size]).to(self._device()),
                                   torch.from_numpy(cond[a : a + batch_size]).to(self._device())).cpu().numpy()
                 for a in range(0, len(z), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.net_.n_pixels), np.float32)

    def iter_embed(self, ds, batch_size: int = 1024) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Stream ``(start, z, usable)`` over a dataset; z is NaN where ``usable`` is False."""
        self._check()
        ds = _as_source(ds)
        if ds.n_pixels != self.net_.n_pixels:
            raise InputError(f"{ds.path}: {ds.n_pixels} pixels, but the model was trained on {self.net_.n_pixels}")
        wl = getattr(ds, "wavelength", None)
        if self.wavelength is not None and wl is not None and not np.allclose(wl, self.wavelength, rtol=1e-7):
            log.warning("%s: wavelength grid differs from the training data's", ds.path)
        columns = label_columns(ds, self.condition_, "condition label")
        for a in range(0, ds.n_stars, batch_size):
            b = ds.read(a, min(a + batch_size, ds.n_stars))
            ok = check_spectra(np.asarray(b.flux), np.asarray(b.ivar), a, str(ds.path))
            cond = b.labels[:, columns]
            bad = ok & ~np.isfinite(cond).all(1)
            if bad.any():
                raise InputError(f"{ds.path}: row {a + int(np.flatnonzero(bad)[0])} has a non-finite condition label")
            z = np.full((len(ok), self.config.net.latent_dim), np.nan, np.float32)
            if ok.any():
                z[ok] = self.transform(b.flux[ok], b.ivar[ok], cond[ok], batch_size)
            yield a, z, ok

    def embed_dataset(self, ds, batch_size: int = 1024) -> np.ndarray:
        """Latents of every star of a dataset (path or ``SpectraDataset``), read in batches."""
        parts = [z for _, z, _ in self.iter_embed(ds, batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.config.net.latent_dim), np.float32)

    # ---------------------------------------------------------------- persistence
    def save(self, directory) -> Path:
        """Write config.json + model.safetensors (+ history.csv) to ``directory``."""
        self._check()
        meta = {**self.meta, "config": self.config.to_dict(), "n_pixels": self.net_.n_pixels}
        return model_folder.save(directory, self.net_, meta, self.wavelength, self.history)

    @classmethod
    def load(cls, directory, device: str = "cpu") -> "ChemTwin":
        """A trained model from a model directory (InputError if it is not one)."""
        net, meta, wavelength = load_model(directory, pick_device(device))
        config = FaderConfig(**{**FaderConfig.from_dict(meta["config"]).to_dict(), "device": device})
        self = cls(**config.to_dict())
        self._fitted(net, meta, wavelength, read_history(directory), config)
        return self
