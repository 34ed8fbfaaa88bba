"""How much of a real spectrum does a model explain?  Line finding and a line-by-line census.

A *line* is a local minimum of a continuum-normalized spectrum found by ``scipy.signal.find_peaks``
on the depth ``1 - flux``, inside one run of usable pixels, with a depth of at least ``min_depth``
below the continuum and a prominence of at least ``min_prominence`` (and, in noisy data, three
times the pixel noise) above the shoulders around it: a dip on the wing of a stronger line counts
when it stands out by that much.  Positions are refined to a fraction of a pixel by a parabola
through the minimum and its neighbours.

The census compares the lines of a real spectrum with those of a model of it (a fit of the
synthesizer, ``chemtwin.spectral_models.fit``):

* ``real_in_model``: the fraction of real lines deeper than ``min_depth`` that have a model line
  within ``tolerance_px`` pixels (the model line may be as shallow as half of ``min_depth``:
  a real 6 % line modelled at 4 % is present, just too weak);
* ``model_in_real``: the same the other way round;
* ``depth_scatter``: the RMS of (model - real) depth at the real lines' deepest pixels;
* ``rms``: the RMS residual over usable pixels, in units of the continuum.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import find_peaks

DEFAULT_MIN_DEPTH = 0.05
DEFAULT_TOLERANCE_PX = 1.0
DEFAULT_MIN_PROMINENCE = 0.01


def usable_runs(usable: np.ndarray, min_length: int = 5) -> list[slice]:
    """Contiguous runs of True of at least ``min_length`` pixels."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], usable.astype(np.int8), [0]])))
    return [slice(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a >= min_length]


def find_lines(flux: np.ndarray, ivar: np.ndarray | None = None, min_depth: float = DEFAULT_MIN_DEPTH,
               min_prominence: float = DEFAULT_MIN_PROMINENCE, noise_sigmas: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """(position in fractional pixels, depth) of every line of ``flux`` (P,); ``ivar`` None = noiseless
    model, else pixels with ivar 0 are skipped and the prominence must exceed ``noise_sigmas`` times
    the median pixel noise of the run."""
    flux = np.asarray(flux, dtype=float)
    usable = np.isfinite(flux) if ivar is None else (np.asarray(ivar) > 0) & np.isfinite(flux)
    positions, depths = [], []
    for run in usable_runs(usable):
        depth = 1.0 - flux[run]
        prominence = min_prominence
        if ivar is not None:
            prominence = max(prominence, noise_sigmas * float(np.median(1.0 / np.sqrt(np.asarray(ivar)[run]))))
        peaks, _ = find_peaks(depth, height=min_depth, prominence=prominence)
        peaks = peaks[(peaks > 0) & (peaks < depth.size - 1)]
        left, mid, right = depth[peaks - 1], depth[peaks], depth[peaks + 1]
        curvature = left - 2 * mid + right
        offset = np.where(curvature < 0, 0.5 * (left - right) / np.where(curvature < 0, curvature, -1.0), 0.0)
        positions.append(run.start + peaks + np.clip(offset, -0.5, 0.5))
        depths.append(mid)
    if not positions:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(positions), np.concatenate(depths)


def nearest_distance(positions: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Distance from each of ``positions`` to the nearest of ``others`` (inf when there is none)."""
    if others.size == 0:
        return np.full(positions.shape, np.inf)
    others = np.sort(others)
    i = np.searchsorted(others, positions)
    before = np.abs(positions - others[np.clip(i - 1, 0, others.size - 1)])
    after = np.abs(others[np.clip(i, 0, others.size - 1)] - positions)
    return np.minimum(before, after)


def line_census(flux: np.ndarray, ivar: np.ndarray, model: np.ndarray, min_depth: float = DEFAULT_MIN_DEPTH,
                tolerance_px: float = DEFAULT_TOLERANCE_PX) -> dict:
    """The census of the module docstring for one real spectrum and its model (both (P,))."""
    flux, ivar, model = (np.asarray(a, dtype=float) for a in (flux, ivar, model))
    usable = (ivar > 0) & np.isfinite(flux)
    model_on_data = np.where(usable, model, np.nan)
    real_pos, real_depth = find_lines(flux, ivar, min_depth)
    model_pos, model_depth = find_lines(model_on_data, None, min_depth)
    real_weak, _ = find_lines(flux, ivar, min_depth / 2)
    model_weak, _ = find_lines(model_on_data, None, min_depth / 2)
    at_real = model[np.clip(np.round(real_pos).astype(int), 0, model.size - 1)]  # the pixel where the real depth was read
    return {
        "n_pixels": int(usable.sum()),
        "rms": float(np.sqrt(np.mean((flux[usable] - model[usable]) ** 2))),
        "rms_flat": float(np.sqrt(np.mean((flux[usable] - 1.0) ** 2))),
        "n_real_lines": int(real_pos.size),
        "n_model_lines": int(model_pos.size),
        "real_in_model": float(np.mean(nearest_distance(real_pos, model_weak) <= tolerance_px)) if real_pos.size else float("nan"),
        "model_in_real": float(np.mean(nearest_distance(model_pos, real_weak) <= tolerance_px)) if model_pos.size else float("nan"),
        "depth_scatter": float(np.sqrt(np.mean(((1 - at_real) - real_depth) ** 2))) if real_pos.size else float("nan"),
        "real_depths": real_depth,
        "model_depths": model_depth,
    }
