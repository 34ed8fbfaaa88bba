"""Probe: the conditional linear latent model, a twin-free tag built like the Cramér-Rao oracle
(issue 18, item 3), and why it does not work unsupervised.

    python benchmarks/linear_latent_probe.py --out OUT.json [--work DIR] [--train-pairs 3000] [--val-pairs 1500]

Every spectrum is modelled as its non-chemical part plus a chemical latent seen through a
Jacobian that depends on the non-chemical labels u (TEFF, LOGG)::

    x_n = f(u_n) + J(u_n) z_n + noise,      noise_np ~ N(0, 1/ivar_np + s_p^2)

f(u): per pixel, a degree-4 polynomial in u; J(u) = sum_k phi_k(u) J_k, degree 2 in u; s_p^2 the
model's own error per pixel, measured on the training residuals beyond their noise.  The encoder
is each star's weighted least-squares solve against J(u_n) with its own ivar, its covariance the
inverse Fisher matrix, and twins are ranked with the Mahalanobis distance of the pooled
covariance: the oracle's construction with the chemical model learned instead of given.

Fitted by alternating least squares (z given f, J: one weighted solve per star; f, J given z: one
regression shared by all pixels), started from the polynomial residuals' principal components,
the latents made independent of u (mean, to degree 2) and whitened after every z-step.

The probe fits it on generated SNR-100 spectra of the default synthesizer three ways and ranks the
validation set's twins: (1) unsupervised, at the PCA start and after ALS iterations; (2) with J(u)
regressed on the TRUE abundances (a ceiling: what the model form can do when the latent is right),
then (3) ALS iterations started from that fit.  Twins and true abundances are used only in (2)
and for scoring.  Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from itertools import combinations_with_replacement
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from _common import machine

from chemtwin.core.whitening import whitening_matrix
from chemtwin.data.spectra import ivar_weights
from chemtwin.errors import InputError
from chemtwin.tagging.polyres import DEFAULT_CONDITION, PolyResiduals, _check, _check_cond

log = logging.getLogger(__name__)


def monomial_exponents(n_labels: int, degree: int) -> np.ndarray:
    """(n_terms, n_labels) exponents of all monomials of total degree <= ``degree``."""
    return np.array([np.bincount(np.array(c, dtype=np.int64), minlength=n_labels)
                     for deg in range(degree + 1)
                     for c in combinations_with_replacement(range(n_labels), deg)],
                    dtype=np.int64).reshape(-1, n_labels)


def noise_variance(ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(variance, good)``: per-pixel noise variance (0 where noiseless) and which pixels count."""
    w = ivar_weights(ivar)
    good = w > 0
    noiseless = np.isposinf(np.asarray(ivar)).any(axis=1, keepdims=True)
    var = np.where(good & ~noiseless, 1.0 / np.where(good, w, 1.0), 0.0)
    return var, good


