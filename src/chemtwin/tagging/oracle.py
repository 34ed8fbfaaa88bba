"""The Cramer-Rao oracle: the best twin retrieval any unbiased method can reach (science.md section 3).

On synthetic data the forward model is known exactly, so the smallest covariance with
which any unbiased estimator can recover a star's labels from its spectrum is the
inverse Fisher matrix.  With ``J = d flux / d labels`` (P x 21, every label free:
TEFF, LOGG, VMICRO, VMACRO and the 17 abundances) and per-pixel inverse variance ``w``,

    F = J^T diag(w) J,        C = [F^-1]_chem          (17 x 17: FE_H and the 16 X_FE)

That is the bound from the spectrum alone.  A method given TEFF/LOGG with its spectrum (the
bench's protocols) has more: ``given`` labels add 1/sigma^2 to F's diagonal (the information
in a quoted TEFF_ERR, LOGG_ERR), and a label given exactly is held at its true value.

The oracle draws each star's abundance estimate as ``truth + L z`` (``L L^T = C``, ``z``
standard normal from ``seed``), then ranks twins in the *whitened* abundance space:
``t = W^-1 x`` with ``W`` the Cholesky factor of the mean of ``C`` over the stars (the
pooled measurement noise).  Why whitened: the abundances have very different
precisions (S or V a few x 0.1 dex at SNR 100, FE_H a few 0.001 dex), so a plain
distance would be dominated by the noisiest elements; in whitened coordinates the L2
distance is the Mahalanobis distance of the noise, whose square is (up to a constant)
-2 log-likelihood that two noisy estimates share one true abundance vector.  A per-pair ``C_i + C_j`` would be slightly
better for a single pair but gives no common space in which to rank (or cluster) all
stars, so the pooled covariance is used.  Its default metric is therefore ``l2``
(Mahalanobis), unlike the ``l1`` of the other methods (``metric=`` changes it).

Details (docs/oracle.md):

* ``J`` is exact autograd.  Forward-mode AD does not run through the synthesizer's
  sparse CSR matrix, so each column is a Jacobian-vector product written as the gradient
  of a vector-Jacobian product with respect to its cotangent (the "double-vjp" trick).
  It is taken on the oversampled line depth, before macroturbulence, line-spread
  function and binning (``LineSynthesizer.line_saturation``); that last step is linear
  with a kernel of unit sum, so it is applied afterwards to all 21 columns in one
  grouped convolution, and only its own VMACRO derivative (a dense forward-mode JVP)
  is added.  This is 1.4-1.6x faster than the double-vjp through the whole synthesizer,
  whose grouped-convolution double backward loops over stars.  float32 is accurate to
  a few 1e-6 relative on the Cramer-Rao sigmas (checked against float64), so it is the default.
* ``ivar = 0`` pixels carry no information and drop out; a star with ``ivar = +inf``
  (noiseless) has covariance 0, so the oracle returns its true abundances; a star mixing
  infinite and finite ivar is an error.  A star whose ivar is zero everywhere gets NaN
  (left out of the ranks, as for every method).
* Conditioning: TEFF in K makes ``F`` span ~8 orders of magnitude, so it is inverted
  as ``D (D F D)^-1 D`` with ``D = diag(F)^-1/2`` (every label in units of its own
  single-label Cramer-Rao sigma; condition numbers ~1e4 then).  A Fisher matrix that is
  still singular (relative eigenvalue < ``RCOND``: a label the spectrum does not
  constrain, e.g. every line of an element masked) raises InputError naming the star
  and the label; no ridge is added, so every reported covariance is the true bound.
* Cache: Jacobians are ~0.6 MB per star (15 GB for 25,000 stars), too big to keep, but
  the Fisher matrix at any SNR follows from the Gram matrix ``G = J^T diag(w / s) J``
  with ``s`` the star's largest finite ivar (``F = s G``; for noiseless stars ``w / s``
  is the indicator of the infinite pixels).  ``jacobian_file`` stores ``G`` per star
  with a digest of (labels, ivar pattern ``w / s``) and of the synthesizer (grid, source
  and line list): the same labels at SNR inf, 100, 50 and 30 share their digests, so
  the Jacobians are computed once; a star whose digest is not in the file (different
  labels, masks or synthesizer) is recomputed, never read from a stale entry.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import numbers
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.autograd.forward_ad as fwad
from tqdm.auto import tqdm

from chemtwin.core.threads import torch_threads
from chemtwin.data.spectra import check_ivar
from chemtwin.errors import InputError
from chemtwin.spectral_models.labels import (
    CHEMICAL_LABELS,
    LABEL_NAMES,
    check_in_range,
    default_vmacro,
    default_vmicro,
)
from chemtwin.spectral_models.linelist import DEFAULT_LINELIST, LEGACY_LINELIST
from chemtwin.spectral_models.lines import R_MAX, LineSynthesizer
from chemtwin.tagging.oracle_cache import (
    read_cache,
    star_digests,
    synthesizer_fingerprint,
    write_cache,
)

log = logging.getLogger(__name__)

__all__ = ["synthesizer_jacobian", "cramer_rao_covariance", "draw_abundances", "oracle_covariance", "check_given",
           "velocities_follow_logg", "GENERATOR", "RCOND"]

GENERATOR = "chemtwin.lines"  # the `generator` attribute of datasets made by the embedded synthesizer
RCOND = 1e-10  # smallest eigenvalue / largest of the scaled Fisher matrix before it counts as singular
CHEM_COLUMNS = [LABEL_NAMES.index(name) for name in CHEMICAL_LABELS]
VMACRO_COLUMN = LABEL_NAMES.index("VMACRO")
VMICRO_COLUMN = LABEL_NAMES.index("VMICRO")
LOGG_COLUMN = LABEL_NAMES.index("LOGG")
# Augmentations that change the spectrum itself (no longer the synthesizer's flux at the labels);
# noise, telluric masks and bad pixels only change ivar and are fine.
_SPECTRUM_CHANGING_AUGMENTS = ("rv_max", "vsini_max", "vmacro_max", "persistence")
# Label columns that reach the line depth: all but VMACRO, which only enters the broadening.
LINE_COLUMNS = [k for k in range(len(LABEL_NAMES)) if k != VMACRO_COLUMN]
READ_ROWS = 1024  # stars of ivar read at a time (30 MB on the ASPCAP grid)


# ---------------------------------------------------------------------- Jacobian
_FORWARD_AD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _synthesizer(grid: str, dtype: torch.dtype) -> LineSynthesizer:
    # The first dual tensor makes torch script its forward-AD decompositions, which warns
    # (DeprecationWarning, torch's own); do it here, in the calling thread, where silencing
    # the warning is safe (warning filters are process-wide, not thread-local).
    with warnings.catch_warnings(), fwad.dual_level():
        warnings.simplefilter("ignore", DeprecationWarning)
        fwad.make_dual(torch.zeros(1), torch.zeros(1))
    return LineSynthesizer(grid=grid, dtype=dtype)


def _batch_jacobian(synth: LineSynthesizer, labels: torch.Tensor) -> torch.Tensor:
    """d flux / d labels (B, P, 21) for a batch of stars (B, 21).  flux = 1 - R_MAX * broaden(y, labels)
    with y the line saturation: the line columns go through the linear broadening afterwards."""
    batch = labels.shape[0]
    x = labels.detach().clone().requires_grad_(True)
    y = synth.line_saturation(x)  # (B, n_os)
    # Double-vjp: vjp(c) = J^T c is linear in c, so d/dc [vjp(c)_k summed over stars] = column k of J.
    cotangent = torch.zeros_like(y, requires_grad=True)
    (vjp,) = torch.autograd.grad(y, x, grad_outputs=cotangent, create_graph=True)
    dy = torch.zeros((batch, len(LABEL_NAMES), y.shape[1]), dtype=y.dtype)
    for k in LINE_COLUMNS:
        dy[:, k] = torch.autograd.grad(vjp[:, k].sum(), cotangent, retain_graph=True)[0]
    del vjp, cotangent
    y = y.detach()
    x = x.detach()
    # Broadening is linear in y: one grouped convolution for every (star, label) row.
    jac = synth.broaden_and_bin(dy.reshape(batch * len(LABEL_NAMES), -1), x.repeat_interleave(len(LABEL_NAMES), 0))
    jac = -R_MAX * jac.reshape(batch, len(LABEL_NAMES), -1)
    # ... plus the broadening's own dependence on VMACRO (dense ops: forward mode works; its dual
    # level is process-wide, hence the lock between worker threads).
    tangent = torch.zeros_like(x)
    tangent[:, VMACRO_COLUMN] = 1.0
    with _FORWARD_AD_LOCK, fwad.dual_level():
        jac[:, VMACRO_COLUMN] -= R_MAX * fwad.unpack_dual(synth.broaden_and_bin(y, fwad.make_dual(x, tangent))).tangent
    return jac.transpose(1, 2)


def _check_labels(labels) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[1] != len(LABEL_NAMES):
        raise InputError(f"labels must be (N, {len(LABEL_NAMES)}) in the order {', '.join(LABEL_NAMES)}, "
                         f"got shape {labels.shape}")
    check_in_range(LABEL_NAMES, labels)
    return labels


def _map_jacobians(labels, consume, *, grid: str, batch_size: int, threads: int | None, dtype, progress: bool,
                   desc: str = "jacobian") -> None:
    """Call ``consume(rows, jac)`` for every batch of stars (``rows`` a slice, ``jac`` (b, P, 21)),
    batches spread over ``threads`` threads (torch releases the GIL; intra-op threads are set to 1
    meanwhile, as in chemtwin.data.generate.synthesize, because small batches gain nothing from them).
    ``consume`` runs in the worker thread, so large Jacobians never pile up."""

    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    labels = _check_labels(labels)
    threads = max(1, threads or min(2, os.cpu_count() or 1))
    synth = _synthesizer(grid, dtype)
    tensor = torch.as_tensor(labels, dtype=dtype)
    slices = [slice(a, min(a + batch_size, len(labels))) for a in range(0, len(labels), batch_size)]
    with tqdm(total=len(labels), unit="stars", desc=desc, disable=not progress, leave=False) as bar:
        def work(rows):
            consume(rows, _batch_jacobian(synth, tensor[rows]))
            bar.update(rows.stop - rows.start)

        with torch_threads(1), ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(work, slices))


def synthesizer_jacobian(labels, *, grid: str = "aspcap", batch_size: int = 32, threads: int | None = None,
                         dtype: torch.dtype = torch.float32, progress: bool = True) -> np.ndarray:
    """d flux / d label of the embedded LineSynthesizer at each star's labels.

    ``labels`` (N, 21) in LABEL_NAMES order, physical units (TEFF in K).  Returns (N, P, 21)
    float32: 0.6 MB per star on the ASPCAP grid, so for many stars use
    :func:`evaluate_oracle`, which reduces each batch to its Fisher matrix as it goes.
    ``threads`` worker threads (default min(2, CPUs)); ``dtype`` of the computation.
    """
    labels = _check_labels(labels)
    synth = _synthesizer(grid, dtype)
    out = np.empty((len(labels), len(synth.wavelength), len(LABEL_NAMES)), np.float32)

    def store(rows, jac):
        out[rows] = jac.numpy()

    _map_jacobians(labels, store, grid=grid, batch_size=batch_size, threads=threads, dtype=dtype, progress=progress)
    return out


# ---------------------------------------------------------------------- Fisher -> covariance
def _ivar_pattern(ivar, row0: int = 0, source: str = "ivar") -> tuple[np.ndarray, np.ndarray]:
    """Per star: the scale ``s`` (largest finite ivar; inf when noiseless; 0 when nothing is
    usable) and the relative weights ``w / s`` (the indicator of the infinite pixels when noiseless)."""
    ivar = np.asarray(ivar)
    check_ivar(ivar, row0, source)
    infinite = np.isinf(ivar)
    noiseless = infinite.any(axis=1)
    finite = np.where(infinite, 0.0, ivar)
    mixed = noiseless & (finite > 0).any(axis=1)
    if mixed.any():
        n = int(np.flatnonzero(mixed)[0])
        raise InputError(f"{source}: star {row0 + n} mixes noiseless (ivar = inf) and noisy pixels; "
                         "the oracle needs one or the other")
    scale = np.where(noiseless, np.inf, finite.max(axis=1))
    divisor = np.where(noiseless | (scale == 0), 1, scale).astype(finite.dtype)
    weight = np.where(noiseless[:, None], infinite, finite / divisor[:, None])
    return scale.astype(np.float64), weight.astype(np.float32)


def _gram(jac: torch.Tensor, weight: np.ndarray) -> np.ndarray:
    """J^T diag(w) J per star in float64, (b, 21, 21)."""
    j = jac.to(torch.float64)
    w = torch.as_tensor(weight, dtype=torch.float64)
    return (j.transpose(1, 2) @ (j * w[:, :, None])).numpy()


def check_given(given) -> dict:
    """``given`` ({label: 1-sigma} or ((label, 1-sigma), ...)) as a dict, or InputError: non-chemical
    labels only, each sigma a finite number >= 0 whose 1/sigma^2 is finite (0: given exactly)."""
    try:
        given = dict(given)
    except (TypeError, ValueError):
        raise InputError(f"given labels must be label -> 1-sigma pairs, got {given!r}", "given_labels") from None
    allowed = [name for name in LABEL_NAMES if name not in CHEMICAL_LABELS]
    if any(name not in allowed for name in given):
        raise InputError(f"given labels must be non-chemical labels ({', '.join(allowed)}), got {', '.join(given)}",
                         "given_labels")
    for name, sigma in given.items():
        real = isinstance(sigma, numbers.Real) and not isinstance(sigma, bool)
        # the prior 1/sigma^2 must be finite: a label known exactly is given as 0, not as a tiny sigma
        if not (real and 0 <= sigma < math.inf and (sigma == 0 or 0 < float(sigma) ** 2 and
                                                    math.isfinite(1.0 / float(sigma) ** 2))):
            raise InputError(f"the error of a given label must be a finite number >= 0 with a finite 1/sigma^2 "
                             f"(0: exactly), got {name} = {sigma!r}", "given_labels")
    return {name: float(sigma) for name, sigma in given.items()}


def _given_columns(given) -> tuple[list[int], np.ndarray]:
    """The labels left free and the prior information on each, from ``given`` (:func:`check_given`).
    Exact labels are held at their true values (dropped); the others get 1/sigma^2 on the Fisher diagonal."""
    given = check_given(given)
    free = [k for k, name in enumerate(LABEL_NAMES) if given.get(name) != 0]
    prior = np.array([1.0 / given[LABEL_NAMES[k]] ** 2 if LABEL_NAMES[k] in given else 0.0 for k in free])
    return free, prior


def _tie_velocities(gram: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The Gram matrices in the labels (..., LOGG, dVMICRO, dVMACRO, ...) with VMICRO = f(LOGG) +
    dVMICRO, VMACRO = g(LOGG) + dVMACRO (the synthesizer's relations): the LOGG column becomes
    J_LOGG + f' J_VMICRO + g' J_VMACRO.  With dVMICRO = dVMACRO = 0 held (given exactly) this is
    the Fisher matrix of a population whose velocities follow LOGG, as the generator's default does."""
    logg = labels[:, LOGG_COLUMN]
    step = 1e-4
    t = np.broadcast_to(np.eye(len(LABEL_NAMES)), gram.shape).copy()
    for column, relation in ((VMICRO_COLUMN, default_vmicro), (VMACRO_COLUMN, default_vmacro)):
        t[:, column, LOGG_COLUMN] = (relation(logg + step) - relation(logg - step)) / (2 * step)
    return np.einsum("nki,nkl,nlj->nij", t, gram, t)


