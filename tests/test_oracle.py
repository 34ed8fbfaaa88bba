"""The Cramer-Rao oracle: Jacobian vs finite differences, covariance algebra, draws, whitening,
evaluation on generated sets, the Fisher cache and bad input."""

import json
import math

import h5py
import numpy as np
import pytest
import torch

from chemtwin.cli import main
from chemtwin.core.whitening import whitening_matrix
from chemtwin.data.dataset import open_dataset
from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.data.generate import generate_dataset
from chemtwin.errors import InputError
from chemtwin.evaluation.evaluate import evaluate
from chemtwin.methods.oracle import Oracle
from chemtwin.spectral_models.labels import CHEMICAL_LABELS, LABEL_NAMES, default_vmacro, default_vmicro
from chemtwin.spectral_models.lines import LineSynthesizer
from chemtwin.tagging.oracle import (
    CHEM_COLUMNS,
    cramer_rao_covariance,
    draw_abundances,
    synthesizer_jacobian,
)

COL = LABEL_NAMES.index


def _giants(n, seed=0):
    from chemtwin.data.population import RedGiantPrior, twin_groups

    labels, _ = twin_groups((n + 1) // 2, 2, RedGiantPrior(), np.random.default_rng(seed))
    return labels[:n]


@pytest.fixture(scope="module")
def jac():
    labels = _giants(3, seed=5)
    return labels, synthesizer_jacobian(labels, progress=False)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """40 twin pairs with the same labels at SNR inf, 300, 30 and 10 (same seed -> same labels)."""
    d = tmp_path_factory.mktemp("oracle")
    paths = {}
    for snr in (np.inf, 300.0, 30.0, 10.0):
        paths[snr] = generate_dataset(d / f"val_{snr}.h5", 40, 2, snr=snr, seed=3, progress=False)
    return d, paths


# ---------------------------------------------------------------------- Jacobian
def test_jacobian_matches_central_finite_differences():
    labels = _giants(2, seed=1)
    exact = synthesizer_jacobian(labels, dtype=torch.float64, progress=False)
    synth = LineSynthesizer(dtype=torch.float64)
    x = torch.as_tensor(labels)
    assert exact.shape == (2, len(synth.wavelength), 21) and exact.dtype == np.float32
    for k, name in enumerate(LABEL_NAMES):
        h = 0.5 if name == "TEFF" else 1e-4
        step = torch.zeros(21, dtype=torch.float64)
        step[k] = h
        with torch.no_grad():
            fd = ((synth(x + step) - synth(x - step)) / (2 * h)).numpy()
        scale = np.abs(fd).max()
        assert scale > 0, name  # every label changes the spectrum
        assert np.abs(exact[:, :, k] - fd).max() < 2e-5 * scale, name


def test_float32_jacobian_agrees_with_float64(jac):
    labels, j32 = jac
    j64 = synthesizer_jacobian(labels, dtype=torch.float64, threads=2, batch_size=2, progress=False)
    assert np.abs(j32 - j64).max() < 1e-4 * np.abs(j64).max()
    # and so do the Cramer-Rao sigmas it gives
    s32 = np.sqrt(np.einsum("nii->ni", cramer_rao_covariance(j32, 1e4)))
    s64 = np.sqrt(np.einsum("nii->ni", cramer_rao_covariance(j64, 1e4)))
    assert np.abs(s32 / s64 - 1).max() < 1e-3


# ---------------------------------------------------------------------- covariance
def test_covariance_is_the_chemical_block_of_the_inverse_fisher(jac):
    labels, j = jac
    ivar = np.full(j.shape[:2], 1e4)
    cov = cramer_rao_covariance(j, ivar)
    assert cov.shape == (3, 17, 17)
    jd = j[0].astype(np.float64)
    direct = np.linalg.inv(jd.T @ (jd * 1e4))[np.ix_(CHEM_COLUMNS, CHEM_COLUMNS)]
    np.testing.assert_allclose(cov[0], direct, rtol=1e-5, atol=1e-14)
    np.testing.assert_allclose(cov, cov.transpose(0, 2, 1))
    assert (np.linalg.eigvalsh(cov) > 0).all()
    # fixing the non-chemical labels instead would make the bound tighter, never looser
    chem = jd[:, CHEM_COLUMNS]
    fixed = np.linalg.inv(chem.T @ (chem * 1e4))
    assert (np.diag(fixed) <= np.diag(cov[0]) * (1 + 1e-9)).all()


def test_labels_given_exactly_give_the_block_of_the_free_labels_only(jac):
    labels, j = jac
    ivar = np.full(j.shape[:2], 1e4)
    jd = j[0].astype(np.float64)
    free = [k for k, name in enumerate(LABEL_NAMES) if name not in ("TEFF", "LOGG")]
    sub = jd[:, free]
    chem_in_free = [free.index(k) for k in CHEM_COLUMNS]
    direct = np.linalg.inv(sub.T @ (sub * 1e4))[np.ix_(chem_in_free, chem_in_free)]
    given = cramer_rao_covariance(j, ivar, given={"TEFF": 0.0, "LOGG": 0.0})
    np.testing.assert_allclose(given[0], direct, rtol=1e-5, atol=1e-14)
    # knowing TEFF and LOGG can only tighten the bound, and it does for some abundance
    free_all = cramer_rao_covariance(j, ivar)
    assert (np.diagonal(given, axis1=1, axis2=2) <= np.diagonal(free_all, axis1=1, axis2=2) * (1 + 1e-9)).all()
    assert (np.diagonal(given, axis1=1, axis2=2) < 0.99 * np.diagonal(free_all, axis1=1, axis2=2)).any()
    with pytest.raises(InputError, match="non-chemical"):
        cramer_rao_covariance(j, ivar, given={"MG_FE": 0.0})
    with pytest.raises(InputError, match="non-chemical"):
        cramer_rao_covariance(j, ivar, given={"TEMPERATURE": 0.0})
    for bad in (-1.0, math.inf, math.nan, 1e-200, True, "50"):
        with pytest.raises(InputError, match="finite number >= 0"):
            cramer_rao_covariance(j, ivar, given={"TEFF": bad})
    with pytest.raises(InputError, match="label -> 1-sigma pairs"):
        cramer_rao_covariance(j, ivar, given=("TEFF", "LOGG"))
    with pytest.raises(InputError, match="non-chemical"):
        Oracle(given_labels=(("MG_FE", 0.1),))  # refused when the method is made, before any data is read


def test_labels_given_with_errors_add_their_information_to_the_fisher_matrix(jac):
    _, j = jac
    ivar = np.full(j.shape[:2], 1e4)
    jd = j[0].astype(np.float64)
    k_teff, k_logg = LABEL_NAMES.index("TEFF"), LABEL_NAMES.index("LOGG")
    prior = np.zeros(len(LABEL_NAMES))
    prior[k_teff], prior[k_logg] = 1 / 50.0**2, 1 / 0.07**2
    direct = np.linalg.inv(jd.T @ (jd * 1e4) + np.diag(prior))[np.ix_(CHEM_COLUMNS, CHEM_COLUMNS)]
    quoted = cramer_rao_covariance(j, ivar, given={"TEFF": 50.0, "LOGG": 0.07})
    np.testing.assert_allclose(quoted[0], direct, rtol=1e-5, atol=1e-14)
    # between the spectrum alone and the labels given exactly; a vanishing error is the exact limit
    var = {key: np.diagonal(cramer_rao_covariance(j, ivar, given=g), axis1=1, axis2=2)
           for key, g in (("free", {}), ("exact", {"TEFF": 0.0, "LOGG": 0.0}),
                          ("tiny", {"TEFF": 1e-6, "LOGG": 1e-9}))}
    q = np.diagonal(quoted, axis1=1, axis2=2)
    assert (q <= var["free"] * (1 + 1e-9)).all() and (q >= var["exact"] * (1 - 1e-9)).all()
    assert (q < 0.99 * var["free"]).any() and (q > 1.01 * var["exact"]).any()
    np.testing.assert_allclose(var["tiny"], var["exact"], rtol=1e-4)
    # noiseless pixels: the spectrum alone fixes everything, the prior changes nothing
    assert (cramer_rao_covariance(j, np.inf, given={"TEFF": 50.0}) == 0).all()


def test_velocities_that_follow_logg_are_tied_to_it(tmp_path):
    from chemtwin.data.population import RedGiantPrior
    from chemtwin.tagging.oracle import oracle_covariance, velocities_follow_logg

    path = generate_dataset(tmp_path / "tied.h5", 3, 2, snr=30.0, seed=6, progress=False)
    with open_dataset(path) as ds:
        cov, labels, stats = oracle_covariance(ds, given={"TEFF": 0.0, "LOGG": 0.0}, progress=False)
        ivar = np.asarray(ds.read().ivar, dtype=np.float64)
    assert stats["velocities"] == "tied to LOGG" and velocities_follow_logg(labels)
    # the direct computation: LOGG's column carries the velocities' response through the relations
    j = synthesizer_jacobian(labels, progress=False).astype(np.float64)
    logg = labels[:, COL("LOGG")]
    slope = {"VMICRO": np.where((default_vmicro(logg) > 0.5) & (default_vmicro(logg) < 3.0), -0.325, 0.0),
             "VMACRO": np.where((default_vmacro(logg) > 2.0) & (default_vmacro(logg) < 8.0), -1.0, 0.0)}
    j[:, :, COL("LOGG")] += sum(slope[n][:, None] * j[:, :, COL(n)] for n in slope)
    free = [k for k, name in enumerate(LABEL_NAMES) if name not in ("TEFF", "LOGG", "VMICRO", "VMACRO")]
    for n in range(len(labels)):
        jf = j[n][:, free]
        direct = np.linalg.inv(jf.T @ (jf * ivar[n][:, None]))
        chem = [free.index(k) for k in CHEM_COLUMNS]
        np.testing.assert_allclose(cov[n], direct[np.ix_(chem, chem)], rtol=1e-4)
    # with star-to-star scatter the velocities are free parameters of the data again
    scattered = generate_dataset(tmp_path / "free.h5", 3, 2, snr=30.0, seed=6, progress=False,
                                 prior=RedGiantPrior(vmicro_scatter=0.2, vmacro_scatter=0.5))
    with open_dataset(scattered) as ds:
        loose, labels2, stats2 = oracle_covariance(ds, given={"TEFF": 0.0, "LOGG": 0.0}, progress=False)
    assert stats2["velocities"] == "free" and not velocities_follow_logg(labels2)


def test_covariance_scales_as_one_over_snr_squared(jac):
    _, j = jac
    cov = {snr: cramer_rao_covariance(j, np.full(j.shape[1], snr**2)) for snr in (30.0, 100.0, 300.0)}
    np.testing.assert_allclose(cov[30.0] * 30.0**2, cov[300.0] * 300.0**2, rtol=1e-9)
    np.testing.assert_allclose(cov[100.0] * 100.0**2, cov[300.0] * 300.0**2, rtol=1e-9)
    var = {snr: np.einsum("nii->ni", c) for snr, c in cov.items()}
    assert (var[300.0] < var[100.0]).all() and (var[100.0] < var[30.0]).all()


def test_masked_noiseless_and_empty_stars(jac):
    _, j = jac
    n, p, _ = j.shape
    keep = np.ones(p, bool)
    keep[::3] = False
    ivar = np.where(keep, 1e4, 0.0)[None].repeat(n, 0)
    # ivar = 0 pixels are exactly as if they were not there
    np.testing.assert_allclose(cramer_rao_covariance(j, ivar), cramer_rao_covariance(j[:, keep], ivar[:, keep]),
                               rtol=1e-9)
    ivar[1] = np.where(keep, np.inf, 0.0)  # noiseless star (masked pixels still ivar 0)
    ivar[2] = 0.0  # nothing usable
    cov = cramer_rao_covariance(j, ivar)
    assert np.isfinite(cov[0]).all() and (np.diag(cov[0]) > 0).all()
    assert (cov[1] == 0).all()
    assert np.isnan(cov[2]).all()


def test_singular_or_mixed_ivar_is_an_input_error(jac):
    _, j = jac
    ivar = np.zeros(j.shape[:2])
    ivar[:, 1000:1010] = 1e4  # 10 pixels cannot constrain 21 labels
    with pytest.raises(InputError, match="star 0: .*singular Fisher"):
        cramer_rao_covariance(j, ivar)
    ivar = np.full(j.shape[:2], 1e4)
    ivar[2, :5] = np.inf
    with pytest.raises(InputError, match="star 2 mixes noiseless"):
        cramer_rao_covariance(j, ivar)
    ivar[2, :5] = -1.0
    with pytest.raises(InputError, match="row 2, pixel [0-9]* has NaN or negative ivar"):
        cramer_rao_covariance(j, ivar)
    with pytest.raises(InputError, match="jacobian must be"):
        cramer_rao_covariance(j[:, :, :20], 1.0)


# ---------------------------------------------------------------------- draws and whitening
def test_draws_are_deterministic_and_follow_the_covariance(jac):
    labels, j = jac
    cov = cramer_rao_covariance(j, 900.0)
    a, b = draw_abundances(labels, cov, seed=7), draw_abundances(labels, cov, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, draw_abundances(labels, cov, seed=8))
    # one star repeated: the sample covariance of the draws is the Cramer-Rao covariance
    many = 4000
    draws = draw_abundances(np.repeat(labels[:1], many, 0), np.repeat(cov[:1], many, 0), seed=1)
    sd = np.sqrt(np.diag(cov[0]))
    assert (np.abs(draws.mean(0) - labels[0, CHEM_COLUMNS]) < 5 * sd / np.sqrt(many)).all()
    corr_err = np.cov(draws.T) / np.outer(sd, sd) - cov[0] / np.outer(sd, sd)
    assert np.abs(corr_err).max() < 0.1  # ~4 / sqrt(4000) sampling noise on correlations
    # zero covariance gives the truth, NaN gives NaN
    cov[1], cov[2] = 0.0, np.nan
    out = draw_abundances(labels, cov, seed=0)
    np.testing.assert_array_equal(out[1], labels[1, CHEM_COLUMNS])
    assert np.isnan(out[2]).all()


def test_whitening_makes_the_pooled_noise_unit(jac):
    labels, j = jac
    cov = cramer_rao_covariance(j[:1], 1e4)
    many = 4000
    noise = draw_abundances(np.repeat(labels[:1], many, 0), np.repeat(cov, many, 0), seed=2) - labels[0, CHEM_COLUMNS]
    white = noise @ whitening_matrix(np.repeat(cov, many, 0)).T
    np.testing.assert_allclose(np.cov(white.T), np.eye(17), atol=0.1)
    np.testing.assert_array_equal(whitening_matrix(np.zeros((3, 17, 17))), np.eye(17))
    # noiseless stars among noisy ones say nothing about the noise: left out of the pooled mean
    mixed = np.concatenate([np.zeros((5, 17, 17)), cov])
    np.testing.assert_allclose(whitening_matrix(mixed), whitening_matrix(cov[0]))


# ---------------------------------------------------------------------- evaluation
def test_noiseless_oracle_finds_every_twin(sets):
    d, paths = sets
    res = evaluate("oracle", paths[np.inf], progress=False)
    assert res["method"] == "oracle" and res["metric"] == "l2"
    assert res["n_stars"] == 80 and res["n_pairs"] == 80
    assert res["frac_rank0"] == 1.0 and res["median_rank"] == 0
    assert res["oracle"]["n_noiseless"] == 80
    assert res["mse_reconstruction"] is None and res["model"]["class"] == "CramerRaoOracle"


def test_higher_snr_finds_more_twins_and_the_cache_is_reused(sets):
    d, paths = sets
    cache = d / "jac.h5"
    res = {snr: evaluate(Oracle(jacobian_file=cache), paths[snr], progress=False) for snr in (30.0, 300.0, 10.0)}
    stats = {snr: r["oracle"]["jacobian_cache"] for snr, r in res.items()}
    assert stats[30.0]["computed"] == 80 and stats[30.0]["reused"] == 0
    assert stats[300.0]["computed"] == 0 and stats[300.0]["reused"] == 80
    assert stats[10.0]["computed"] == 0
    assert res[10.0]["frac_rank0"] < res[30.0]["frac_rank0"] < res[300.0]["frac_rank0"]
    assert res[30.0]["median_rank"] <= res[10.0]["median_rank"]
    sig = {snr: res[snr]["oracle"]["sigma_median"] for snr in (30.0, 300.0)}
    for name in CHEMICAL_LABELS:
        assert sig[300.0][name] == pytest.approx(sig[30.0][name] / 10, rel=1e-6)
    # same seed, same result; the cache changes nothing
    again = evaluate("oracle", paths[30.0], progress=False)
    for key in ("frac_rank0", "frac_rank_lt_1pct", "median_rank", "rank_cdf"):
        assert again[key] == res[30.0][key]
    assert not list(d.glob("*.tmp*"))
    # given TEFF and LOGG exactly, every abundance is known at least as well, from the same cache
    exact = Oracle(jacobian_file=cache, given_labels=(("TEFF", 0.0), ("LOGG", 0.0)))
    given = evaluate(exact, paths[10.0], progress=False)
    assert given["oracle"]["jacobian_cache"]["computed"] == 0
    assert "TEFF" not in given["model"]["free_labels"] and "FE_H" in given["model"]["free_labels"]
    # the generator's velocities follow LOGG: not free parameters of these spectra
    assert given["model"]["velocities"] == "tied to LOGG" and "VMICRO" not in given["model"]["free_labels"]
    for name in CHEMICAL_LABELS:
        assert given["oracle"]["sigma_median"][name] <= res[10.0]["oracle"]["sigma_median"][name] * (1 + 1e-9)


def test_stale_cache_is_recomputed(tmp_path, monkeypatch):
    import chemtwin.tagging.oracle as oracle

    monkeypatch.setattr(oracle, "READ_ROWS", 8)  # several blocks, with cached and missing stars mixed
    cache = tmp_path / "jac.h5"
    one = generate_dataset(tmp_path / "one.h5", 10, 2, snr=30.0, seed=4, progress=False)
    two = generate_dataset(tmp_path / "two.h5", 10, 2, snr=30.0, seed=5, progress=False)
    assert evaluate(Oracle(jacobian_file=cache), one, progress=False)["oracle"]["jacobian_cache"]["computed"] == 20
    # other labels: nothing in the cache matches
    first = evaluate(Oracle(jacobian_file=cache), two, progress=False)
    assert first["oracle"]["jacobian_cache"]["computed"] == 20
    # a cache made for another synthesizer is ignored, so a tampered entry is never used
    with h5py.File(cache, "r+") as f:
        f["gram"][0] = f["gram"][0] * 10
        f.attrs["synthesizer"] = "something else"
    res = evaluate(Oracle(jacobian_file=cache), two, progress=False)
    assert res["oracle"]["jacobian_cache"]["computed"] == 20
    assert res["frac_rank0"] == first["frac_rank0"] and res["rank_cdf"] == first["rank_cdf"]
    # a masked pixel changes the star's ivar pattern: only that star is recomputed
    masked = tmp_path / "masked.h5"
    with open_dataset(two) as ds, DatasetWriter(masked, ds.wavelength, ds.label_names, attrs=ds.attrs) as w:
        b = ds.read()
        ivar = b.ivar.copy()
        ivar[5, 100:200] = 0.0
        w.append(b.flux, ivar, b.labels, b.group)
    stats = evaluate(Oracle(jacobian_file=cache), masked, progress=False)["oracle"]["jacobian_cache"]
    assert stats["computed"] == 1 and stats["reused"] == 19
    # a file that is not a Jacobian cache (the user named the wrong one) is refused and left as it was
    for foreign in (tmp_path / "notes.txt", tmp_path / "other.h5"):
        if foreign.suffix == ".txt":
            foreign.write_text("not hdf5")
        else:
            with h5py.File(foreign, "w") as f:
                f["spectra"] = np.arange(5.0)
        before = foreign.read_bytes()
        with pytest.raises(InputError, match="is not a (readable )?chemtwin Jacobian cache"):
            evaluate(Oracle(jacobian_file=foreign), two, progress=False)
        assert foreign.read_bytes() == before
    monkeypatch.undo()  # one block, no cache: the same numbers
    plain = evaluate("oracle", two, progress=False)
    assert plain["rank_cdf"] == first["rank_cdf"]
    # other batches: the synthesizer truncates its broadening kernel at 4 sigma of the batch's
    # widest star, so spectra and Jacobians depend on the batch at the ~3e-5 level
    for name, value in first["oracle"]["sigma_median"].items():
        assert plain["oracle"]["sigma_median"][name] == pytest.approx(value, rel=1e-4), name


# ---------------------------------------------------------------------- bad input and CLI
def _copy(src, dst, names=LABEL_NAMES, group=None, **attrs):
    with open_dataset(src) as ds, DatasetWriter(dst, ds.wavelength, names, attrs={**ds.attrs, **attrs}) as w:
        b = ds.read()
        w.append(b.flux, b.ivar, b.labels[:, [LABEL_NAMES.index(n) for n in names]],
                 b.group if group is None else group)
    return dst


def test_bad_datasets_are_input_errors(sets, tmp_path):
    _, paths = sets
    src = paths[30.0]
    with pytest.raises(InputError, match="made by 'payne-emulator'"):
        evaluate("oracle", _copy(src, tmp_path / "a.h5", generator="payne-emulator"), progress=False)
    augment = json.dumps({"rv_max": 5.0, "snr": None})
    with pytest.raises(InputError, match="augmented with rv_max"):
        evaluate("oracle", _copy(src, tmp_path / "b.h5", augment=augment), progress=False)
    with pytest.raises(InputError, match="unknown label.*NI_FE"):
        evaluate("oracle", _copy(src, tmp_path / "c.h5", names=LABEL_NAMES[:-1]), progress=False)
    with pytest.raises(InputError, match="no twin groups"):
        evaluate("oracle", _copy(src, tmp_path / "d.h5", group=np.arange(80)), progress=False)
    with pytest.raises(InputError, match="unknown metric|metric"):
        evaluate("oracle", src, metric="l3", progress=False)


def test_cli_oracle(sets, tmp_path, capsys):
    d, paths = sets
    out = tmp_path / "oracle.json"
    cache = tmp_path / "jac.h5"
    assert main(["evaluate", str(paths[300.0]), "--method", "oracle", "--json", str(out),
                 "--jacobians", str(cache)]) == 0
    res = json.loads(out.read_text())
    assert res["method"] == "oracle" and res["metric"] == "l2" and res["frac_rank0"] == 1.0
    assert cache.is_file()
    bad = _copy(paths[300.0], tmp_path / "foreign.h5", generator="chemtwin ingest")
    assert main(["evaluate", str(bad), "--method", "oracle", "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not by the embedded synthesizer" in err[0]


def test_cli_oracle_given_labels(sets, tmp_path, capsys):
    d, paths = sets
    cache = tmp_path / "jac.h5"
    res = {}
    for name, given in (("free", []), ("exact", ["--given-labels", "TEFF=0,LOGG=0"]),
                        ("quoted", ["--given-labels", "TEFF=50,LOGG=0.07"])):
        out = tmp_path / f"{name}.json"
        assert main(["-q", "evaluate", str(paths[10.0]), "--method", "oracle", "--json", str(out),
                     "--jacobians", str(cache), *given]) == 0
        res[name] = json.loads(out.read_text())
    assert res["quoted"]["model"]["given_labels"] == {"TEFF": 50.0, "LOGG": 0.07}
    assert "TEFF" in res["quoted"]["model"]["free_labels"] and "TEFF" not in res["exact"]["model"]["free_labels"]
    sigma = {k: np.array([r["oracle"]["sigma_median"][n] for n in CHEMICAL_LABELS]) for k, r in res.items()}
    assert (sigma["exact"] <= sigma["quoted"] * (1 + 1e-9)).all()
    assert (sigma["quoted"] <= sigma["free"] * (1 + 1e-9)).all()
    assert (sigma["quoted"] < 0.99 * sigma["free"]).any()
    for argv, message in [(["--method", "oracle", "--given-labels", "TEFF=-1"], "finite and >= 0"),
                          (["--method", "oracle", "--given-labels", "TEFF"], "NAME=VALUE"),
                          (["--method", "oracle", "--given-labels", "TEFF=50,TEFF=60"], "given twice"),
                          (["--method", "oracle", "--given-labels", "MG_FE=0.1"], "non-chemical"),
                          (["--method", "raw", "--given-labels", "TEFF=50"], "--given-labels is for --method oracle")]:
        out = tmp_path / "bad.json"
        assert main(["evaluate", str(paths[10.0]), *argv, "--json", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()
