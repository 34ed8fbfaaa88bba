"""The trained disentangling models: their latents are the tags.

``fader`` and ``cae`` (the same network without the adversary) name the model a bench trains;
``model`` takes any trained model folder (``chemtwin evaluate MODEL_DIR DATA.h5``).  Besides
the ranks, a model with a decoder is scored on spectra (``spectral_errors``), averaged over
each star's unmasked pixels (ivar > 0), then over stars:

* ``mse_reconstruction``   (D(E(x_i, u_i), u_i) - x_i)^2
* ``mse_swapped``          (D(E(x_i, u_i), u_j) - x_j)^2 over every ordered twin pair (i, j)

and its latents' leakage of the conditioned labels is measured (``condition_r2``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from tqdm.auto import tqdm

from chemtwin.core.ranks import twin_pairs
from chemtwin.data.dataset import label_columns
from chemtwin.data.spectra import check_spectra
from chemtwin.errors import InputError
from chemtwin.methods.base import Fitted, Inputs, Method, Tags
from chemtwin.tagging.estimator import ChemTwin


def _pixel_mse(pred, flux, ivar) -> np.ndarray:
    """Per-star mean squared error over pixels with ivar > 0 (NaN when there are none)."""
    good = ivar > 0
    err = np.where(good, (np.asarray(pred, np.float64) - np.nan_to_num(flux.astype(np.float64))) ** 2, 0.0)
    n = good.sum(axis=1)
    return np.where(n > 0, err.sum(axis=1) / np.maximum(n, 1), np.nan)


def spectral_errors(model, ds, batch_size: int = 1024, progress: bool = True) -> dict:
    """Latents and spectral errors of a ChemTwin-like model (``condition``, ``transform``,
    ``swap``) over an open dataset, streamed in two passes.

    Returns ``{"z": (N, d) with NaN rows for unusable stars, "ok": (N,) bool,
    "mse_reconstruction", "mse_swapped", "n_swapped_pairs"}``.
    """
    cols = label_columns(ds, tuple(model.condition), "condition label")
    group = np.asarray(ds.group, np.int64)
    n = ds.n_stars
    z = None
    ok = np.zeros(n, bool)
    rec = np.full(n, np.nan)
    nb = -(-n // batch_size)
    # pass 1: encode, reconstruct
    for a in tqdm(range(0, n, batch_size), total=nb, desc="reconstruct", disable=not progress, leave=False):
        b = ds.read(a, min(a + batch_size, n))
        flux, ivar = np.asarray(b.flux, np.float32), np.asarray(b.ivar, np.float32)
        good = check_spectra(flux, ivar, a, str(ds.path))
        cond = np.asarray(b.labels, np.float32)[:, cols]
        bad = good & ~np.isfinite(cond).all(axis=1)
        if bad.any():
            raise InputError(f"{ds.path}: row {a + int(np.flatnonzero(bad)[0])} has a non-finite condition label")
        if not good.any():
            continue
        zb = np.asarray(model.transform(flux[good], ivar[good], cond[good]), np.float32)
        if z is None:
            z = np.full((n, zb.shape[1]), np.nan, np.float32)
        rows = a + np.flatnonzero(good)
        z[rows] = zb
        fin = np.isfinite(zb).all(axis=1)
        ok[rows[fin]] = True
        if fin.any():
            pred = model.swap(zb[fin], cond[good][fin])
            rec[rows[fin]] = _pixel_mse(pred, flux[good][fin], ivar[good][fin])
    if z is None:
        raise InputError(f"{ds.path}: no usable spectra (ivar is zero everywhere)")
    # pass 2: swapped latents, targets j read in order
    qi, tj = twin_pairs(group)
    keep = ok[qi] & ok[tj]
    qi, tj = qi[keep], tj[keep]
    order = np.argsort(tj, kind="stable")
    qi, tj = qi[order], tj[order]
    swapped_sum, swapped_n = 0.0, 0
    bounds = np.searchsorted(tj, np.arange(0, n + batch_size, batch_size))
    for k, a in enumerate(tqdm(range(0, n, batch_size), total=nb, desc="swapped", disable=not progress, leave=False)):
        lo, hi = bounds[k], bounds[k + 1]
        if lo == hi:
            continue
        b = ds.read(a, min(a + batch_size, n))
        flux, ivar = np.asarray(b.flux, np.float32), np.asarray(b.ivar, np.float32)
        cond = np.asarray(b.labels, np.float32)[:, cols]
        for c in range(lo, hi, batch_size):
            src, dst = qi[c : min(c + batch_size, hi)], tj[c : min(c + batch_size, hi)] - a
            pred = model.swap(z[src], cond[dst])
            e = _pixel_mse(pred, flux[dst], ivar[dst])
            e = e[np.isfinite(e)]
            swapped_sum += float(e.sum())
            swapped_n += int(e.size)
    mse_rec = float(np.nanmean(rec[ok])) if ok.any() else None
    return {"z": z, "ok": ok, "mse_reconstruction": mse_rec,
            "mse_swapped": swapped_sum / swapped_n if swapped_n else None, "n_swapped_pairs": swapped_n}


def model_info(model: ChemTwin, path=None) -> dict:
    """The result's "model" entry of a trained model."""
    cfg = model.config
    return {"path": os.path.abspath(str(path)) if path is not None else None, "class": type(model).__name__,
            "condition": list(model.condition), "model": cfg.model, "preset": cfg.preset,
            "latent_dim": cfg.net.latent_dim, "lambda_adv": cfg.optim.lambda_adv, "seed": cfg.run.seed}