def velocities_follow_logg(labels: np.ndarray) -> bool:
    """Whether every star's VMICRO and VMACRO are the synthesizer's relations of its LOGG (no scatter)."""
    logg = labels[:, LOGG_COLUMN]
    return bool(np.allclose(labels[:, VMICRO_COLUMN], default_vmicro(logg), rtol=0, atol=1e-4)
                and np.allclose(labels[:, VMACRO_COLUMN], default_vmacro(logg), rtol=0, atol=1e-4))


def _covariance_from_gram(gram: np.ndarray, scale: np.ndarray, row0: int = 0,
                          source: str = "data", given=()) -> np.ndarray:
    """Chemical block of (s G + P)^-1 per star over the free labels, P the prior information of
    the ``given`` labels (:func:`_given_columns`): 0 for s = inf, NaN for s = 0 (no usable pixel)."""
    free, prior = _given_columns(given)
    names = [LABEL_NAMES[k] for k in free]
    chem = [free.index(k) for k in CHEM_COLUMNS]
    n_stars = len(gram)
    out = np.full((n_stars, len(CHEM_COLUMNS), len(CHEM_COLUMNS)), np.nan)
    usable = scale > 0
    if not usable.any():
        return out
    s = scale[usable]
    # in units of the scale: G + P / s, so that (G + P / s)^-1 / s = (s G + P)^-1 (no prior when noiseless)
    g = gram[usable][:, free][:, :, free] + np.einsum("n,k,kj->nkj", 1.0 / s, prior, np.eye(len(free)))
    diag = np.einsum("nii->ni", g)
    dead = ~(diag > 0)
    if dead.any():
        n, k = np.argwhere(dead)[0]
        raise InputError(f"{source}: star {row0 + int(np.flatnonzero(usable)[n])}: its spectrum does not depend on "
                         f"{names[k]} at any usable pixel (singular Fisher matrix)")
    d = 1.0 / np.sqrt(diag)
    scaled = g * d[:, :, None] * d[:, None, :]
    eigval, eigvec = np.linalg.eigh(scaled)
    singular = eigval[:, 0] < RCOND * eigval[:, -1]
    if singular.any():
        n = int(np.flatnonzero(singular)[0])
        k = int(np.argmax(np.abs(eigvec[n, :, 0])))
        raise InputError(f"{source}: star {row0 + int(np.flatnonzero(usable)[n])}: singular Fisher matrix "
                         f"(eigenvalue ratio {eigval[n, 0] / eigval[n, -1]:.1e}); its spectrum does not "
                         f"constrain {names[k]} independently of the other labels")
    inv = np.einsum("nik,nk,njk->nij", eigvec, 1.0 / eigval, eigvec) * d[:, :, None] * d[:, None, :]
    cov = np.where(np.isinf(s)[:, None, None], 0.0, inv / np.where(np.isinf(s), 1.0, s)[:, None, None])
    cov = cov[:, chem][:, :, chem]
    out[usable] = 0.5 * (cov + cov.transpose(0, 2, 1))
    return out


