"""The Cannon: exact recovery on data from a known quadratic model, scatter, masks,
save/load, the CLI and its bad inputs."""

from __future__ import annotations

import importlib.util

import h5py
import numpy as np
import pytest

from chemtwin.cli import main
from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.errors import InputError
from chemtwin.tagging.cannon import Cannon, PolynomialVectorizer, polynomial_terms
from chemtwin.tagging.cannon.fitting import fit_s2

NAMES = ["TEFF", "LOGG", "FE_H", "MG_FE"]
CENTER = np.array([4700.0, 2.4, -0.2, 0.1])
SPREAD = np.array([350.0, 0.7, 0.3, 0.1])


def draw_labels(n, rng):
    return CENTER + SPREAD * rng.normal(size=(n, len(NAMES)))


def known_model(n_pixels=150, n_train=400, seed=0):
    """Training labels, a fitted vectorizer and a true theta (P, T) giving absorption-like spectra."""
    rng = np.random.default_rng(seed)
    labels = draw_labels(n_train, rng)
    vec = PolynomialVectorizer(NAMES, 2).fit(labels)
    theta = rng.normal(0.0, 0.03, (n_pixels, vec.n_terms))
    theta[:, 0] = 1.0 - rng.uniform(0.0, 0.4, n_pixels)
    theta[:, 1 : 1 + len(NAMES)] *= 3.0  # linear terms dominate, as in real spectra
    return labels, vec, theta


def spectra(vec, theta, labels):
    return vec(labels) @ theta.T


def assert_labels_close(got, truth, tol):
    """Label errors below ``tol`` in units of the label spread."""
    assert np.all(np.isfinite(got))
    assert np.abs((got - truth) / SPREAD).max() < tol


@pytest.fixture(scope="module")
def noiseless():
    labels, vec, theta = known_model()
    flux = spectra(vec, theta, labels)
    model = Cannon(NAMES).fit(flux, np.ones_like(flux), labels)
    return labels, vec, theta, model


# --------------------------------------------------------------------------- vectorizer


def test_vectorizer_terms_and_derivative():
    vec = PolynomialVectorizer(NAMES, 2)
    assert vec.n_terms == 1 + 4 + 10
    assert vec.term_names[:6] == ["1", "TEFF", "LOGG", "FE_H", "MG_FE", "TEFF^2"]
    assert "TEFF*LOGG" in vec.term_names
    assert polynomial_terms(3, 3).shape == (20, 3)  # C(3 + 3, 3)
    z = np.random.default_rng(1).normal(size=(5, 4))
    v, dv = vec.jacobian_from_scaled(z)
    np.testing.assert_allclose(v, vec.design_from_scaled(z))
    eps = 1e-6
    for k in range(4):
        step = np.zeros(4)
        step[k] = eps
        numeric = (vec.design_from_scaled(z + step) - vec.design_from_scaled(z - step)) / (2 * eps)
        np.testing.assert_allclose(dv[:, :, k], numeric, atol=1e-8)
    # product terms reproduce v_t v_u exactly
    exponents, index = vec.product_terms()
    assert exponents.shape[0] == 70  # distinct monomials of degree <= 4 in 4 labels
    from chemtwin.tagging.cannon import monomials

    np.testing.assert_allclose(monomials(z, exponents)[:, index], v[:, :, None] * v[:, None, :], rtol=1e-12)


def test_vectorizer_rejects_constant_label_and_bad_order():
    labels = draw_labels(50, np.random.default_rng(0))
    labels[:, 2] = -0.3
    with pytest.raises(InputError, match="FE_H"):
        PolynomialVectorizer(NAMES, 2).fit(labels)
    with pytest.raises(InputError, match="order"):
        Cannon(NAMES, order=0)


# --------------------------------------------------------------------------- training


def test_theta_exact_on_noiseless_data(noiseless):
    labels, vec, theta, model = noiseless
    np.testing.assert_allclose(model.theta_, theta, atol=1e-10)
    assert np.all(model.s2_ < 1e-20)
    assert model.pixel_mask_.all()
    np.testing.assert_allclose(model.vectorizer.offsets, vec.offsets)


