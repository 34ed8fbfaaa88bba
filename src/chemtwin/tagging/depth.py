"""Is a star inside what the model learned?  The out-of-depth reference and the per-star check.

Three twin-free tests (they need only the spectrum, its ivar and the conditioning labels;
docs/model.md "Out of depth"):

* ``LABELS_OUT_OF_RANGE`` (bit 1): a conditioning label (TEFF, LOGG, ...) outside the
  [min, max] of the training rows.  The decoder and the baseline b(u) extrapolate there.
* ``LATENT_FAR`` (bit 2): the Mahalanobis distance of z under the training latents' mean and
  covariance is above its 99.9th percentile on the training set (the largest value with fewer
  than 1,000 reference stars; + 0.01% ``MARGIN`` against rounding).
* ``POOR_RECONSTRUCTION`` (bit 4): the reconstruction chi^2 per pixel of D(z, u) against the
  spectrum is above ``max(3 x its training median, its training 99.9th percentile)``, where
  chi^2 = mean over pixels with ivar > 0 of (x_hat - x)^2 / (1 / ivar + s2) and s2 is the
  model's own error variance measured on the training set (so noiseless training spectra,
  ivar = inf, have a finite chi^2, ~1).

``reference_statistics`` measures what the tests compare with on (at most
``REFERENCE_STARS``) training rows at the end of training; the model folder keeps it as
``config.json``'s ``reference`` (``chemtwin.tagging.model_folder``).  ``DepthCheck`` applies
the tests to embedded batches.  A model folder written before the reference existed is
checked on the label range only (the range is the weights' own ``u_lo``/``u_hi`` buffers).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from chemtwin.data.spectra import pixel_weights

log = logging.getLogger(__name__)

LABELS_OUT_OF_RANGE, LATENT_FAR, POOR_RECONSTRUCTION = 1, 2, 4
FLAG_BITS = {"LABELS_OUT_OF_RANGE": LABELS_OUT_OF_RANGE, "LATENT_FAR": LATENT_FAR,
             "POOR_RECONSTRUCTION": POOR_RECONSTRUCTION}
REFERENCE_STARS = 5000        # training rows the reference is measured on (at most)
QUANTILE = 0.999              # the training quantile a star must exceed to be flagged
CHI2_FACTOR = 3.0             # ... and for chi^2, at least this many times the training median
MARGIN = 1.0001               # thresholds sit 0.01% above the training quantile: the float rounding of
                              # other batch sizes must not push a training star over its own envelope
REFERENCE_VERSION = 1


def _noise_variance(ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(1 / ivar with 0 for ivar = inf, mask of the pixels that count: ivar > 0)."""
    ivar = np.asarray(ivar, dtype=np.float64)
    good = ivar > 0
    with np.errstate(divide="ignore"):
        var = np.where(good & np.isfinite(ivar), 1.0 / np.where(good, ivar, 1.0), 0.0)
    return var, good