def cramer_rao_covariance(jacobian, ivar, given=()) -> np.ndarray:
    """Cramer-Rao covariance of the chemical labels (FE_H + 16 X_FE), (N, 17, 17), float64.

    ``jacobian`` (N, P, 21) from :func:`synthesizer_jacobian`; ``ivar`` (N, P), or (P,) or a
    number for all stars.  The chemical block of ``inv(J^T diag(ivar) J + P)``: every label free
    by default (P = 0); ``given`` ({label: 1-sigma}, non-chemical labels) is the bound for a method
    given those labels with those errors: 1/sigma^2 on P's diagonal, a label given exactly
    (sigma 0) held at its true value.
    ivar = 0 pixels are ignored, ivar = inf gives 0, all-zero ivar gives NaN; a singular
    Fisher matrix raises InputError naming the star and label (see the module docstring).
    """
    jac = torch.as_tensor(np.asarray(jacobian))
    if jac.ndim != 3 or jac.shape[2] != len(LABEL_NAMES):
        raise InputError(f"jacobian must be (N, P, {len(LABEL_NAMES)}), got {tuple(jac.shape)}")
    ivar = np.asarray(ivar, dtype=np.float64)
    if ivar.ndim <= 1:
        ivar = np.broadcast_to(ivar, jac.shape[:2])
    if ivar.shape != tuple(jac.shape[:2]):
        raise InputError(f"ivar must be (N, P) = {tuple(jac.shape[:2])}, (P,) or a number, got {ivar.shape}")
    scale, weight = _ivar_pattern(ivar)
    return _covariance_from_gram(_gram(jac, weight), scale, source="jacobian", given=check_given(given))