class LinearLatent:
    """Conditional linear latent tags (see the module docstring); scikit-learn style."""

    def __init__(self, latent_dim: int = 20, baseline_degree: int = 4, jacobian_degree: int = 2,
                 n_iter: int = 15, condition=DEFAULT_CONDITION, batch_size: int = 256, seed: int = 0):
        if int(latent_dim) < 1:
            raise InputError(f"latent_dim must be >= 1, got {latent_dim}")
        if int(jacobian_degree) > int(baseline_degree):
            raise InputError("jacobian_degree must not exceed baseline_degree")
        self.latent_dim = int(latent_dim)
        self.baseline_degree = int(baseline_degree)
        self.jacobian_degree = int(jacobian_degree)
        self.n_iter = int(n_iter)
        self.condition = (condition,) if isinstance(condition, str) else tuple(condition)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.label_mean_ = self.label_scale_ = None
        self.baseline_ = None        # (n_baseline_terms, P)
        self.jacobian_ = None        # (n_jacobian_terms, P, d)
        self.model_variance_ = None  # (P,) s_p^2
        self.whitening_ = None       # (d, d): tags = z @ whitening_
        self.history_ = []

    # ------------------------------------------------------------------ pieces
    def _phi(self, cond, degree) -> np.ndarray:
        s = (np.asarray(cond, dtype=np.float64) - self.label_mean_) / self.label_scale_
        e = monomial_exponents(len(self.condition), degree)
        return np.prod(s[:, None, :] ** e[None, :, :], axis=2)

    def _weights(self, ivar) -> tuple[np.ndarray, np.ndarray]:
        var, good = noise_variance(ivar)
        w = np.where(good, 1.0 / (var + self.model_variance_[None, :]), 0.0)
        return w.astype(np.float32), good

    def _solve(self, flux, ivar, cond) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per star: ``(z, fisher, residual)``; z (n, d), fisher (n, d, d) = J^T W J."""
        w, good = self._weights(ivar)
        base = self._phi(cond, self.baseline_degree) @ self.baseline_
        r = np.where(good, np.nan_to_num(flux.astype(np.float64)) - base, 0.0).astype(np.float32)
        phi = torch.from_numpy(self._phi(cond, self.jacobian_degree).astype(np.float32))
        jac = torch.einsum("nk,kpd->npd", phi, torch.from_numpy(self.jacobian_))
        jw = jac * torch.from_numpy(w)[:, :, None]
        fisher = torch.bmm(jw.transpose(1, 2), jac).double()
        rhs = torch.bmm(jw.transpose(1, 2), torch.from_numpy(r)[:, :, None]).double()
        ridge = 1e-9 * torch.diagonal(fisher, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
        eye = torch.eye(self.latent_dim, dtype=torch.float64)
        z = torch.linalg.solve(fisher + ridge[:, None, None] * eye, rhs)[:, :, 0]
        fit = torch.bmm(jac, z.float()[:, :, None])[:, :, 0].numpy()
        return z.numpy(), fisher.numpy(), np.where(good, r - fit, 0.0)

    # ------------------------------------------------------------------ fit
    def fit(self, flux, ivar=None, cond=None, progress: bool = False, z_true=None) -> "LinearLatent":
        """ALS from the PCA start; with ``z_true`` (N, d), J(u) is first regressed on those latents."""
        flux, ivar, ok = _check(flux, ivar)
        cond = _check_cond(cond, len(flux), len(self.condition), self.condition)
        flux, ivar, cond = flux[ok], ivar[ok], cond[ok]
        n, p = flux.shape
        d = self.latent_dim
        if n <= d:
            raise InputError(f"need more than {d} usable training spectra, got {n}")
        start = PolyResiduals(degree=self.baseline_degree, n_components=d, condition=self.condition).fit(flux, ivar, cond)
        self.label_mean_, self.label_scale_ = start.label_mean_, start.label_scale_
        n_j = len(monomial_exponents(len(self.condition), self.jacobian_degree))
        scale = np.sqrt(np.maximum(start.explained_variance_, 1e-30))
        self.baseline_ = start.coef_.copy()
        self.baseline_[0] += start.mean_
        self.jacobian_ = np.zeros((n_j, p, d), np.float32)
        self.jacobian_[0] = (start.components_.T * scale[None, :]).astype(np.float32)
        var, good = noise_variance(ivar)
        resid = start._residuals(flux, ivar, cond) - start.mean_
        proj = resid @ start.components_.T @ start.components_
        excess = np.where(good, (resid - proj) ** 2 - var, 0.0).sum(0) / np.maximum(good.sum(0), 1)
        self.model_variance_ = np.maximum(excess, _variance_floor(excess))
        self.history_ = []
        if z_true is not None:
            self._fj_step(flux, ivar, cond, z_true[ok])
        for it in tqdm(range(self.n_iter), desc="linear latent", disable=not progress, leave=False):
            z, chi2, excess = self._z_step(flux, ivar, cond)
            z = self._fix_gauge(z, cond)
            self._fj_step(flux, ivar, cond, z)
            self.model_variance_ = np.maximum(excess, _variance_floor(excess))
            self.history_.append({"iteration": it, "chi2_per_pixel": chi2})
            log.info("linear latent: iteration %d, chi2 per pixel %.4f", it, chi2)
        _, fisher, _ = self._encode(flux, ivar, cond)
        self.whitening_ = whitening_matrix(np.linalg.inv(fisher).mean(0)).T
        return self

    def _batches(self, n):
        for a in range(0, n, self.batch_size):
            yield slice(a, min(n, a + self.batch_size))

    def _z_step(self, flux, ivar, cond):
        n, p = flux.shape
        z = np.zeros((n, self.latent_dim))
        sq = np.zeros(p)
        count = np.zeros(p)
        chi2 = 0.0
        for s in self._batches(n):
            z[s], _, res = self._solve(flux[s], ivar[s], cond[s])
            var, good = noise_variance(ivar[s])
            w, _ = self._weights(ivar[s])
            chi2 += float((w * res ** 2).sum())
            sq += np.where(good, res ** 2 - var, 0.0).sum(0)
            count += good.sum(0)
        return z, chi2 / max(count.sum(), 1), sq / np.maximum(count, 1)

    def _fix_gauge(self, z, cond):
        """Latents independent of u to ``jacobian_degree`` (mean), unit covariance; J follows the whitening."""
        phi = self._phi(cond, self.jacobian_degree)
        coef, *_ = np.linalg.lstsq(phi, z, rcond=None)
        z = z - phi @ coef
        cov = np.cov(z, rowvar=False)
        white = whitening_matrix(cov)          # z_new = z @ white.T has unit covariance; J z = J white^-1 z_new
        self.jacobian_ = np.einsum("kpd,de->kpe", self.jacobian_, np.linalg.inv(white)).astype(np.float32)
        return z @ white.T

    def _fj_step(self, flux, ivar, cond, z):
        n, p = flux.shape
        phi_b = self._phi(cond, self.baseline_degree)
        phi_j = self._phi(cond, self.jacobian_degree)
        design = np.concatenate([phi_b, (phi_j[:, :, None] * z[:, None, :]).reshape(n, -1)], axis=1)
        gram = np.zeros((design.shape[1],) * 2)
        rhs = np.zeros((design.shape[1], p))
        for s in self._batches(n):
            w, good = self._weights(ivar[s])
            star_w = np.array([np.median(row[g]) if g.any() else 0.0 for row, g in zip(w, good)])
            model = phi_b[s] @ self.baseline_ + np.einsum("nk,kpd,nd->np", phi_j[s], self.jacobian_, z[s], optimize=True)
            x = np.where(good, np.nan_to_num(flux[s].astype(np.float64)), model)
            gram += (design[s] * star_w[:, None]).T @ design[s]
            rhs += (design[s] * star_w[:, None]).T @ x
        gram += 1e-9 * np.trace(gram) / len(gram) * np.eye(len(gram))
        coef = np.linalg.solve(gram, rhs)
        nb = phi_b.shape[1]
        self.baseline_ = coef[:nb]
        self.jacobian_ = coef[nb:].reshape(phi_j.shape[1], self.latent_dim, p).transpose(0, 2, 1).astype(np.float32).copy()

    # ------------------------------------------------------------------ transform
    def _encode(self, flux, ivar, cond):
        parts = [self._solve(flux[s], ivar[s], cond[s]) for s in self._batches(len(flux))]
        return (np.concatenate([q[0] for q in parts]), np.concatenate([q[1] for q in parts]), None)

    def transform(self, flux, ivar=None, cond=None) -> np.ndarray:
        """Whitened tags (N, d): rank them with L2 (the pooled Mahalanobis distance)."""
        if self.whitening_ is None:
            raise InputError("this LinearLatent is not fitted; call fit() first")
        flux, ivar, ok = _check(flux, ivar)
        cond = _check_cond(cond, len(flux), len(self.condition), self.condition)
        out = np.full((len(flux), self.latent_dim), np.nan, np.float32)
        if ok.any():
            z, _, _ = self._encode(flux[ok], ivar[ok], cond[ok])
            out[ok] = z @ self.whitening_
        return out


def _variance_floor(excess: np.ndarray) -> float:
    """Smallest model variance a pixel may get: a thousandth of the median (no pixel is perfect)."""
    positive = excess[excess > 0]
    return 1e-3 * float(np.median(positive)) if positive.size else 1e-12


def _load(path):
    from chemtwin.data.dataset import open_dataset
    from chemtwin.spectral_models.labels import CHEMICAL_LABELS

    with open_dataset(path) as ds:
        b = ds.read(0, ds.n_stars)
        cols = ds.label_columns(("TEFF", "LOGG"))
        return (np.asarray(b.flux), np.asarray(b.ivar), np.asarray(b.labels)[:, cols], np.asarray(b.group),
                np.asarray(ds.true_labels(CHEMICAL_LABELS)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="linear_latent_probe.json")
    parser.add_argument("--work", default=None, help="folder for the datasets (default: a temporary one)")
    parser.add_argument("--train-pairs", type=int, default=3000)
    parser.add_argument("--val-pairs", type=int, default=1500)
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument("--iterations", type=int, default=3, help="ALS iterations after each start (default 3)")
    args = parser.parse_args()

    from chemtwin.core.ranks import doppelganger_ranks
    from chemtwin.data.generate import generate_dataset

    def rank0(model, val):
        tags = model.transform(*val[:3])
        return float(np.mean(doppelganger_ranks(tags, val[3], metric="l2", progress=False).rank == 0))

    out = {"machine": machine(), "args": vars(args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        paths = {"train": (work / "train.h5", args.train_pairs, 0), "val": (work / "val.h5", args.val_pairs, 1)}
        for path, pairs, seed in paths.values():
            if not path.exists():
                generate_dataset(path, pairs, snr=args.snr, seed=seed, progress=False)
        train, val = _load(paths["train"][0]), _load(paths["val"][0])
        chem = train[4]
        z_true = (chem - chem.mean(0)) / chem.std(0)
        runs = [("unsupervised", 20, 0, None), ("unsupervised", 20, args.iterations, None),
                ("J on true abundances", chem.shape[1], 0, z_true),
                ("J on true abundances", chem.shape[1], args.iterations, z_true)]
        for start, dim, iterations, z in runs:
            t = time.monotonic()
            model = LinearLatent(latent_dim=dim, n_iter=iterations).fit(*train[:3], z_true=z)
            row = {"start": start, "latent_dim": dim, "als_iterations": iterations, "fit_s": time.monotonic() - t,
                   "rank0": rank0(model, val), "chi2_per_pixel": [h["chi2_per_pixel"] for h in model.history_]}
            print(json.dumps(row), flush=True)
            out["runs"].append(row)
            Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
