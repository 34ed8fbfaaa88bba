"""Label priors for red giants and groups of chemical twins.

Every star in a group shares all chemical labels (FE_H and every X_FE); TEFF, LOGG,
VMICRO and VMACRO are drawn for each star independently.  Group size 2 gives the paper's
pairs; larger groups mimic open clusters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from chemtwin.errors import InputError
from chemtwin.spectral_models.labels import (
    CHEMICAL_LABELS,
    LABEL_NAMES,
    VALID_RANGE,
    X_FE_LABELS,
    default_vmacro,
    default_vmicro,
)

ALPHA_LABELS = ("O_FE", "MG_FE", "SI_FE", "S_FE", "CA_FE", "TI_FE")
# Mean offsets and star-to-star scatter (dex) of the non-alpha [X/Fe] in the disc; giants show
# mixing-depleted C and enhanced N.
X_FE_MEAN = {"C_FE": -0.1, "N_FE": 0.2}
X_FE_SCATTER = {"C_FE": 0.10, "N_FE": 0.15, "NA_FE": 0.10, "AL_FE": 0.10, "K_FE": 0.10, "V_FE": 0.12,
                "CR_FE": 0.05, "MN_FE": 0.06, "CO_FE": 0.08, "NI_FE": 0.05}
ALPHA_SCATTER = 0.05


@dataclass
class RedGiantPrior:
    """Where red-giant labels are drawn from (APOGEE-like disc giants)."""

    teff: tuple[float, float] = (4000.0, 5500.0)
    logg: tuple[float, float] = (1.0, 3.5)
    feh_mean: float = -0.15
    feh_sigma: float = 0.25
    feh_clip: tuple[float, float] = (-1.2, 0.5)
    # Fraction of each abundance's scatter shared by all elements (chemical evolution moves them together).
    common_factor: float = 0.5
    # Star-to-star scatter around the LOGG relations of VMICRO / VMACRO (km/s); 0 = the relation itself.
    vmicro_scatter: float = 0.0
    vmacro_scatter: float = 0.0
    x_fe_scatter: dict = field(default_factory=lambda: dict(X_FE_SCATTER))

    def __post_init__(self):
        for name, (lo, hi) in (("TEFF", self.teff), ("LOGG", self.logg)):
            vlo, vhi = VALID_RANGE[name]
            if not (vlo <= lo <= hi <= vhi):
                raise InputError(f"{name} range {lo:g}-{hi:g} is outside the synthesizer's valid range {vlo:g}-{vhi:g}")

    def sample_chemistry(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, len(CHEMICAL_LABELS)) abundance labels: FE_H then X_FE."""
        feh = np.clip(rng.normal(self.feh_mean, self.feh_sigma, n), *self.feh_clip)
        # The alpha sequence of the thin disc: [alpha/Fe] ~0.3 below [Fe/H] = -0.8, falling to 0 at +0.2.
        alpha = np.interp(feh, [-0.8, 0.2], [0.3, 0.0])
        common = rng.standard_normal(n)
        out = np.empty((n, len(CHEMICAL_LABELS)))
        out[:, 0] = feh
        w = self.common_factor
        for k, name in enumerate(X_FE_LABELS, start=1):
            own = rng.standard_normal(n)
            shock = np.sqrt(w) * common + np.sqrt(1 - w) * own
            if name in ALPHA_LABELS:
                out[:, k] = alpha + ALPHA_SCATTER * shock
            else:
                out[:, k] = X_FE_MEAN.get(name, 0.0) + self.x_fe_scatter[name] * shock
        lo, hi = VALID_RANGE["C_FE"]
        out[:, 1:] = np.clip(out[:, 1:], lo, hi)
        return out

    def sample_physical(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 4) TEFF, LOGG, VMICRO, VMACRO drawn per star."""
        teff = rng.uniform(*self.teff, n)
        logg = rng.uniform(*self.logg, n)
        vmicro = default_vmicro(logg) + self.vmicro_scatter * rng.standard_normal(n)
        vmacro = default_vmacro(logg) + self.vmacro_scatter * rng.standard_normal(n)
        vmicro = np.clip(vmicro, *VALID_RANGE["VMICRO"])
        vmacro = np.clip(vmacro, *VALID_RANGE["VMACRO"])
        return np.column_stack([teff, logg, vmicro, vmacro])


def twin_groups(
    n_groups: int, group_size: int, prior: RedGiantPrior, rng: np.random.Generator, first_group: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n_groups * group_size, 21) in LABEL_NAMES order and group ids (first_group, ...)."""
    if group_size < 1:
        raise InputError(f"group size must be >= 1, got {group_size}")
    chemistry = np.repeat(prior.sample_chemistry(n_groups, rng), group_size, axis=0)
    physical = prior.sample_physical(n_groups * group_size, rng)
    labels = np.concatenate([physical, chemistry], axis=1)
    assert labels.shape[1] == len(LABEL_NAMES)
    group = np.repeat(np.arange(first_group, first_group + n_groups, dtype=np.int64), group_size)
    return labels, group