def draw_abundances(labels, covariance, seed: int = 0) -> np.ndarray:
    """Oracle estimates ``truth + L z`` (N, 17) for FE_H and the 16 X_FE, ``L L^T`` = covariance.

    ``labels`` (N, 21) in LABEL_NAMES order, or (N, 17) chemical labels only; ``covariance``
    (N, 17, 17).  ``z`` comes from ``numpy.random.default_rng(seed)``, one row per star whatever
    the others are, so the same seed gives the same draws.  Zero covariance (noiseless) gives
    the truth; NaN covariance gives NaN."""
    labels = np.asarray(labels, dtype=np.float64)
    cov = np.asarray(covariance, dtype=np.float64)
    n_chem = len(CHEM_COLUMNS)
    if labels.ndim == 2 and labels.shape[1] == len(LABEL_NAMES):
        labels = labels[:, CHEM_COLUMNS]
    if labels.ndim != 2 or labels.shape[1] != n_chem or cov.shape != (len(labels), n_chem, n_chem):
        raise InputError(f"need labels (N, {len(LABEL_NAMES)}) or (N, {n_chem}) and covariance (N, {n_chem}, {n_chem}); "
                         f"got {labels.shape} and {cov.shape}")
    z = np.random.default_rng(seed).standard_normal(labels.shape)
    out = np.full(labels.shape, np.nan)
    zero = np.isfinite(cov).all(axis=(1, 2)) & (cov == 0).all(axis=(1, 2))
    out[zero] = labels[zero]
    noisy = np.isfinite(cov).all(axis=(1, 2)) & ~zero
    if noisy.any():
        try:
            chol = np.linalg.cholesky(cov[noisy])
        except np.linalg.LinAlgError:
            bad = np.flatnonzero(noisy)[np.argmin(np.linalg.eigvalsh(cov[noisy])[:, 0])]
            raise InputError(f"covariance of star {int(bad)} is not positive definite") from None
        out[noisy] = labels[noisy] + np.einsum("nij,nj->ni", chol, z[noisy])
    return out