@dataclass(frozen=True)
class TrainedModel(Method):
    """Any trained model folder (or a fitted ``ChemTwin``): its latents, ranked with L1."""

    name: ClassVar[str] = "model"
    label: ClassVar[str] = "model"
    needs: ClassVar[dict] = {"model": "a trained model folder"}
    wrappable: ClassVar[bool] = True
    batch_size: int = 1024
    device: str = "cpu"

    @property
    def result_name(self) -> str:
        return "model"

    def fit(self, inputs: Inputs, target=None) -> Fitted:
        path = None
        model = inputs.model
        if not isinstance(model, ChemTwin):
            path, model = model, ChemTwin.load(model, device=self.device)

        def tag(ds, evaluated: bool = True) -> Tags:
            if not evaluated:
                return Tags(model.embed_dataset(ds, self.batch_size))
            err = spectral_errors(model, ds, batch_size=self.batch_size, progress=inputs.progress)
            return Tags(err["z"], err["mse_reconstruction"], err["mse_swapped"],
                        {"n_swapped_pairs": err["n_swapped_pairs"]})

        return Fitted(model_info(model, path), tag, tuple(model.condition), model)


@dataclass(frozen=True)
class Fader(TrainedModel):
    name: ClassVar[str] = "fader"
    label: ClassVar[str] = "fader (chemtwin)"
    needs: ClassVar[dict] = {"model": "the fader model trained on the training set"}
    model_kind: ClassVar[str] = "fader"
    published: ClassVar[dict] = {
        float("inf"): [("FaderDis 2021", (99.0, 99.8, 99.9)), ("fader 2019", (60.7, 82.3, 93.7))],
        100.0: [("FaderDis 2021", (96.7, 99.7, 99.9))],
        50.0: [("FaderDis 2021", (64.4, 92.7, 98.9))],
        30.0: [("FaderDis 2021", (19.3, 55.0, 82.3))],
    }


@dataclass(frozen=True)
class Cae(TrainedModel):
    name: ClassVar[str] = "cae"
    label: ClassVar[str] = "cae (no adversary)"
    needs: ClassVar[dict] = {"model": "the cae model (no adversary) trained on the training set"}
    model_kind: ClassVar[str] = "cae"
    published: ClassVar[dict] = {float("inf"): [("CAE 2019", (8.1, 14.4, 24.8))]}
