"""``ChemTwin``: the fader model behind a scikit-learn style API (NumPy in, NumPy out).

>>> ct = ChemTwin(latent_dim=20, time_limit=300).fit("train.h5")
>>> z = ct.transform(flux, ivar, cond)            # cond: (N, k) in ct.condition order, or a dict
>>> ct.save("model/"); ct = ChemTwin.load("model/")
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from chemtwin.data.dataset import BaseDataset, label_columns, open_dataset
from chemtwin.data.spectra import check_spectra, pixel_weights
from chemtwin.errors import InputError
from chemtwin.tagging import model_folder
from chemtwin.tagging.fader import FaderNet
from chemtwin.tagging.fader_config import FaderConfig
from chemtwin.tagging.model_folder import load_model, read_history
from chemtwin.tagging.training import pick_device, train
from chemtwin.tagging.training_data import ArraySource

log = logging.getLogger(__name__)


def _as_source(data, ivar=None, labels=None, label_names=None, group=None):
    if isinstance(data, (str, os.PathLike)):
        return open_dataset(data)
    if isinstance(data, (BaseDataset, ArraySource)):
        return data
    if labels is None:
        raise InputError("fit(flux, ivar, labels, label_names=...) needs labels for array input")
    if isinstance(labels, dict):
        label_names, labels = list(labels), np.column_stack([np.asarray(v, float) for v in labels.values()])
    if label_names is None:
        raise InputError("give label_names for an array of labels (or pass labels as a dict)")
    return ArraySource(data, ivar, labels, label_names, group)


class ChemTwin:
    """Fader-style disentangling autoencoder; ``ChemTwin(**FaderConfig fields)``."""

    def __init__(self, **config):
        self.config = FaderConfig(**config)
        self.model: FaderNet | None = None
        self.meta: dict = {}
        self.history: list[dict] = []
        self.wavelength = None

    @property
    def condition(self) -> tuple:
        return self.config.net.condition

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fit(self, data, ivar=None, labels=None, *, label_names=None, group=None, val_data=None,
            out_dir=None, resume=False, overwrite=False, progress=True) -> "ChemTwin":
        """Train on a dataset (path or ``SpectraDataset``, streamed when large) or on arrays
        ``flux, ivar, labels`` (+ ``label_names``; ``group`` for the validation split by group).
        ``out_dir`` keeps the checkpoints and history; without it they go to a temporary folder."""
        source = _as_source(data, ivar, labels, label_names, group)
        val = _as_source(val_data) if val_data is not None else None
        with tempfile.TemporaryDirectory(prefix="chemtwin-") as tmp:
            target = Path(out_dir) if out_dir is not None else Path(tmp) / "model"
            train(source, target, self.config, val_source=val, resume=resume, overwrite=overwrite, progress=progress)
            self.model, self.meta, self.wavelength = load_model(target, pick_device(self.config.run.device))
            self.history = read_history(target)
        return self

    # ---------------------------------------------------------------- inference
    def _check(self):
        if self.model is None:
            raise InputError("this ChemTwin is not fitted; call fit() or ChemTwin.load()")

    def _cond(self, cond, n) -> np.ndarray:
        if isinstance(cond, dict):
            missing = [c for c in self.condition if c not in cond]
            if missing:
                raise InputError(f"cond lacks label(s) {', '.join(missing)}; the model is conditioned on {','.join(self.condition)}")
            cond = np.column_stack([np.asarray(cond[c], float) for c in self.condition])
        cond = np.asarray(cond, dtype=np.float32).reshape(n, -1) if n else np.zeros((0, len(self.condition)), np.float32)
        if cond.shape != (n, len(self.condition)):
            raise InputError(f"cond must be ({n}, {len(self.condition)}) for labels {','.join(self.condition)}, got {cond.shape}")
        bad = ~np.isfinite(cond).all(axis=1)
        if bad.any():
            raise InputError(f"{','.join(self.condition)} not finite for {int(bad.sum())} star(s) (first: row "
                             f"{int(np.flatnonzero(bad)[0])}); a conditioning label must be known for every star")
        return cond

    def _inputs(self, flux, ivar):
        flux = np.atleast_2d(np.asarray(flux, dtype=np.float32))
        ivar = np.ones_like(flux) if ivar is None else np.atleast_2d(np.asarray(ivar, dtype=np.float32))
        if flux.ndim != 2 or flux.shape[1] != self.model.n_pixels:
            raise InputError(f"flux must be (stars, {self.model.n_pixels}) for this model, got {flux.shape}")
        ok = check_spectra(flux, ivar)
        return flux, ivar, ok

    @torch.no_grad()
    def _run(self, flux, ivar, cond, batch_size, fn, width) -> np.ndarray:
        flux, ivar, ok = self._inputs(flux, ivar)
        cond = self._cond(cond, len(flux))
        out = np.full((len(flux), width), np.nan, np.float32)
        if (~ok).any():
            log.warning("%d rows have ivar all zero: their output is NaN", int((~ok).sum()))
        dev = self.device
        for a in range(0, len(flux), batch_size):
            sel = np.flatnonzero(ok[a : a + batch_size]) + a
            if sel.size:
                x = torch.from_numpy(np.nan_to_num(flux[sel])).to(dev)
                w = torch.from_numpy(pixel_weights(ivar[sel])).to(dev)
                u = torch.from_numpy(cond[sel]).to(dev)
                out[sel] = fn(x, w, u).cpu().numpy()
        return out

    def transform(self, flux, ivar=None, cond=None, batch_size: int = 1024) -> np.ndarray:
        """Latents z (N, latent_dim) float32; rows whose ivar is all zero give NaN."""
        self._check()
        return self._run(flux, ivar, cond, batch_size, self.model.encode, self.config.net.latent_dim)

    def reconstruct(self, flux, ivar=None, cond=None, batch_size: int = 1024) -> np.ndarray:
        """D(E(x, u), u): the model's rebuild of each spectrum (N, P)."""
        self._check()
        fn = lambda x, w, u: self.model.decode(self.model.encode(x, w, u), u)  # noqa: E731
        return self._run(flux, ivar, cond, batch_size, fn, self.model.n_pixels)

    @torch.no_grad()
    def swap(self, z, cond, batch_size: int = 1024) -> np.ndarray:
        """D(z, u): the spectrum of chemistry ``z`` at the conditioned labels ``cond`` (N, P)."""
        self._check()
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        if z.shape[1:] != (self.config.net.latent_dim,) or not np.isfinite(z).all():
            raise InputError(f"z must be finite with shape (N, {self.config.net.latent_dim}), got {z.shape}")
        cond = self._cond(cond, len(z))
        parts = [self.model.decode(torch.from_numpy(z[a : a + batch_size]).to(self.device),
                                   torch.from_numpy(cond[a : a + batch_size]).to(self.device)).cpu().numpy()
                 for a in range(0, len(z), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.model.n_pixels), np.float32)

    def iter_embed(self, ds, batch_size: int = 1024) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Stream ``(start, z, usable)`` over a dataset; z is NaN where ``usable`` is False."""
        self._check()
        ds = _as_source(ds)
        if ds.n_pixels != self.model.n_pixels:
            raise InputError(f"{ds.path}: {ds.n_pixels} pixels, but the model was trained on {self.model.n_pixels}")
        wl = getattr(ds, "wavelength", None)
        if self.wavelength is not None and wl is not None and not np.allclose(wl, self.wavelength, rtol=1e-7):
            log.warning("%s: wavelength grid differs from the training data's", ds.path)
        columns = label_columns(ds, self.condition, "condition label")
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
        meta = {**self.meta, "config": self.config.to_dict(), "n_pixels": self.model.n_pixels}
        return model_folder.save(directory, self.model, meta, self.wavelength, self.history)

    @classmethod
    def load(cls, directory, device: str = "cpu") -> "ChemTwin":
        """A trained model from a model directory (InputError if it is not one)."""
        model, meta, wavelength = load_model(directory, pick_device(device))
        self = cls(**{**FaderConfig.from_dict(meta["config"]).to_dict(), "device": device})
        self.model, self.meta, self.wavelength = model, meta, wavelength
        self.history = read_history(directory)
        return self