# ---------------------------------------------------------------------- evaluation
def _check_generated(ds) -> str:
    attrs = getattr(ds, "attrs", {}) or {}
    generator = attrs.get("generator")
    if generator != GENERATOR:
        raise InputError(f"{ds.path}: made by {generator!r}, not by the embedded synthesizer ({GENERATOR}); the "
                         "Cramer-Rao oracle needs the true forward model of the spectra")
    linelist = attrs.get("linelist", LEGACY_LINELIST)
    if linelist != DEFAULT_LINELIST:
        raise InputError(f"{ds.path}: made with the {linelist!r} line list; the Cramer-Rao oracle computes with the "
                         f"default ({DEFAULT_LINELIST!r})")
    if "augment" in attrs:
        try:
            config = json.loads(attrs["augment"])
        except (TypeError, ValueError):
            config = {k: 1 for k in _SPECTRUM_CHANGING_AUGMENTS}
        changed = [k for k in _SPECTRUM_CHANGING_AUGMENTS if float(config.get(k) or 0) > 0]
        if changed:
            raise InputError(f"{ds.path}: augmented with {', '.join(changed)}: its spectra are no longer the "
                             "synthesizer's at the labels, so the Cramer-Rao oracle does not apply")
    return str(attrs.get("grid", "aspcap"))


