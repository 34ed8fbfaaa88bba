"""StarNet as a method: trained on the training set's true labels, run on the evaluated stars,
abundances whitened by its errors on held-out training stars (``methods.label_fit``, as the
Cannon's and the Payne's rows) and ranked with L2.

Not in a bench's default methods (``in_default_bench``): its training takes minutes where the
quick bench gives a model 15 s; ``chemtwin bench --methods starnet,...`` runs it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from chemtwin.core.whitening import whitening_matrix
from chemtwin.data.dataset import dataset_info, open_dataset
from chemtwin.errors import InputError
from chemtwin.methods import label_fit
from chemtwin.methods.base import Fitted, Inputs, Method, Tags
from chemtwin.tagging.starnet import StarNetConfig
from chemtwin.tagging.starnet_training import Arrays, load_model, predict_dataset, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StarNetLabels(Method):
    """``label_names``: StarNet's labels (default: ``label_fit.independent_labels`` of the
    training set).  Of the training stars, ``holdout_stars`` (at most a fifth) are kept out for
    the whitening and up to ``max_train_stars`` of the rest train the network for ``epochs`` or
    ``time_limit`` seconds, whichever comes first; ``model_dir`` keeps its model folder (default:
    a temporary one)."""

    name: ClassVar[str] = "starnet"
    label: ClassVar[str] = "StarNet"
    needs: ClassVar[dict] = {"train": "labelled stars: its training set"}
    whitened: ClassVar[bool] = True
    learns_labels: ClassVar[bool] = True
    in_default_bench: ClassVar[bool] = False
    label_names: tuple | None = None
    holdout_stars: int = 1000
    max_train_stars: int = 20_000
    epochs: int = 30
    time_limit: float = 300.0
    device: str = "cpu"
    model_dir: str | None = None

    def __post_init__(self):
        if self.holdout_stars < 0:
            raise InputError(f"holdout_stars must be >= 0, got {self.holdout_stars}", "holdout_stars")
        if self.max_train_stars < 2:
            raise InputError(f"max_train_stars must be at least 2, got {self.max_train_stars}", "max_train_stars")

    def fit(self, inputs: Inputs, target=None) -> Fitted:
        if inputs.train is None:
            raise InputError("StarNet needs its training set (train=...)", "train")
        with open_dataset(inputs.train) as tr:
            names, values, chem, abundances, hold_rows, fit_rows = label_fit.training_split(
                tr, self.label_names, inputs.seed, self.holdout_stars, self.max_train_stars, target)
            data = Arrays.from_dataset(tr, names, fit_rows)
            cfg = StarNetConfig(labels=tuple(names), epochs=self.epochs, time_limit=self.time_limit, seed=inputs.seed,
                                device=self.device)
            tmp = tempfile.TemporaryDirectory(prefix="chemtwin-starnet-") if self.model_dir is None else None
            folder = Path(self.model_dir) if tmp is None else Path(tmp.name) / "model"
            t0 = time.perf_counter()
            final = train(data, folder, cfg, overwrite=True, progress=inputs.progress)
            train_s = time.perf_counter() - t0
            n_train = len(data.flux)
            del data
            model, _, _ = load_model(folder)
            if tmp is not None:
                tmp.cleanup()
            log.info("starnet: %d labels, trained on %d stars, %d epochs in %.0f s", len(names), n_train,
                     final.get("epoch", 0), train_s)
            held, _ = predict_dataset(model, tr, rows=hold_rows)
            cov, holdout = label_fit.error_covariance(held[:, chem], values[hold_rows][:, chem], abundances, str(tr.path))
            white = whitening_matrix(cov)
            info = {"path": self.model_dir, "class": "StarNet", "label_names": names, "train": dataset_info(tr),
                    "epochs": final.get("epoch"), "config": cfg.to_dict()}

        def tag(ds, evaluated: bool = True) -> Tags:
            t0 = time.perf_counter()
            labels, sigma = predict_dataset(model, ds, progress=inputs.progress)
            test_s = time.perf_counter() - t0
            failed = ~np.isfinite(labels).all(1)
            fit_info = {
                "labels": names, "abundances": abundances, "whitening": "errors",
                "whitening_note": label_fit.WHITENING_NOTES["errors"], "n_train": n_train,
                "holdout": holdout, "train_s": train_s, "test_s": test_s,
                "test_ms_per_star": 1e3 * test_s / max(ds.n_stars, 1), "n_failed": int(failed.sum()),
                "median_formal_error": dict(zip(names, np.nanmedian(sigma, 0).tolist())) if (~failed).any() else None,
                "accuracy": label_fit.accuracy(names, labels, label_fit.true_labels(ds, names)),
            }
            return Tags(labels[:, chem] @ white.T, extra={"label_fit": fit_info})

        return Fitted(info, tag)
