"""Polynomial residuals (Price-Jones & Bovy 2019): what the non-chemical labels do not explain
of each spectrum, compressed by PCA (``chemtwin.tagging.polyres``), fitted on the training set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from chemtwin.data.dataset import dataset_info, open_dataset
from chemtwin.errors import InputError
from chemtwin.methods.base import Fitted, Inputs, Method, Tags
from chemtwin.tagging.polyres import PolyResiduals


@dataclass(frozen=True)
class Polyres(Method):
    name: ClassVar[str] = "polyres"
    label: ClassVar[str] = "polynomial residuals"
    needs: ClassVar[dict] = {"train": "to fit the polynomials and the PCA"}
    wrappable: ClassVar[bool] = True
    published: ClassVar[dict] = {float("inf"): [("polyres 2021", (52.1, 69.2, 80.2))],
                                 100.0: [("polyres 2021", (37.7, 61.8, 76.7))],
                                 50.0: [("polyres 2021", (11.4, 35.1, 60.6))],
                                 30.0: [("polyres 2021", (1.8, 10.9, 30.1))]}
    degree: int = 4
    n_components: int = 50
    condition: tuple = ("TEFF", "LOGG")

    def __post_init__(self):
        if not self.condition:
            raise InputError("condition needs at least one label", "condition")
        if self.degree < 0:
            raise InputError(f"degree must be >= 0, got {self.degree}", "degree")
        if self.n_components < 1:
            raise InputError(f"n_components must be >= 1, got {self.n_components}", "n_components")

    def fit(self, inputs: Inputs, target=None) -> Fitted:
        if inputs.train is None:
            raise InputError("polyres needs its training set (train=...) to fit on", "train")
        model = PolyResiduals(degree=self.degree, n_components=self.n_components, condition=self.condition)
        with open_dataset(inputs.train) as tr:
            model.fit_dataset(tr, progress=inputs.progress)
            train_info = dataset_info(tr)
        info = {"path": None, "class": "PolyResiduals", "degree": model.degree,
                "n_components": int(len(model.components_)), "condition": list(model.condition), "train": train_info}
        return Fitted(info, lambda ds, evaluated=True: Tags(model.transform_dataset(ds, progress=inputs.progress)))
