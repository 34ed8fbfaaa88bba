"""Small smooth fake twin spectra for fast model tests (no synthesizer needed).

Each star: 40 Gaussian absorption lines on P pixels; line depths depend on the group's
chemistry (5 abundances) and, strongly and nonlinearly, on TEFF and LOGG, which are drawn
independently for each star.  So TEFF/LOGG are (nonlinearly) encoded in the spectrum.
"""

from __future__ import annotations

import numpy as np

LABEL_NAMES = ("TEFF", "LOGG", "FE_H", "MG_FE", "SI_FE", "CA_FE", "NI_FE")


def fake_twins(n_groups=200, n_pixels=200, group_size=2, seed=0, ivar_value=1e4, n_lines=40):
    rng = np.random.default_rng(seed)
    line_rng = np.random.default_rng(12345)  # the same "physics" for every call
    centers = line_rng.uniform(0, n_pixels, n_lines)
    widths = line_rng.uniform(1.0, 3.0, n_lines)
    element = line_rng.integers(0, 5, n_lines)
    a, b, c = line_rng.normal(0, 0.5, n_lines), line_rng.normal(0, 1.5, n_lines), line_rng.normal(0, 1.0, n_lines)
    chem = rng.normal(0, 0.25, (n_groups, 5))
    n = n_groups * group_size
    group = np.repeat(np.arange(n_groups), group_size)
    teff = rng.uniform(3800, 5500, n)
    logg = rng.uniform(0.5, 3.8, n)
    t, g = (teff - 4650) / 850, (logg - 2.15) / 1.65
    eta = a + 3.0 * chem[group][:, element] + b * t[:, None] + c * g[:, None] + 0.5 * b * t[:, None] ** 2
    depth = 0.6 / (1 + np.exp(-eta))
    pix = np.arange(n_pixels)
    profile = np.exp(-0.5 * ((pix[None, :] - centers[:, None]) / widths[:, None]) ** 2)
    flux = (1 - depth @ profile).astype(np.float32)
    ivar = np.full_like(flux, ivar_value)
    labels = np.column_stack([teff, logg, chem[group]]).astype(np.float32)
    return flux, ivar, labels, group


def write_fake(path, n_groups=200, n_pixels=200, seed=0, label_names=LABEL_NAMES, **kw):
    from chemtwin.data.dataset_writer import DatasetWriter

    flux, ivar, labels, group = fake_twins(n_groups, n_pixels, seed=seed, **kw)
    cols = [LABEL_NAMES.index(n) for n in label_names]
    with DatasetWriter(path, 15000 + np.arange(n_pixels, dtype=float), list(label_names),
                       attrs={"generator": "fake_twins", "seed": seed, "snr": "inf"}) as w:
        w.append(flux, ivar, labels[:, cols], group)
    return path
