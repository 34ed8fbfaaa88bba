"""The polynomial-residual baseline (Price-Jones & Bovy) and the raw-spectrum baseline."""

import numpy as np
import pytest

from chemtwin.errors import InputError
from chemtwin.evaluation.metrics import evaluate_tags
from chemtwin.tagging.polyres import PolyResiduals, RawSpectrum

N_PIX = 120


def synthetic(n_groups, seed, noise=2e-4, group_size=2):
    """flux = smooth (non-polynomial) function of TEFF/LOGG + a weak chemical signal."""
    rng = np.random.default_rng(seed)
    shape_rng = np.random.default_rng(99)  # the same "physics" for every call
    pix = np.arange(N_PIX)
    centers = shape_rng.uniform(0, N_PIX, 25)
    profiles = np.exp(-0.5 * ((pix[None, :] - centers[:, None]) / 2.0) ** 2)  # (25, P)
    a, b = shape_rng.normal(0, 1.0, 25), shape_rng.normal(0, 1.0, 25)
    chem_lines = shape_rng.normal(0, 1.0, (4, 25))
    n = n_groups * group_size
    group = np.repeat(np.arange(n_groups), group_size)
    chem = rng.normal(0, 1.0, (n_groups, 4))[group]
    teff = rng.uniform(3800, 5500, n)
    logg = rng.uniform(0.5, 3.8, n)
    t, g = (teff - 4650) / 850, (logg - 2.15) / 1.65
    depth = 0.25 / (1 + np.exp(-(a * t[:, None] + b * g[:, None])))  # strong, smooth in TEFF/LOGG
    depth = depth + 0.004 * chem @ chem_lines  # weak chemistry
    flux = 1 - depth @ profiles + noise * rng.normal(size=(n, N_PIX))
    ivar = np.full(flux.shape, 1 / noise**2)
    cond = np.column_stack([teff, logg])
    return flux.astype(np.float32), ivar.astype(np.float32), cond, group


def test_residual_space_finds_twins_far_better_than_raw_spectra():
    train = synthetic(400, seed=1)
    flux, ivar, cond, group = synthetic(300, seed=2)
    pr = PolyResiduals(degree=4, n_components=50).fit(*train[:3])
    tags = pr.transform(flux, ivar, cond)
    assert tags.shape == (600, 50) and tags.dtype == np.float32
    poly = evaluate_tags(tags, group, "l1", progress=False)
    raw = evaluate_tags(RawSpectrum().fit_transform(flux, ivar), group, "l1", progress=False)
    assert poly["frac_rank0"] > 0.6, poly  # about 0.77 (the polynomial cannot follow the model exactly)
    assert raw["frac_rank0"] < 0.2, raw
    assert poly["frac_rank_lt_1pct"] > raw["frac_rank_lt_1pct"] + 0.4
    assert poly["median_rank"] < raw["median_rank"] / 10


