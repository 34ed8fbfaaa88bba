"""The Cannon's numerics, vectorized over pixels (training) and over stars (the test step).

Training maximizes the per-pixel likelihood
``-2 ln L_p = sum_n (f_np - theta_p . v_n)^2 / (sigma_np^2 + s_p^2) + ln(sigma_np^2 + s_p^2)``
by alternating, for all pixels at once, (1) weighted least squares for theta with weights
1/(sigma^2 + s^2) (``wls``: normal matrices of every pixel from one matrix product) and (2) the
exact 1-D minimization in s^2 (``fit_s2``: bracketed Newton on the derivative, vectorized
over pixels).  The test step fits each star's labels by Levenberg-Marquardt on the quadratic
form chi^2 = c - 2 b.v + v.G v (``levenberg_marquardt``), from starting points screened by
chi^2 (``linear_estimate`` among them).  Work is spread over threads with BLAS held to one
thread (``parallel_map``).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from chemtwin.tagging.cannon.vectorizer import PolynomialVectorizer, monomials

log = logging.getLogger(__name__)
# ivar = inf marks a noiseless pixel (project convention); the Cannon counts it as
# sigma = 1e-6, far below any real noise, so that every weight stays finite.  (Its noise
# model adds the intrinsic scatter to 1/ivar: it needs variances, not the relative weights
# of chemtwin.data.spectra.ivar_weights.)
IVAR_CAP = 1e12


def linear_estimate(vec: PolynomialVectorizer, G, b) -> np.ndarray | None:
    """Starting labels from linear algebra: solve G v = b for an unconstrained design
    vector v and read the scaled labels off its linear terms.  (S, L), or None when
    the model has no linear term for some label."""
    rows = []
    for k in range(vec.n_labels):
        unit = np.zeros(vec.n_labels, dtype=vec.terms.dtype)
        unit[k] = 1
        hit = np.flatnonzero(np.all(vec.terms == unit, axis=1))
        if hit.size == 0:
            return None
        rows.append(int(hit[0]))
    d = np.sqrt(np.diagonal(G, axis1=1, axis2=2))
    d = np.where(d > 0, d, 1.0)
    A = G / d[:, :, None] / d[:, None, :] + 1e-9 * np.eye(G.shape[1])
    try:
        v = np.linalg.solve(A, (b / d)[..., None])[..., 0] / d
    except np.linalg.LinAlgError:
        return None
    z = v[:, rows]
    return np.clip(np.where(np.isfinite(z), z, 0.0), -1.5, 1.5)






def _block(flux, ivar, cols) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 copies of the columns ``cols`` (a slice), flux zeroed where ivar = 0, and the good mask."""
    iv = np.minimum(ivar[:, cols], IVAR_CAP, dtype=np.float64)
    good = iv > 0
    f = np.where(good, flux[:, cols], 0.0)
    return f, iv, good


class Design:
    """The training design matrix X (N, T) and the distinct products of its columns.

    ``products`` (N, M) holds each distinct monomial v_t v_u once; ``index`` (T, T)
    says which column is v_t v_u.  A pixel's normal matrix X^T W X is then
    ``(W^T products)[index]``.
    """

    def __init__(self, vec: PolynomialVectorizer, z: np.ndarray):
        self.X = vec.design_from_scaled(z)
        exponents, self.index = vec.product_terms()
        self.products = monomials(z, exponents)