def test_theta_and_s2_do_not_depend_on_threads():
    labels, vec, theta = known_model(n_pixels=300, n_train=300, seed=3)
    rng = np.random.default_rng(4)
    ivar = rng.uniform(0.5, 2.0, (300, 300)) * 1e4
    flux = spectra(vec, theta, labels) + rng.normal(size=ivar.shape) / np.sqrt(ivar) + rng.normal(0, 0.01, ivar.shape)
    a = Cannon(NAMES, n_jobs=1).fit(flux, ivar, labels)
    b = Cannon(NAMES, n_jobs=3).fit(flux, ivar, labels)
    # the same arithmetic; only BLAS's thread count may change the last bits
    np.testing.assert_allclose(a.theta_, b.theta_, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(a.s2_, b.s2_, rtol=1e-8, atol=1e-16)
    test = flux[:40]
    np.testing.assert_allclose(a.predict(test, ivar[:40]), b.predict(test, ivar[:40]), rtol=1e-9)


def test_s2_recovered_with_injected_scatter():
    n_train, n_pixels = 3000, 60
    labels, vec, theta = known_model(n_pixels=n_pixels, n_train=n_train, seed=5)
    rng = np.random.default_rng(6)
    s_true = np.where(np.arange(n_pixels) % 2 == 0, 0.02, 0.0)
    ivar = rng.uniform(0.5, 2.0, (n_train, n_pixels)) * 1e4  # sigma 0.007-0.014, heteroscedastic
    flux = spectra(vec, theta, labels) + rng.normal(size=ivar.shape) * np.sqrt(1 / ivar + s_true**2)
    model = Cannon(NAMES).fit(flux, ivar, labels)
    s_fit = np.sqrt(model.s2_)
    np.testing.assert_allclose(s_fit[s_true > 0], 0.02, rtol=0.06)
    assert np.all(s_fit[s_true == 0] < 0.004)
    # theta within a few standard errors of the truth everywhere
    assert np.abs(model.theta_ - theta).max() < 0.02
    # no scatter fit: s2 stays 0
    plain = Cannon(NAMES, fit_scatter=False).fit(flux, ivar, labels)
    assert np.all(plain.s2_ == 0)


def test_s2_is_the_likelihood_maximum():
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(7)
    n, p = 500, 8
    ivar = rng.uniform(0.3, 3.0, (n, p)) * 100
    ivar[rng.random((n, p)) < 0.1] = 0.0  # masked entries drop out
    s_true = np.linspace(0.0, 0.2, p)
    r2 = rng.normal(size=(n, p)) ** 2 * (1 / np.where(ivar > 0, ivar, 1) + s_true**2)
    r2[ivar == 0] = 0.0
    var_scale = (ivar > 0).sum(0) / ivar.sum(0)
    got = fit_s2(r2, ivar, np.zeros(p), var_scale, tol=1e-7)
    for k in range(p):
        good = ivar[:, k] > 0
        v, r = 1 / ivar[good, k], r2[good, k]
        nll = lambda s2, v=v, r=r: np.sum(r / (v + s2) + np.log(v + s2))  # noqa: E731
        best = minimize_scalar(nll, bounds=(0, 1), method="bounded", options={"xatol": 1e-12}).x
        assert nll(got[k]) <= nll(best) + 1e-6
        assert got[k] == pytest.approx(best, abs=1e-5)


def test_noiseless_ivar_inf_is_accepted():
    labels, vec, theta = known_model(n_pixels=40, n_train=200, seed=8)
    flux = spectra(vec, theta, labels)
    model = Cannon(NAMES).fit(flux, np.full_like(flux, np.inf), labels)
    np.testing.assert_allclose(model.theta_, theta, atol=1e-8)
    result = model.test(flux[:5], np.full_like(flux[:5], np.inf))
    assert_labels_close(result.labels, labels[:5], 1e-6)


def test_degenerate_training_set_is_bad_input():
    labels, vec, theta = known_model(n_pixels=20, n_train=100)
    flux = spectra(vec, theta, labels)
    ivar = np.ones_like(flux)
    with pytest.raises(InputError, match="cannot constrain"):
        Cannon(NAMES).fit(flux[:10], ivar[:10], labels[:10])
    collinear = labels.copy()
    collinear[:, 3] = collinear[:, 2] * 0.5  # MG_FE a linear function of FE_H
    with pytest.raises(InputError, match="degenerate"):
        Cannon(NAMES).fit(flux, ivar, collinear)
    nan_labels = labels.copy()
    nan_labels[7, 1] = np.nan
    with pytest.raises(InputError, match="LOGG.*row 7"):
        Cannon(NAMES).fit(flux, ivar, nan_labels)
    bad = flux.copy()
    bad[3, 4] = np.nan
    with pytest.raises(InputError, match="row 3, pixel 4"):
        Cannon(NAMES).fit(bad, ivar, labels)
    with pytest.raises(InputError, match=r"\(100, 4\)"):
        Cannon(NAMES).fit(flux, ivar, labels[:, :3])


# --------------------------------------------------------------------------- test step


def test_labels_exact_on_noiseless_spectra(noiseless):
    labels, vec, theta, model = noiseless
    truth = draw_labels(200, np.random.default_rng(11))
    flux = spectra(vec, theta, truth)
    result = model.test(flux, np.ones_like(flux))
    assert result.converged.all()
    assert_labels_close(result.labels, truth, 1e-8)
    assert np.all(result.chi2 < 1e-12)
    np.testing.assert_allclose(model.predict_flux(truth), flux, atol=1e-12)
    assert model.score(flux, np.ones_like(flux), truth) == pytest.approx(1.0)


def test_noisy_labels_covariance_matches_scatter(noiseless):
    """Estimates over many noise draws of one star scatter as the formal covariance says."""
    labels, vec, theta, model = noiseless
    rng = np.random.default_rng(12)
    truth = CENTER + 0.5 * SPREAD
    sigma = 0.01
    clean = spectra(vec, theta, truth[None])[0]
    n_draws = 400
    flux = clean + sigma * rng.normal(size=(n_draws, clean.size))
    ivar = np.full_like(flux, sigma**-2)
    result = model.test(flux, ivar)
    assert result.converged.all()
    est = result.labels
    # unbiased: the mean is within 4 standard errors of the truth
    err = result.uncertainties.mean(0)
    assert np.all(np.abs(est.mean(0) - truth) < 4 * err / np.sqrt(n_draws))
    empirical = np.cov(est.T)
    formal = result.cov.mean(0)
    ratio = np.diag(empirical) / np.diag(formal)
    assert np.all((ratio > 0.75) & (ratio < 1.33)), ratio
    corr_e = empirical / np.sqrt(np.outer(np.diag(empirical), np.diag(empirical)))
    corr_f = formal / np.sqrt(np.outer(np.diag(formal), np.diag(formal)))
    assert np.abs(corr_e - corr_f).max() < 0.15
    # chi^2 ~ pixels - labels
    assert np.mean(result.chi2) == pytest.approx(clean.size - 4, rel=0.05)
    np.testing.assert_allclose(result.reduced_chi2, result.chi2 / (clean.size - 4))


def test_masked_pixels_are_ignored(noiseless):
    labels, vec, theta, model = noiseless
    truth = draw_labels(20, np.random.default_rng(13))
    flux = spectra(vec, theta, truth)
    ivar = np.ones_like(flux)
    ivar[:, ::3] = 0.0
    garbage = flux.copy()
    garbage[:, ::3] = np.nan  # NaN where ivar = 0 is allowed and ignored
    result = model.test(garbage, ivar)
    assert_labels_close(result.labels, truth, 1e-8)
    assert np.all(result.n_pixels == flux.shape[1] - len(range(0, flux.shape[1], 3)))
    # training: bad pixels of some stars and a user pixel mask
    tflux = spectra(vec, theta, labels)
    tivar = np.ones_like(tflux)
    rng = np.random.default_rng(14)
    bad = rng.random(tflux.shape) < 0.05
    tflux[bad] = 1e6
    tivar[bad] = 0.0
    mask = np.ones(tflux.shape[1], dtype=bool)
    mask[:10] = False
    tflux[:, :10] = -5.0  # junk in the excluded pixels
    masked = Cannon(NAMES).fit(tflux, tivar, labels, pixel_mask=mask)
    np.testing.assert_allclose(masked.theta_[10:], theta[10:], atol=1e-9)
    assert not masked.pixel_mask_[:10].any()
    assert np.isnan(masked.predict_flux(truth)[:, :10]).all()
    assert_labels_close(masked.predict(flux, np.ones_like(flux)), truth, 1e-8)
    # a star with nothing to fit gives NaN, not an exception
    out = model.test(flux[:2], np.zeros_like(flux[:2]))
    assert np.isnan(out.labels).all() and not out.converged.any()


def test_censoring_zeroes_the_censored_terms(noiseless):
    labels, vec, theta, model = noiseless
    flux = spectra(vec, theta, labels)
    censored = np.zeros(flux.shape[1], dtype=bool)
    censored[:30] = True
    fitted = Cannon(NAMES).fit(flux, np.ones_like(flux), labels, censors={"MG_FE": ~censored})
    uses_mg = model.vectorizer.terms[:, 3] > 0
    assert np.all(fitted.theta_[:30][:, uses_mg] == 0)
    np.testing.assert_allclose(fitted.theta_[30:], theta[30:], atol=1e-10)
    with pytest.raises(InputError, match="XX_FE"):
        Cannon(NAMES).fit(flux, np.ones_like(flux), labels, censors={"XX_FE": censored})


def test_test_step_bad_input(noiseless):
    labels, vec, theta, model = noiseless
    flux = spectra(vec, theta, labels[:3])
    with pytest.raises(InputError, match="pixels"):
        model.test(flux[:, :-1], np.ones_like(flux[:, :-1]))
    bad = flux.copy()
    bad[1, 2] = np.inf
    with pytest.raises(InputError, match="row 1, pixel 2"):
        model.test(bad, np.ones_like(flux))
    with pytest.raises(InputError, match=">= 0"):
        model.test(flux, -np.ones_like(flux))
    with pytest.raises(InputError, match="labels of shape"):
        model.predict_flux(labels[:, :2])


# --------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path, noiseless):
    labels, vec, theta, _ = noiseless
    rng = np.random.default_rng(15)
    flux = spectra(vec, theta, labels) + rng.normal(0, 0.01, (len(labels), theta.shape[0]))
    ivar = np.full_like(flux, 1e4)
    wl = 15000.0 + np.arange(theta.shape[0])
    model = Cannon(NAMES).fit(flux, ivar, labels, wavelength=wl)
    path = model.save(tmp_path / "model.npz")
    loaded = Cannon.load(path)
    assert loaded.label_names == NAMES and loaded.order == 2
    np.testing.assert_array_equal(loaded.theta_, model.theta_)
    np.testing.assert_array_equal(loaded.s2_, model.s2_)
    np.testing.assert_array_equal(loaded.wavelength_, wl)
    np.testing.assert_array_equal(loaded.predict_flux(labels[:5]), model.predict_flux(labels[:5]))
    a, b = model.test(flux[:30], ivar[:30]), loaded.test(flux[:30], ivar[:30])
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.cov, b.cov)
    with np.load(path, allow_pickle=False) as data:  # loads without pickle
        assert data["theta"].shape == theta.shape