def test_design_terms_and_weighted_least_squares():
    assert PolyResiduals(degree=4).n_terms == 15
    assert PolyResiduals(degree=4, condition=("TEFF", "LOGG", "FE_H")).n_terms == 35
    assert PolyResiduals(degree=2, condition="TEFF").n_terms == 3
    flux, ivar, cond, _ = synthetic(100, seed=3)
    rng = np.random.default_rng(0)
    ivar = ivar * rng.uniform(0.1, 2.0, ivar.shape).astype(np.float32)
    pr = PolyResiduals(degree=3, n_components=5, ridge=0.0).fit(flux, ivar, cond)
    # pixel 7 against an explicit weighted lstsq
    a = pr.design(cond)
    w = np.sqrt(ivar[:, 7].astype(np.float64))
    coef, *_ = np.linalg.lstsq(a * w[:, None], flux[:, 7] * w, rcond=None)
    np.testing.assert_allclose(pr.coef_[:, 7], coef, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(pr.predict(cond)[:, 7], a @ coef, atol=1e-6)


def test_masked_pixels_do_not_change_the_fit():
    flux, ivar, cond, _ = synthetic(150, seed=4)
    rng = np.random.default_rng(1)
    mask = rng.random(flux.shape) < 0.1
    ivar_m = np.where(mask, 0, ivar).astype(np.float32)
    garbage = np.where(mask, np.where(rng.random(flux.shape) < 0.5, np.nan, 1e6), flux).astype(np.float32)
    a = PolyResiduals(n_components=10).fit(flux, ivar_m, cond)
    b = PolyResiduals(n_components=10).fit(garbage, ivar_m, cond)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    np.testing.assert_array_equal(a.components_, b.components_)
    ta, tb = a.transform(flux, ivar_m, cond), b.transform(garbage, ivar_m, cond)
    np.testing.assert_array_equal(ta, tb)
    assert np.isfinite(tb).all()
    r, ok = a.residuals(garbage, ivar_m, cond)
    assert ok.all() and (r[mask] == 0).all()
    # a mask changes the weighting only where it is: the fit of an unmasked pixel is unchanged
    clean = np.flatnonzero(~mask.any(axis=0))
    full = PolyResiduals(n_components=10).fit(flux, ivar, cond)
    if clean.size:
        np.testing.assert_allclose(a.coef_[:, clean], full.coef_[:, clean], rtol=1e-10, atol=1e-12)


def test_unusable_stars_fully_masked_pixels_and_bad_input():
    flux, ivar, cond, _ = synthetic(60, seed=5)
    ivar = ivar.copy()
    ivar[3] = 0  # a star without data
    ivar[:, 10] = 0  # a pixel without data
    pr = PolyResiduals(n_components=8).fit(flux, ivar, cond)
    assert not pr.pixel_ok_[10] and pr.pixel_ok_.sum() == N_PIX - 1
    tags = pr.transform(flux, ivar, cond)
    assert np.isnan(tags[3]).all() and np.isfinite(np.delete(tags, 3, axis=0)).all()
    with pytest.raises(InputError, match="cond"):
        pr.transform(flux, ivar, cond[:, :1])
    bad = cond.copy()
    bad[5, 0] = np.nan
    with pytest.raises(InputError, match="row 5"):
        pr.transform(flux, ivar, bad)
    with pytest.raises(InputError, match="not fitted"):
        PolyResiduals().transform(flux, ivar, cond)
    # noiseless data (ivar = +inf) is fitted with unit weights
    inf = PolyResiduals(n_components=8).fit(flux, np.full_like(ivar, np.inf), cond)
    ones = PolyResiduals(n_components=8).fit(flux, np.ones_like(ivar), cond)
    np.testing.assert_allclose(inf.coef_, ones.coef_)


def test_raw_spectrum_fills_masked_pixels():
    flux = np.array([[1.0, 0.5, 0.9], [0.8, 0.7, np.nan], [0.6, 0.1, 0.2]], np.float32)
    ivar = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]], np.float32)
    raw = RawSpectrum().fit(flux, ivar)
    np.testing.assert_allclose(raw.fill_, [0.9, 0.6, 0.9])
    tags = raw.transform(flux, ivar)
    np.testing.assert_allclose(tags[:2], [[1.0, 0.5, 0.9], [0.8, 0.7, 0.9]])
    assert np.isnan(tags[2]).all()


def test_residual_pca_matches_numpy_on_many_pixels():
    """Covariance accumulated in batches (upper triangle, blocks of 512) = np.cov."""
    rng = np.random.default_rng(7)
    n, p = 200, 700
    flux = (1 + 0.01 * rng.normal(size=(n, p)) @ np.diag(np.linspace(3, 0.1, p))).astype(np.float32)
    cond = np.column_stack([rng.uniform(3800, 5500, n), rng.uniform(0.5, 3.8, n)])
    pr = PolyResiduals(degree=2, n_components=6, batch_size=100).fit(flux, np.ones_like(flux), cond)
    r, _ = pr.residuals(flux, np.ones_like(flux), cond)
    values, vectors = np.linalg.eigh(np.cov(r.astype(np.float64), rowvar=False))
    np.testing.assert_allclose(pr.explained_variance_, values[::-1][:6], rtol=1e-4)
    overlap = np.abs(pr.components_.astype(np.float64) @ vectors[:, ::-1][:, :6])
    np.testing.assert_allclose(np.diag(overlap), 1, atol=1e-3)


def test_randomized_eigen_path_agrees_with_eigh():
    from chemtwin.tagging.polyres import _top_eigen

    rng = np.random.default_rng(8)
    q, _ = np.linalg.qr(rng.normal(size=(400, 400)))
    cov = (q * (1.0 / np.arange(1, 401) ** 1.5)) @ q.T
    v1, w1 = _top_eigen(cov, 30)
    v2, w2 = _top_eigen(cov, 30, dense_max=0)
    np.testing.assert_allclose(v2, v1, rtol=1e-8)
    np.testing.assert_allclose(w2, w1, atol=1e-5)  # signs fixed the same way