def _wls(design: Design, F, W, term_mask):
    """Weighted least squares for every pixel of a block at once.

    F, W (N, B) flux and weights; term_mask (B, T).  Returns theta (B, T).
    """
    X = design.X
    n_terms = X.shape[1]
    A = (W.T @ design.products)[:, design.index]  # (B, T, T): all normal matrices from one product
    rhs = (W * F).T @ X  # (B, T)
    if term_mask is not None and not term_mask.all():
        off = ~term_mask
        A[off[:, :, None] | off[:, None, :]] = 0.0
        A[:, np.arange(n_terms), np.arange(n_terms)] += off
        rhs[off] = 0.0
    d = np.sqrt(np.diagonal(A, axis1=1, axis2=2))
    d = np.where(d > 0, d, 1.0)
    A /= d[:, :, None]
    A /= d[:, None, :]
    rhs /= d
    try:
        sol = np.linalg.solve(A, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        sol = (np.linalg.pinv(A, hermitian=True) @ rhs[..., None])[..., 0]
    return sol / d


def fit_s2(r2, ivar, s2_start, var_scale, tol, max_iter=60):
    """Per-pixel maximum-likelihood intrinsic scatter, all pixels at once.

    Minimizes sum_n r2_n/(v_n + s2) + ln(v_n + s2) over s2 >= 0 (v = 1/ivar; entries
    with ivar = 0 drop out).  The root of the derivative g(s2) = sum d (1 - r2 d),
    d = 1/(v + s2), is found by Newton's method kept inside a bracket [lo, hi]
    (bisection when Newton leaves it); g(max r2) >= 0, so the root lies in [0, max r2],
    and g(0) >= 0 means s2 = 0.  r2, ivar: (N, B).  Returns s2 (B,).
    """
    s2 = np.zeros(r2.shape[1])
    g0 = np.einsum("np,np->p", ivar, 1.0 - r2 * ivar)
    todo = np.flatnonzero(g0 < 0)
    if todo.size == 0:
        return s2
    # The iterations run in float32 (twice the SIMD width, half the memory traffic):
    # the root moves by ~1e-6 (sigma^2 + s2), far below the tolerance.
    R, I = r2[:, todo].astype(np.float32), ivar[:, todo].astype(np.float32)
    lo = np.zeros(todo.size)
    hi = R.max(axis=0).astype(np.float64)
    x = np.clip(s2_start[todo], 0.0, hi)
    x = np.where(x > 0, x, 0.5 * hi)
    scale = var_scale[todo]
    active = np.arange(todo.size)  # positions in todo; R, I hold exactly these columns
    d = np.empty_like(R)
    q = np.empty_like(R)
    for _ in range(max_iter):
        xa = x[active]
        np.multiply(I, xa.astype(np.float32), out=d)
        d += 1.0
        np.divide(I, d, out=d)  # d = 1 / (v + s2)
        np.multiply(R, d, out=q)
        q *= d  # q = r2 d^2
        sd, sq = d.sum(axis=0, dtype=np.float64), q.sum(axis=0, dtype=np.float64)
        g = sd - sq
        h = 2.0 * np.einsum("np,np->p", q, d, dtype=np.float64) - np.einsum("np,np->p", d, d, dtype=np.float64)
        neg = g < 0
        la = lo[active] = np.where(neg, xa, lo[active])
        ha = hi[active] = np.where(neg, hi[active], xa)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = xa - g / h
        new = np.where((h > 0) & (newton > la) & (newton < ha), newton, 0.5 * (la + ha))
        x[active] = new
        done = (np.abs(new - xa) <= tol * (new + scale[active])) | (ha - la <= tol * (la + scale[active]))
        if done.all():
            break
        if done.any():
            active = active[~done]
            R, I = R[:, ~done], I[:, ~done]
            d, q = d[:, ~done], q[:, ~done]
    s2[todo] = x
    return s2


def train_pixels(design, flux, ivar, columns, term_mask, fit_scatter, max_iter, tol, n_jobs=1, block_pixels=None):
    """theta (C, T) and s2 (C,) for the pixel ``columns`` (C,) of flux/ivar (N, P).

    Pixels are independent; they are processed in blocks of columns sized to stay in
    the CPU cache (each block fully vectorized), spread over ``n_jobs`` threads.
    """
    n_stars = flux.shape[0]
    n_cols = columns.size
    if block_pixels is None:
        block_pixels = int(np.clip(2**18 // max(n_stars, 1), 16, 4096))  # ~2 MB per float64 array

    def train(a):
        sel = slice(a, min(a + block_pixels, n_cols))
        cols = columns[sel]
        if cols[-1] - cols[0] == cols.size - 1:  # contiguous: a view, not a fancy-index copy
            cols = slice(int(cols[0]), int(cols[-1]) + 1)
        f, iv, good = _block(flux, ivar, cols)
        return _train_block(design, f, iv, good, term_mask[sel], fit_scatter, max_iter, tol)

    parts = parallel_map(train, range(0, n_cols, block_pixels), n_jobs)
    unconverged = sum(p[2] for p in parts)
    if unconverged:
        log.warning("the Cannon's training did not converge at %d pixel(s) in %d rounds", unconverged, max_iter)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def resolve_jobs(n_jobs) -> int:
    """Threads to use: None or -1 = every CPU this process may run on."""
    if n_jobs is None or n_jobs < 0:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1
    return max(1, int(n_jobs))


def parallel_map(func, items, n_jobs) -> list:
    """``[func(x) for x in items]`` on ``n_jobs`` threads (NumPy releases the GIL).

    BLAS is held to one thread meanwhile, so threads do not fight over the cores.
    """
    items = list(items)
    n = min(resolve_jobs(n_jobs), len(items))
    if n <= 1:
        return [func(x) for x in items]
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(n) as pool:
        return list(pool.map(func, items))


def _train_block(design, F, IV, good, term_mask, fit_scatter, max_iter, tol):
    """Alternate WLS for theta and the 1-D s2 fit on one block of pixels (N, B).

    Returns theta (B, T), s2 (B,) and the number of pixels still moving after
    ``max_iter`` rounds.
    """
    n_pix = F.shape[1]
    X = design.X
    theta = _wls(design, F, IV, term_mask)
    s2 = np.zeros(n_pix)
    if not fit_scatter:
        return theta, s2, 0
    n_good = good.sum(axis=0)
    # typical sigma^2 of a pixel (harmonic mean): the scale of convergence tests
    var_scale = n_good / np.maximum(IV.sum(axis=0), 1e-300)
    # pixels whose stars all share one ivar: theta does not depend on s2
    homoscedastic = np.where(good, IV, np.inf).min(axis=0) == IV.max(axis=0)
    active = np.arange(n_pix)
    f, iv, gd = F, IV, good
    for it in range(max(1, max_iter)):
        r = f - X @ theta[active].T
        r *= r
        r2 = np.where(gd, r, 0.0)
        if it == 0:
            # moment estimate mean(r^2) - sigma^2: the exact answer where all sigmas are
            # equal, the starting point elsewhere
            new = np.maximum(r2.sum(axis=0) / n_good - var_scale, 0.0)
            het = np.flatnonzero(~homoscedastic)
            if het.size:
                new[het] = fit_s2(r2[:, het], iv[:, het], new[het], var_scale[het], tol=0.1 * tol)
        else:  # only heteroscedastic pixels are left
            new = fit_s2(r2, iv, s2[active], var_scale[active], tol=0.1 * tol)
        refit = (np.abs(new - s2[active]) > tol * (new + var_scale[active])) & ~homoscedastic[active]
        s2[active] = new
        if not refit.any():
            return theta, s2, 0
        active = active[refit]
        f, iv, gd = f[:, refit], iv[:, refit], gd[:, refit]
        theta[active] = _wls(design, f, iv / (1.0 + iv * s2[active]), term_mask[active])
    return theta, s2, active.size


def levenberg_marquardt(vec: PolynomialVectorizer, G, b, c, z, max_iter):
    """Minimize chi2(z) = c - 2 b.v(z) + v(z).G v(z) for B problems at once.

    G (B, T, T), b (B, T), c (B,), z (B, L) starting scaled labels.  Returns the best
    z (B, L), chi2 (B,), the Gauss-Newton matrix J^T W J (B, L, L) at z, converged (B,).
    Steps are accepted on the chi^2 change computed as (v1 - v0).(G (v1 + v0) - 2 b),
    which keeps its digits when chi^2 itself is a small difference of large numbers.
    """
    n_prob, n_labels = z.shape
    eye = np.eye(n_labels)

    def evaluate(zz, GG, bb):
        v, dv = vec.jacobian_from_scaled(zz)  # (B, T), (B, T, L)
        dvT = dv.transpose(0, 2, 1)
        Gv = (GG @ v[..., None])[..., 0]
        grad = (dvT @ (bb - Gv)[..., None])[..., 0]  # J^T W r
        H = dvT @ (GG @ dv)  # J^T W J
        return v, Gv, grad, H

    v, Gv, grad, H = evaluate(z, G, b)
    chi2 = c - 2.0 * np.einsum("bt,bt->b", b, v) + np.einsum("bt,bt->b", v, Gv)
    lam = np.full(n_prob, 1e-3)
    converged = np.zeros(n_prob, dtype=bool)
    active = np.arange(n_prob)
    for _ in range(max_iter):
        a = active
        Ha = H[a]
        diag = np.diagonal(Ha, axis1=1, axis2=2)
        damp = Ha + (lam[a][:, None] * np.maximum(diag, 1e-12))[:, :, None] * eye
        try:
            step = np.linalg.solve(damp, grad[a][..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = (np.linalg.pinv(damp, hermitian=True) @ grad[a][..., None])[..., 0]
        z_new = z[a] + step
        v_new, Gv_new, grad_new, H_new = evaluate(z_new, G[a], b[a])
        change = np.einsum("bt,bt->b", v_new - v[a], Gv_new + Gv[a] - 2.0 * b[a])
        better = np.isfinite(change) & (change <= 0)
        small = np.abs(step).max(axis=1) < 1e-9
        tiny_gain = -change <= 1e-10 * np.maximum(chi2[a], 1.0)
        acc = a[better]
        z[acc], v[acc], Gv[acc], grad[acc], H[acc] = z_new[better], v_new[better], Gv_new[better], grad_new[better], H_new[better]
        chi2[acc] += change[better]
        lam[a] = np.where(better, np.maximum(lam[a] * 0.3, 1e-9), lam[a] * 10.0)
        ok = (better & (tiny_gain | small)) | (~better & small)
        stuck = ~ok & (lam[a] > 1e10)
        converged[a[ok]] = True
        active = a[~(ok | stuck)]
        if active.size == 0:
            break
    return z, chi2, H, converged