def test_load_rejects_corrupt_files(tmp_path, noiseless):
    model = noiseless[3]
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(InputError, match="not a readable"):
        Cannon.load(junk)
    with pytest.raises(InputError, match="no such"):
        Cannon.load(tmp_path / "missing.npz")
    path = model.save(tmp_path / "m.npz")
    with np.load(path) as data:
        arrays = dict(data)
    arrays["s2"] = arrays["s2"][:-1]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(InputError, match="corrupt"):
        Cannon.load(bad)
    del arrays["theta"]
    np.savez(bad, **arrays)
    with pytest.raises(InputError, match="missing theta"):
        Cannon.load(bad)
    truncated = tmp_path / "trunc.npz"
    truncated.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError):
        Cannon.load(truncated)


# --------------------------------------------------------------------------- CLI


def write_dataset(path, n_stars=300, n_pixels=120, seed=20, names=NAMES, nan_at=None, snr=100.0):
    labels, vec, theta = known_model(n_pixels=n_pixels, n_train=n_stars, seed=seed)
    rng = np.random.default_rng(seed + 1)
    flux = spectra(vec, theta, labels) + rng.normal(0, 1 / snr, (n_stars, n_pixels))
    ivar = np.full_like(flux, snr**2)
    ivar[rng.random(flux.shape) < 0.02] = 0.0
    flux[ivar == 0] = np.nan
    if nan_at is not None:
        flux[nan_at] = np.nan
    cols = [NAMES.index(n) for n in names]
    with DatasetWriter(path, 15100.0 + np.arange(n_pixels), list(names), attrs={"generator": "test_cannon", "snr": snr}) as w:
        w.append(flux, ivar, labels[:, cols], np.arange(n_stars) // 2)
    return labels


def test_cli_train_and_test(tmp_path, capsys):
    data = tmp_path / "data.h5"
    truth = write_dataset(data)
    model = tmp_path / "model.npz"
    assert main(["cannon", "train", str(data), "--labels", "TEFF,LOGG,FE_H,MG_FE", "--out", str(model), "--rows", "0:250"]) == 0
    assert "wrote" in capsys.readouterr().out
    out = tmp_path / "labels.h5"
    assert main(["-q", "cannon", "test", str(model), str(data), "--out", str(out), "--rows", "250:300"]) == 0
    with h5py.File(out, "r") as f:
        assert [n.decode() if isinstance(n, bytes) else n for n in f["labels"].attrs["names"]] == NAMES
        labels = f["labels"][:]
        err = f["labels_err"][:]
        assert labels.shape == (50, 4) and err.shape == (50, 4) and f["covariance"].shape == (50, 4, 4)
        np.testing.assert_array_equal(f["group"][:], np.arange(250, 300) // 2)
        assert f["chi2"].shape == (50,) and f["converged"][:].all()
    z = (labels - truth[250:]) / err
    assert np.sqrt(np.mean(z**2)) < 2.0  # errors consistent with the uncertainties
    # a subset of labels; an existing output needs --overwrite
    assert main(["cannon", "test", str(model), str(data), "--out", str(out), "--labels", "FE_H"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["-q", "cannon", "test", str(model), str(data), "--out", str(out), "--labels", "FE_H", "--overwrite"]) == 0
    with h5py.File(out, "r") as f:
        assert f["labels"].shape == (300, 1)
    # pixel masks from files
    mask = np.ones(120, dtype=bool)
    mask[:20] = False
    np.save(tmp_path / "mask.npy", mask)
    np.savez(tmp_path / "cont.npz", pixels=~mask)
    for option, file in (("--pixel-mask", "mask.npy"), ("--exclude-pixels", "cont.npz")):
        m2 = tmp_path / f"m_{file}.npz"
        assert main(["cannon", "train", str(data), "--labels", "TEFF", "LOGG", "FE_H", "MG_FE", "--out", str(m2), option, str(tmp_path / file)]) == 0
        loaded = Cannon.load(m2)
        np.testing.assert_array_equal(loaded.pixel_mask_, mask)


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_label", "was not trained on XX_FE"),
        ("missing_training_label", "unknown label(s) MG_FE"),
        ("corrupt_model", "not a readable chemtwin Cannon model"),
        ("nan_flux", "NaN/inf flux (nan) where ivar > 0"),
        ("wrong_pixels", "pixels, the Cannon model"),
        ("bad_mask", "mask has shape"),
        ("bad_rows", "outside the dataset"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, case, message):
    data = tmp_path / "data.h5"
    write_dataset(data, n_stars=120, n_pixels=60)
    model = tmp_path / "model.npz"
    assert main(["-q", "cannon", "train", str(data), "--labels", ",".join(NAMES), "--out", str(model)]) == 0
    capsys.readouterr()
    out = tmp_path / "out.h5"
    test = ["cannon", "test", str(model), str(data), "--out", str(out)]
    if case == "unknown_label":
        argv = test + ["--labels", "FE_H,XX_FE"]
    elif case == "missing_training_label":
        other = tmp_path / "other.h5"
        write_dataset(other, n_stars=120, n_pixels=60, names=["TEFF", "LOGG", "FE_H"])
        argv = ["cannon", "train", str(other), "--labels", ",".join(NAMES), "--out", str(out)]
    elif case == "corrupt_model":
        model.write_bytes(model.read_bytes()[:200])
        argv = test
    elif case == "nan_flux":
        bad = tmp_path / "nan.h5"
        write_dataset(bad, n_stars=120, n_pixels=60, nan_at=(5, 7), seed=30)
        with h5py.File(bad, "r+") as f:
            f["ivar"][5, 7] = 1.0
        argv = ["cannon", "train", str(bad), "--labels", ",".join(NAMES), "--out", str(out)]
    elif case == "wrong_pixels":
        other = tmp_path / "other.h5"
        write_dataset(other, n_stars=20, n_pixels=61)
        argv = ["cannon", "test", str(model), str(other), "--out", str(out)]
    elif case == "bad_mask":
        np.save(tmp_path / "mask.npy", np.ones(59, dtype=bool))
        argv = ["cannon", "train", str(data), "--labels", ",".join(NAMES), "--out", str(out), "--pixel-mask", str(tmp_path / "mask.npy")]
    else:
        argv = test + ["--rows", "100:500"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert err.startswith("chemtwin cannon: error:")
    assert not out.exists()
    assert not list(tmp_path.glob(".*tmp*"))


# --------------------------------------------------------------------------- reference


@pytest.mark.skipif(importlib.util.find_spec("thecannon") is None,
                    reason="the reference implementation (PyPI annieslasso, numpy<2) is not installed here; "
                           "benchmarks/cannon_vs_reference.py runs it in its own environment")
def test_matches_reference_implementation():
    import thecannon

    labels, vec, theta = known_model(n_pixels=50, n_train=300, seed=40)
    rng = np.random.default_rng(41)
    flux = spectra(vec, theta, labels) + rng.normal(0, 0.01, (300, 50))
    ivar = np.full_like(flux, 1e4)
    ref = thecannon.CannonModel(labels, flux, ivar, thecannon.vectorizer.PolynomialVectorizer(NAMES, 2))
    ref.train(threads=1)
    ours = Cannon(NAMES).fit(flux, ivar, labels)
    # equal ivar: theta does not depend on s2, and both solve the same least squares
    np.testing.assert_allclose(ours.predict_flux(labels), ref(labels), atol=1e-9)


def test_star_gram_paths_agree(noiseless):
    """G = theta^T W theta from the product table and from per-star products (many labels)."""
    model = noiseless[3]
    w = np.random.default_rng(50).uniform(0, 2, (3, model.n_pixels))
    theta, products = model._gram_terms()
    assert products is not None
    fast = model._star_gram(w)
    model._gram_cache = (theta, None)
    try:
        slow = model._star_gram(w)
    finally:
        model._gram_cache = None
    np.testing.assert_allclose(fast, slow, rtol=1e-12)
    np.testing.assert_allclose(slow[1], theta.T @ (w[1][:, None] * theta), rtol=1e-12)


def test_many_labels_cubic():
    """A cubic model in 6 labels (84 terms) trains and recovers noiseless labels."""
    rng = np.random.default_rng(60)
    names = [f"L{k}" for k in range(6)]
    labels = rng.normal(size=(400, 6))
    vec = PolynomialVectorizer(names, 3).fit(labels)
    assert vec.n_terms == 84
    theta = rng.normal(0, 0.01, (200, vec.n_terms))
    theta[:, 0] = 1.0
    theta[:, 1:7] = rng.normal(0, 0.1, (200, 6))
    flux = vec(labels) @ theta.T
    model = Cannon(names, order=3).fit(flux, np.ones_like(flux), labels)
    np.testing.assert_allclose(model.theta_, theta, atol=1e-9)
    truth = rng.normal(0, 0.5, (10, 6))
    got = model.predict(vec(truth) @ theta.T, np.ones((10, 200)))
    np.testing.assert_allclose(got, truth, atol=1e-7)