def _fisher_grams(ds, labels: np.ndarray, grid: str, *, jacobian_file, batch_size: int, threads, progress: bool):
    """Gram matrices (N, 21, 21) and ivar scales (N,) of every star, through the cache.

    Two streaming passes over ivar, block by block (memory stays at one block): digests
    first, then the Jacobians of the stars the cache does not hold."""
    n, read = ds.n_stars, READ_ROWS
    scale = np.empty(n)
    digest = np.empty((n, 16), np.uint8)
    for b in ds.iter_batches(read):
        rows = slice(b.start, b.start + len(b.ivar))
        scale[rows], w = _ivar_pattern(np.asarray(b.ivar), b.start, str(ds.path))
        digest[rows] = star_digests(labels[rows], w)
    fingerprint = synthesizer_fingerprint(grid)
    cache_path = Path(jacobian_file) if jacobian_file is not None else None
    cached = read_cache(cache_path, fingerprint) if cache_path is not None else {}
    gram = np.full((n, len(LABEL_NAMES), len(LABEL_NAMES)), np.nan)
    todo = np.zeros(n, bool)
    for i in range(n):
        g = cached.get(digest[i].tobytes())
        if g is not None:
            gram[i] = g
        else:
            todo[i] = scale[i] > 0  # stars with no usable pixel need no Jacobian
    stats = {"path": str(cache_path) if cache_path else None, "grid": grid, "reused": int((~todo & (scale > 0)).sum()),
             "computed": int(todo.sum()), "seconds": 0.0}
    if todo.any():
        t0 = time.perf_counter()
        with tqdm(total=stats["computed"], unit="stars", desc="oracle jacobians", disable=not progress) as bar:
            for b in ds.iter_batches(read):
                index = b.start + np.flatnonzero(todo[b.start : b.start + len(b.ivar)])
                if not index.size:
                    continue
                weight = _ivar_pattern(np.asarray(b.ivar)[index - b.start])[1]
                sub = np.empty((len(index), len(LABEL_NAMES), len(LABEL_NAMES)))

                def reduce(rows, jac, sub=sub, weight=weight):
                    sub[rows] = _gram(jac, weight[rows])

                _map_jacobians(labels[index], reduce, grid=grid, batch_size=batch_size, threads=threads,
                               dtype=torch.float32, progress=False)
                gram[index] = sub
                bar.update(len(index))
        stats["seconds"] = round(time.perf_counter() - t0, 3)
        stats["stars_per_s"] = round(stats["computed"] / max(stats["seconds"], 1e-9), 2)
        if cache_path is not None:
            ok = scale > 0
            write_cache(cache_path, fingerprint, grid, digest[ok], gram[ok])
    log.info("oracle: %d Fisher matrices from the cache, %d computed (%.1f s)", stats["reused"], stats["computed"],
             stats["seconds"])
    return gram, scale, stats


