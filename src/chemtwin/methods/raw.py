"""Raw spectra as tags: every spectrum (masked pixels filled with the set's per-pixel mean) is its
own tag.  Held in memory and high-dimensional: slow to rank on a CPU for large sets (rank a
random subset of query stars with ``max_queries``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from chemtwin.methods.base import Fitted, Inputs, Method, Tags
from chemtwin.tagging.polyres import RawSpectrum


@dataclass(frozen=True)
class Raw(Method):
    name: ClassVar[str] = "raw"
    label: ClassVar[str] = "raw spectra"

    def fit(self, inputs: Inputs, target=None) -> Fitted:
        def tag(ds, evaluated: bool = True) -> Tags:
            b = ds.read(0, ds.n_stars)
            return Tags(RawSpectrum().fit_transform(np.asarray(b.flux, np.float32), np.asarray(b.ivar, np.float32)))

        return Fitted({"path": None, "class": "RawSpectrum"}, tag)
