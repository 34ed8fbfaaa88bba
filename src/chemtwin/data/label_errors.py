"""TEFF and LOGG as a survey hands them over: the truth plus pipeline-like errors.

A survey never gives the true TEFF/LOGG.  APOGEE DR17's are spectroscopic values calibrated to
photometric (infrared-flux-method) temperatures and asteroseismic gravities; what is left is a
random part of tens of K and ~0.05-0.1 dex, and systematics that depend on the star's own
chemistry (the calibrations are functions of [M/H]; Jönsson et al. 2020, AJ 160, 120, sections
5.1-5.2; Abdurro'uf et al. 2022, ApJS 259, 35).  :class:`LabelErrors` models both:

    TEFF_survey = TEFF + teff_per_feh * FE_H + N(0, teff_random)
    LOGG_survey = LOGG + logg_per_feh * FE_H + N(0, logg_random)

The defaults are assumptions inside those published ranges, not fits: 50 K and 0.07 dex random
(each star its own draw: twins are observed separately), 50 K and 0.05 dex per dex of FE_H
systematic (twins share it, as they share FE_H).  A systematic that depends on chemistry is the
one that matters: a constant or a smooth function of TEFF/LOGG alone is a change of coordinates
every conditioned method absorbs.  VMICRO and VMACRO, where present, follow the survey's LOGG
through the synthesizer's relations, as a pipeline derives them.  The settings are sizes (>= 0); the systematic's sign is fixed:
metal-rich stars come out hotter and of higher gravity, as a pipeline whose models lack some
line opacity makes them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from chemtwin.errors import InputError
from chemtwin.spectral_models.labels import default_vmacro, default_vmicro


@dataclass(frozen=True)
class LabelErrors:
    """Random (1-sigma) and [Fe/H]-dependent systematic errors of TEFF (K) and LOGG (dex)."""

    teff_random: float = 50.0
    logg_random: float = 0.07
    teff_per_feh: float = 50.0
    logg_per_feh: float = 0.05

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise InputError(f"label error {name} must be a finite number, got {value!r}", name)
            if value < 0:
                raise InputError(f"label error {name} must be >= 0, got {value}", name)

    def apply(self, labels: np.ndarray, names, rng: np.random.Generator) -> np.ndarray:
        """A copy of ``labels`` (N, L) with TEFF and LOGG as a survey gives them; the draws come from ``rng``."""
        names = list(names)
        missing = [n for n in ("TEFF", "LOGG", "FE_H") if n not in names]
        if missing:
            raise InputError(f"label errors need the labels {', '.join(missing)}")
        out = np.array(labels, dtype=np.float64)
        feh = out[:, names.index("FE_H")]
        noise = rng.standard_normal((len(out), 2))
        out[:, names.index("TEFF")] += self.teff_per_feh * feh + self.teff_random * noise[:, 0]
        out[:, names.index("LOGG")] += self.logg_per_feh * feh + self.logg_random * noise[:, 1]
        # A pipeline derives the velocities from its own LOGG (ASPCAP DR17 does VMICRO so for giants)
        for name, relation in (("VMICRO", default_vmicro), ("VMACRO", default_vmacro)):
            if name in names:
                out[:, names.index(name)] = relation(out[:, names.index("LOGG")])
        return out.astype(np.asarray(labels).dtype)

    def quoted(self) -> dict:
        """{label: 1-sigma}: the errors a survey quotes with its labels (TEFF_ERR, LOGG_ERR), the random
        part; the systematic part is what a survey does not know of its own labels."""
        return {"TEFF": self.teff_random, "LOGG": self.logg_random}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)