def oracle_covariance(ds, *, jacobian_file=None, batch_size: int = 32, threads: int | None = None,
                      progress: bool = True, given=()) -> tuple[np.ndarray, np.ndarray, dict]:
    """Cramer-Rao covariance (N, 17, 17) of every star of an open dataset made by ``chemtwin
    generate``, with its true labels (N, 21) and cache statistics; the Jacobians go through
    ``jacobian_file``.  ``given``: {label: 1-sigma} of the non-chemical labels a method is given
    (:func:`cramer_rao_covariance`; the bench's paper protocol gives TEFF/LOGG exactly, its survey
    protocol with the errors a survey quotes); the others are free.  When every star's VMICRO and
    VMACRO are the synthesizer's relations of its LOGG (the generator's default population), they
    are not free parameters of the data: they follow LOGG (:func:`_tie_velocities`), and
    ``stats["velocities"]`` says so ("tied to LOGG" or "free")."""
    given = check_given(given)
    grid = _check_generated(ds)
    labels = np.asarray(ds.true_labels(list(LABEL_NAMES)), dtype=np.float64)  # a survey's errors are not the oracle's
    synth_pixels = len(_synthesizer(grid, torch.float32).wavelength)
    if ds.n_pixels != synth_pixels:
        raise InputError(f"{ds.path}: {ds.n_pixels} pixels, but the synthesizer on grid {grid!r} has {synth_pixels}")
    gram, scale, stats = _fisher_grams(ds, labels, grid, jacobian_file=jacobian_file, batch_size=batch_size,
                                       threads=threads, progress=progress)
    tied = velocities_follow_logg(labels)
    stats["velocities"] = "tied to LOGG" if tied else "free"
    if tied:
        given = {**given, "VMICRO": 0.0, "VMACRO": 0.0}  # their offsets from the relations, held at 0
    cov = np.full((ds.n_stars, len(CHEM_COLUMNS), len(CHEM_COLUMNS)), np.nan)
    for a in range(0, ds.n_stars, 4096):
        block = slice(a, a + 4096)
        g = _tie_velocities(gram[block], labels[block]) if tied else gram[block]
        cov[block] = _covariance_from_gram(g, scale[block], a, str(ds.path), given)
    return cov, labels, stats
