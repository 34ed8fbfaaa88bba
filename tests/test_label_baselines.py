"""The Cannon and The Payne as twin-ranking methods (chemtwin.methods.cannon / payne)."""

import json

import numpy as np
import pytest

from chemtwin.cli import main
from chemtwin.core.whitening import whitening_matrix
from chemtwin.data.generate import generate_dataset
from chemtwin.data.population import RedGiantPrior
from chemtwin.errors import InputError
from chemtwin.evaluation.evaluate import evaluate
from chemtwin.methods.cannon import CannonLabels
from chemtwin.methods.label_fit import independent_labels
from chemtwin.methods.payne import PayneLabels
from chemtwin.spectral_models.labels import CHEMICAL_LABELS, LABEL_NAMES

RESULT_KEYS = {"method", "metric", "n_stars", "n_pairs", "mse_reconstruction", "mse_swapped", "frac_rank0",
               "frac_rank_lt_0p1pct", "frac_rank_lt_1pct", "median_rank", "rank_cdf", "model", "dataset"}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Noiseless twin pairs: 300 training and 100 validation pairs."""
    root = tmp_path_factory.mktemp("label_baselines")
    train, val = root / "train.h5", root / "val.h5"
    generate_dataset(train, n_groups=300, seed=0, progress=False)
    generate_dataset(val, n_groups=100, seed=1, progress=False)
    return train, val


def check_result(result, method, n_stars=200):
    assert RESULT_KEYS <= set(result) and result["method"] == method and result["metric"] == "l2"
    assert result["n_stars"] == n_stars and result["n_pairs"] == n_stars
    assert result["mse_reconstruction"] is None and result["mse_swapped"] is None
    assert 0 <= result["frac_rank0"] <= result["frac_rank_lt_1pct"] <= 1
    fit = result["label_fit"]
    assert fit["abundances"] == [n for n in CHEMICAL_LABELS if n in fit["labels"]]
    json.dumps(result, allow_nan=False)


def test_independent_labels():
    rng = np.random.default_rng(0)
    logg = rng.uniform(1, 3.5, 500)
    values = np.column_stack([rng.uniform(4000, 5500, 500), logg, 2.478 - 0.325 * logg, 6 - logg,
                              rng.normal(0, 0.2, (500, len(CHEMICAL_LABELS)))])
    assert independent_labels(LABEL_NAMES, values) == ["TEFF", "LOGG", *CHEMICAL_LABELS]
    values[:, 2] += rng.normal(0, 0.3, 500)  # VMICRO with its own scatter
    assert independent_labels(LABEL_NAMES, values) == ["TEFF", "LOGG", "VMICRO", *CHEMICAL_LABELS]


def test_whitening_matrix():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 4)) * np.array([1e3, 1, 1e-2, 1e-3])[:, None]  # very different scales
    cov = a @ a.T
    w = whitening_matrix(cov)
    assert np.allclose(w @ cov @ w.T, np.eye(4), atol=1e-8)
    per_star = np.stack([cov, 3 * cov, np.full((4, 4), np.nan)])  # the mean of the finite ones: 2 cov
    assert np.allclose(whitening_matrix(per_star), whitening_matrix(2 * cov))
    assert np.array_equal(whitening_matrix(np.zeros((3, 3))), np.eye(3))  # noiseless: nothing to whiten
    with pytest.raises(InputError, match="positive definite"):
        whitening_matrix(np.diag([1.0, -1e-3, 1.0]))


def test_cannon_row(sets):
    train, val = sets
    labels = ["TEFF", "LOGG", "FE_H", "MG_FE", "NI_FE"]  # the default (19 labels, 210 terms) takes ~20 s here
    result, ranks = evaluate(CannonLabels(label_names=labels), val, train=train, progress=False, return_ranks=True)
    check_result(result, "cannon")
    fit = result["label_fit"]
    assert fit["labels"] == labels and result["model"]["n_terms"] == 21
    assert fit["whitening"] == "errors" and fit["holdout"]["n_stars"] == 120 and fit["n_train"] == 480
    assert fit["n_failed"] == 0 and len(ranks.rank) == 200
    # noiseless spectra: FE_H to ~0.01 dex even though 14 abundances vary unmodelled; three
    # abundances are too few to single out every twin, but enough for most
    assert fit["accuracy"]["FE_H"]["rmse"] < 0.05
    assert result["frac_rank_lt_1pct"] > 0.5
    formal = evaluate(CannonLabels(label_names=labels, whiten="formal", max_train_stars=300), val, train=train,
                      progress=False)
    assert formal["label_fit"]["whitening"] == "formal" and formal["label_fit"]["holdout"] is None
    assert formal["label_fit"]["n_train"] == 300


def test_payne_rows(sets, tmp_path):
    train, val = sets
    labels = ["TEFF", "LOGG", "FE_H", "MG_FE", "NI_FE"]
    fast = {"max_iter": 8, "n_candidates": 256}  # a crude emulator of 5 of the 21 labels converges slowly
    # an emulator trained here (time-bounded), whitened by its errors on held-out training stars
    result = evaluate(PayneLabels(label_names=labels, time_limit=3.0, hidden=32, holdout_stars=100, fitter=fast), val,
                      train=train, progress=False)
    check_result(result, "payne")
    fit = result["label_fit"]
    assert fit["labels"] == labels and fit["abundances"] == ["FE_H", "MG_FE", "NI_FE"]
    assert fit["emulator"]["trained_here"] and fit["emulator"]["n_train"] == 450  # 500 minus 10% validation
    assert fit["whitening"] == "errors" and fit["holdout"]["n_stars"] == 100 and fit["n_failed"] == 0
    # a ready emulator: formal whitening unless labelled calibration stars are given
    from chemtwin.tagging.payne_train import train_emulator

    emu, _ = train_emulator(train, labels=labels, hidden=32, epochs=3, progress=False)
    emu.save(tmp_path / "emu.npz")
    formal = evaluate(PayneLabels(fitter=fast), val, emulator=tmp_path / "emu.npz", progress=False)
    assert formal["label_fit"]["whitening"] == "formal" and formal["model"]["path"].endswith("emu.npz")
    check_result(formal, "payne")
    calibrated = evaluate(PayneLabels(holdout_stars=50, fitter=fast), val, emulator=emu, calibration=train,
                          progress=False)
    assert calibrated["label_fit"]["whitening"] == "errors" and calibrated["label_fit"]["holdout"]["n_stars"] == 50
    with pytest.raises(InputError, match="calibration"):
        evaluate(PayneLabels(whiten="errors"), val, emulator=emu, progress=False)


def test_bad_input(sets, tmp_path):
    train, val = sets
    with pytest.raises(InputError, match="whiten"):
        CannonLabels(whiten="median")
    with pytest.raises(InputError, match="unknown label"):
        evaluate(CannonLabels(label_names=["TEFF", "LOGG", "ALPHA_M"]), val, train=train, progress=False)
    with pytest.raises(InputError, match="no abundance"):
        evaluate(CannonLabels(label_names=["TEFF", "LOGG"]), val, train=train, progress=False)
    singles = tmp_path / "singles.h5"
    generate_dataset(singles, n_groups=20, group_size=1, seed=2, progress=False, prior=RedGiantPrior())
    with pytest.raises(InputError, match="no twin groups"):
        evaluate("cannon", singles, train=train, progress=False)


def test_cli(sets, tmp_path, capsys):
    train, val = sets
    from chemtwin.tagging.payne_train import train_emulator

    emu, _ = train_emulator(train, labels=["TEFF", "LOGG", "FE_H", "MG_FE"], hidden=16, epochs=2, progress=False)
    emu.save(tmp_path / "emu.npz")
    small = tmp_path / "small.h5"
    generate_dataset(small, n_groups=20, seed=5, progress=False)
    out = tmp_path / "payne.json"
    # a labelled set serves as the calibration set (--train) with --emulator; here the evaluated one
    assert main(["--quiet", "evaluate", str(small), "--method", "payne", "--train", str(small), "--emulator",
                 str(tmp_path / "emu.npz"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == "payne" and result["metric"] == "l2" and result["label_fit"]["whitening"] == "errors"
    assert result["n_stars"] == 40 and result["label_fit"]["holdout"]["n_stars"] == 40
    for args, message in ((["--method", "cannon"], "needs --train"),
                          (["--method", "payne", "--emulator", str(tmp_path / "emu.npz")], "needs --train"),
                          (["--method", "cannon", "--train", str(train), "--emulator", "x.npz"], "--emulator is for"),
                          (["--method", "payne", "--train", str(train), "--emulator", str(val)], "npz")):
        capsys.readouterr()
        assert main(["evaluate", str(val), "--json", str(tmp_path / "bad.json"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "bad.json").exists()
