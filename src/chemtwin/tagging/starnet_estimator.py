"""``StarNet``: the StarNet label regressor as a scikit-learn estimator (NumPy or tables in, NumPy out).

>>> sn = StarNet(labels=("TEFF", "LOGG", "FE_H"), epochs=30, augment={"snr": 100}).fit("train.h5")
>>> labels = sn.predict("stars.h5")                           # (N, L) in sn.labels_ order
>>> labels, sigma = sn.predict(flux, ivar, return_std=True)   # NaN rows: no measured pixel
>>> sn.save("model/"); sn = StarNet.load("model/")

The constructor's arguments are the ``StarNetConfig`` fields, stored as given and checked by
``fit``; what ``fit`` learns ends in ``_`` (``net_``, ``labels_``, ``history_``, ``meta_``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator

from chemtwin.core.files import write_json
from chemtwin.data.dataset import BaseDataset, open_dataset
from chemtwin.errors import InputError
from chemtwin.spectral_models.labels import label_table
from chemtwin.tagging import model_folder
from chemtwin.tagging.starnet import StarNetConfig
from chemtwin.tagging.starnet_training import (
    Arrays,
    load_model,
    predict_arrays,
    predict_dataset,
    read_starnet_dir,
    save_model,
    train,
)


class StarNet(BaseEstimator):
    """A 1-D CNN regressing ``labels`` from spectra, with a predictive error per label (docs/starnet.md)."""

    def __init__(self, labels=(), *, filters=(4, 16), kernel=8, pool=4, hidden=(256, 128), standardize_flux=True, lr=7e-4,
                 weight_decay=0.0, batch_size=32, epochs=30, time_limit=None, val_fraction=0.1, seed=0, device="auto",
                 augment=None):
        self.labels, self.filters, self.kernel, self.pool, self.hidden = labels, filters, kernel, pool, hidden
        self.standardize_flux = standardize_flux
        self.lr, self.weight_decay, self.batch_size, self.epochs = lr, weight_decay, batch_size, epochs
        self.time_limit, self.val_fraction, self.seed, self.device, self.augment = (time_limit, val_fraction, seed,
                                                                                    device, augment)

    def fit(self, data, ivar=None, labels=None, *, label_names=None, group=None, wavelength=None, out_dir=None,
            resume=False, overwrite=False, progress=True) -> StarNet:
        """Train on a dataset (path or open dataset) or on arrays ``flux, ivar, labels`` (a table or an
        array with ``label_names``).  ``out_dir`` keeps the model folder (checkpoints, history);
        without it, a temporary folder that is removed afterwards."""
        cfg = StarNetConfig(**self.get_params())
        if isinstance(data, (str, os.PathLike)):
            with open_dataset(data) as ds:
                arrays = Arrays.from_dataset(ds, cfg.labels)
        elif isinstance(data, BaseDataset):
            arrays = Arrays.from_dataset(data, cfg.labels)
        else:
            if labels is None:
                raise InputError("fit(flux, ivar, labels) needs labels for array input", "labels")
            names, values = label_table(labels, label_names)
            missing = [n for n in cfg.labels if n not in names]
            if missing:
                raise InputError(f"the labels lack {', '.join(missing)} (they have {', '.join(names)})", "labels")
            values = values[:, [names.index(n) for n in cfg.labels]]
            arrays = Arrays.checked(data, ivar, values, list(cfg.labels), group, wavelength)
        tmp = None if out_dir is not None else tempfile.mkdtemp(prefix="chemtwin-starnet-")
        try:
            folder = Path(out_dir) if out_dir is not None else Path(tmp) / "model"
            train(arrays, folder, cfg, resume=resume, overwrite=overwrite, progress=progress)
            self._load(folder)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return self

    def _load(self, folder, device="cpu") -> None:
        self.net_, self.meta_, self.wavelength_ = load_model(folder, device)
        self.labels_ = tuple(self.meta_["config"]["labels"])
        self.history_ = model_folder.read_history(folder)
        self.n_features_in_ = self.net_.n_pixels

    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise InputError("this StarNet is not fitted yet: call fit() or StarNet.load() first")

    def predict(self, data, ivar=None, *, return_std: bool = False, progress: bool = False):
        """Labels (N, L) in ``labels_`` order of a dataset (path or open dataset) or of arrays
        ``flux, ivar``; with ``return_std``, also their 1-sigma errors.  NaN: no measured pixel."""
        self._check_fitted()
        if isinstance(data, (str, os.PathLike)):
            with open_dataset(data) as ds:
                mean, sigma = predict_dataset(self.net_, ds, progress=progress)
        elif isinstance(data, BaseDataset):
            mean, sigma = predict_dataset(self.net_, data, progress=progress)
        else:
            if ivar is None:
                raise InputError("predict(flux, ivar) needs ivar for array input", "ivar")
            mean, sigma = predict_arrays(self.net_, np.asarray(data), np.asarray(ivar))
        return (mean, sigma) if return_std else mean

    def save(self, directory) -> Path:
        """The model folder (copied from the fitted one's weights and config)."""
        self._check_fitted()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_model(out, self.net_, self.labels_, self.wavelength_)
        write_json(out / "config.json", self.meta_)
        return out

    @classmethod
    def load(cls, directory, device: str = "cpu") -> StarNet:
        cfg = read_starnet_dir(directory)["config"]
        sn = cls(**{k: v for k, v in StarNetConfig.from_dict(cfg).to_dict().items()})
        sn._load(directory, device)
        return sn