@torch.no_grad()
def _encode_decode(model, flux, ivar, u, z=None, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(z, squared residual (x_hat - x)^2) of the rows, the model in evaluation mode."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    zs, r2s = [], []
    try:
        for a in range(0, len(flux), batch):
            x = torch.from_numpy(np.nan_to_num(np.asarray(flux[a : a + batch], np.float32))).to(dev)
            uu = torch.from_numpy(np.asarray(u[a : a + batch], np.float32)).to(dev)
            if z is None:
                w = torch.from_numpy(pixel_weights(np.asarray(ivar[a : a + batch]))).to(dev)
                zb = model.encode(x, w, uu)
            else:
                zb = torch.from_numpy(np.asarray(z[a : a + batch], np.float32)).to(dev)
            x_hat = model.decode(zb, uu)
            zs.append(zb.cpu().numpy())
            r2s.append((x_hat - x).double().pow(2).cpu().numpy())
    finally:
        model.train(was_training)
    d = model.latent_dim
    return (np.concatenate(zs) if zs else np.zeros((0, d), np.float32),
            np.concatenate(r2s) if r2s else np.zeros((0, model.n_pixels)))


def _chi2(r2: np.ndarray, ivar: np.ndarray, s2: float) -> np.ndarray:
    var, good = _noise_variance(ivar)
    terms = np.where(good, r2 / (var + s2), 0.0)
    return terms.sum(1) / np.maximum(good.sum(1), 1)


def _mahalanobis(z: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    chol = np.linalg.cholesky(cov)
    y = np.linalg.solve(chol, (np.asarray(z, np.float64) - mean).T)
    return np.sqrt((y * y).sum(0))


def reference_statistics(model, source, rows: np.ndarray, columns, u_train: np.ndarray, seed: int = 0,
                         max_stars: int = REFERENCE_STARS, read_rows: int = 512) -> dict:
    """The out-of-depth reference (a JSON-able dict) of ``model`` on training ``rows`` of
    ``source`` (at most ``max_stars`` of them, drawn with ``seed``); ``u_train``: the
    conditioning labels of all training rows (their range)."""
    rows = np.asarray(rows)
    if rows.size > max_stars:
        rows = np.sort(np.random.default_rng(seed + 3).choice(rows, size=max_stars, replace=False))
    # pass 1: latents and the model's own error variance (the squared residual in excess of the
    # noise per star, median); pass 2: chi^2 with it.  Two passes keep memory at one chunk.
    zs, excess = [], []
    for a in range(0, rows.size, read_rows):
        b = source.take(rows[a : a + read_rows])
        ivar = np.asarray(b.ivar)
        z, r2 = _encode_decode(model, np.asarray(b.flux), ivar, np.asarray(b.labels)[:, columns])
        var, good = _noise_variance(ivar)
        zs.append(z)
        excess.append((np.where(good, r2, 0).sum(1) - np.where(good, var, 0).sum(1)) / np.maximum(good.sum(1), 1))
    z = np.concatenate(zs).astype(np.float64)
    s2 = float(max(np.median(np.concatenate(excess)), 1e-12))
    chi2 = []
    for k, a in enumerate(range(0, rows.size, read_rows)):
        b = source.take(rows[a : a + read_rows])
        _, r2 = _encode_decode(model, np.asarray(b.flux), None, np.asarray(b.labels)[:, columns], z=zs[k])
        chi2.append(_chi2(r2, np.asarray(b.ivar), s2))
    chi2 = np.concatenate(chi2)
    mean = z.mean(0)
    cov = np.cov(z.T).reshape(z.shape[1], z.shape[1]) if len(z) > 1 else np.eye(z.shape[1])
    cov = cov + 1e-9 * max(float(np.trace(cov)) / len(cov), 1e-12) * np.eye(len(cov))
    dist = _mahalanobis(z, mean, cov)
    u_train = np.asarray(u_train, np.float64)
    chi2_median = float(np.median(chi2))
    # "higher": an observed value, so fewer than 1 / (1 - QUANTILE) = 1,000 reference stars give their maximum
    # and no training star is beyond its own envelope
    q_dist, q_chi2 = (float(np.quantile(x, QUANTILE, method="higher")) for x in (dist, chi2))
    return {
        "version": REFERENCE_VERSION, "n_stars": int(len(z)), "quantile": QUANTILE,
        "label_min": u_train.min(0).tolist(), "label_max": u_train.max(0).tolist(),
        "label_p0.5": np.percentile(u_train, 0.5, axis=0).tolist(),
        "label_p99.5": np.percentile(u_train, 99.5, axis=0).tolist(),
        "latent_mean": mean.tolist(), "latent_cov": cov.tolist(),
        "latent_distance_median": float(np.median(dist)),
        "latent_distance_threshold": MARGIN * q_dist,
        "model_variance": s2, "recon_chi2_median": chi2_median,
        "recon_chi2_threshold": max(CHI2_FACTOR * chi2_median, MARGIN * q_chi2),
    }


class DepthCheck:
    """The three tests of a model (``model``: a ``FaderNet``; ``reference``: config.json's
    ``reference`` or None for a model folder without one: label range only)."""

    def __init__(self, model, reference: dict | None):
        self.model, self.reference = model, reference if isinstance(reference, dict) else None
        r = self.reference
        if r is not None:
            self.lo, self.hi = np.asarray(r["label_min"], float), np.asarray(r["label_max"], float)
            self.mean, self.cov = np.asarray(r["latent_mean"], float), np.asarray(r["latent_cov"], float)
        else:  # the weights' own training range (min, max; max = min + 1 for a label held constant)
            self.lo, self.hi = model.u_lo.double().cpu().numpy(), model.u_hi.double().cpu().numpy()

    @property
    def complete(self) -> bool:
        return self.reference is not None

    def thresholds(self) -> dict:
        """What the latent file's attributes record."""
        out = {"label_min": self.lo.tolist(), "label_max": self.hi.tolist()}
        if self.reference is not None:
            out.update({k: self.reference[k] for k in ("latent_distance_threshold", "recon_chi2_threshold",
                                                       "model_variance", "quantile")})
        return out

    def __call__(self, z, flux, ivar, u) -> dict:
        """Per star: ``flags`` (int16 bitmask), ``latent_distance`` and ``recon_chi2`` (float32; NaN
        without a reference)."""
        u = np.asarray(u, np.float64)
        flags = np.where(((u < self.lo) | (u > self.hi)).any(1), LABELS_OUT_OF_RANGE, 0).astype(np.int16)
        n = len(u)
        dist = np.full(n, np.nan, np.float32)
        chi2 = np.full(n, np.nan, np.float32)
        if self.reference is not None and n:
            r = self.reference
            dist[:] = _mahalanobis(z, self.mean, self.cov)
            _, r2 = _encode_decode(self.model, flux, ivar, u, z=z)
            chi2[:] = _chi2(r2, ivar, r["model_variance"])
            flags |= np.where(dist > r["latent_distance_threshold"], LATENT_FAR, 0).astype(np.int16)
            flags |= np.where(chi2 > r["recon_chi2_threshold"], POOR_RECONSTRUCTION, 0).astype(np.int16)
        return {"flags": flags, "latent_distance": dist, "recon_chi2": chi2}


def flag_counts(flags: np.ndarray) -> dict:
    """{"flagged": stars with any bit, and per bit name: stars with that bit, "checked": all stars}."""
    flags = np.asarray(flags)
    return {"checked": int(flags.size), "flagged": int((flags != 0).sum()),
            **{name: int(((flags & bit) != 0).sum()) for name, bit in FLAG_BITS.items()}}


def summary(counts: dict, check: DepthCheck, condition) -> str | None:
    """The one warning line for flagged stars (``flag_counts``, summed over shards); None when none is."""
    if not counts.get("flagged"):
        return None
    parts = [f"{counts['LABELS_OUT_OF_RANGE']} with {'/'.join(condition)} outside the training range "
             f"({', '.join(f'{c} {lo:g}..{hi:g}' for c, lo, hi in zip(condition, check.lo, check.hi))})"]
    if check.complete:
        r = check.reference
        parts.append(f"{counts['LATENT_FAR']} with a latent farther than {r['latent_distance_threshold']:.3g} "
                     f"(Mahalanobis) from the training latents")
        parts.append(f"{counts['POOR_RECONSTRUCTION']} with reconstruction chi2/pixel above "
                     f"{r['recon_chi2_threshold']:.3g}")
    else:
        parts.append("latent distance and reconstruction not checked (the model folder has no out-of-depth reference)")
    return (f"{counts['flagged']} of {counts['checked']} stars are out of the model's depth: {'; '.join(parts)}; "
            f"their latents are kept, marked in column 'flags'")
