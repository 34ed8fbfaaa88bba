"""The decoded-twin metric (twin-free): the scatter between the model's own decoder-made twins."""

import json

import h5py
import numpy as np
import pytest

from chemtwin.cli import main
from chemtwin.errors import InputError
from chemtwin.evaluation.metrics import evaluate_tags
from chemtwin.search.twin_metric import DecodedTwinMetric

SIGMA = 0.01  # flux noise of every pixel


class LinearModel:
    """A model with the ChemTwin interface whose answer is known: flux = M z + B u, and an encoder
    that inverts M but leaks the labels into z (z_hat = z + L u + noise)."""

    condition_ = ("TEFF", "LOGG")

    def __init__(self, n_pixels=60, latent_dim=4, seed=0):
        rng = np.random.default_rng(seed)
        self.M = rng.normal(size=(n_pixels, latent_dim))
        self.B = rng.normal(size=(n_pixels, 2))
        self.L = np.zeros((latent_dim, 2))
        self.L[0, 0] = 0.8  # dimension 0 carries TEFF
        self.pinv = np.linalg.pinv(self.M)

    @staticmethod
    def scaled(u):
        return (np.asarray(u, float) - [4750.0, 2.25]) / [400.0, 0.7]

    def swap(self, z, cond):
        return (z @ self.M.T + self.scaled(cond) @ self.B.T).astype(np.float32)

    def transform(self, flux, ivar, cond):
        u = self.scaled(cond)
        return ((flux - u @ self.B.T) @ self.pinv.T + u @ self.L.T).astype(np.float32)

    def analytic_within(self, label_errors=(0.0, 0.0)):
        """Half the covariance of the difference of two decoded twins' latents: noise through
        the encoder, the leak of two independent label draws (uniform TEFF/LOGG below), and a
        spectrum rendered at labels off by ``label_errors`` (1 sigma) but encoded at the given ones."""
        cov_u = np.diag([(1000 / 400) ** 2 / 12, (2.5 / 0.7) ** 2 / 12])
        cov_err = np.diag((np.asarray(label_errors) / [400.0, 0.7]) ** 2)
        bias = self.pinv @ self.B
        return SIGMA**2 * self.pinv @ self.pinv.T + self.L @ cov_u @ self.L.T + bias @ cov_err @ bias.T


def _stars(model, n, seed):
    """Stars of random chemistry z at uniform TEFF 4250-5250 K, LOGG 1-3.5, observed with noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, model.M.shape[1]))
    cond = np.column_stack([rng.uniform(4250, 5250, n), rng.uniform(1.0, 3.5, n)])
    flux = model.swap(z, cond) + SIGMA * rng.standard_normal((n, model.M.shape[0]))
    return z, flux.astype(np.float32), np.full(flux.shape, SIGMA**-2, np.float32), cond


def test_the_metric_is_the_analytic_within_twin_covariance_of_a_linear_model():
    model = LinearModel()
    _, flux, ivar, cond = _stars(model, 20000, seed=1)
    metric = DecodedTwinMetric(n_pairs=20000, seed=0).fit(model, flux, ivar, cond)
    assert metric.n_pairs_ == 20000
    chol_inv = metric.whitening_
    within = np.linalg.inv(chol_inv.T @ chol_inv)
    expected = model.analytic_within()
    assert np.linalg.norm(within - expected) / np.linalg.norm(expected) < 0.05
    # the leaking dimension is the one it trusts least
    assert np.argmax(np.diag(within)) == 0

    # labels quoted with errors: the twins are rendered off the given labels, and the metric adds
    # exactly that scatter (the same seed draws the same pairs and noise, so the rest cancels)
    errors = {"TEFF": 100.0, "LOGG": 0.2}
    metric = DecodedTwinMetric(n_pairs=20000, seed=0, label_errors=errors).fit(model, flux, ivar, cond)
    added = np.linalg.inv(metric.whitening_.T @ metric.whitening_) - within
    expected = model.analytic_within((100.0, 0.2)) - model.analytic_within()
    assert np.linalg.norm(added - expected) / np.linalg.norm(expected) < 0.1


def test_twins_the_leak_hides_are_found_in_the_decoded_metric():
    """Twins share z and differ in TEFF/LOGG; the leak of TEFF into dimension 0 spoils the raw
    ranks, the decoded metric (learnt on other, unpaired stars) shrinks it."""
    model = LinearModel()
    model.L[0, 0] = 3.0
    _, flux, ivar, cond = _stars(model, 4000, seed=2)
    metric = DecodedTwinMetric(n_pairs=4000, seed=0).fit(model, flux, ivar, cond)
    z, _, _, cond = _stars(model, 600, seed=3)
    z = np.repeat(z[::2], 2, axis=0)  # pairs of twins
    rng = np.random.default_rng(4)
    x = model.swap(z, cond) + SIGMA * rng.standard_normal((len(z), model.M.shape[0]))
    latents = model.transform(x, None, cond)
    group = np.repeat(np.arange(len(z) // 2), 2)
    raw = evaluate_tags(latents, group, "l2", progress=False)["frac_rank0"]
    white = evaluate_tags(metric.transform(latents), group, "l2", progress=False)["frac_rank0"]
    assert white > raw + 0.2


def test_the_same_seed_gives_the_same_metric_and_another_seed_another():
    model = LinearModel()
    _, flux, ivar, cond = _stars(model, 500, seed=5)
    a = DecodedTwinMetric(n_pairs=300, seed=7).fit(model, flux, ivar, cond).whitening_
    b = DecodedTwinMetric(n_pairs=300, seed=7).fit(model, flux, ivar, cond).whitening_
    c = DecodedTwinMetric(n_pairs=300, seed=8).fit(model, flux, ivar, cond).whitening_
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_bad_input():
    model = LinearModel()
    _, flux, ivar, cond = _stars(model, 10, seed=6)
    with pytest.raises(InputError, match="n_pairs"):
        DecodedTwinMetric(n_pairs=1)
    with pytest.raises(InputError, match="finite and >= 0"):
        DecodedTwinMetric(label_errors={"TEFF": -1.0})
    with pytest.raises(InputError, match="conditioned on TEFF, LOGG"):
        DecodedTwinMetric(label_errors={"FE_H": 0.1}).fit(model, flux, ivar, cond)
    with pytest.raises(InputError, match="at least 2 stars"):
        DecodedTwinMetric().fit(model, flux[:2], np.zeros_like(ivar[:2]), cond[:2])
    with pytest.raises(InputError, match="not fitted"):
        DecodedTwinMetric().transform(flux[:, :4])
    # noiseless spectra and an encoder blind to the labels: nothing to whiten
    model.L[:] = 0
    with pytest.raises(InputError, match="no scatter"):
        DecodedTwinMetric().fit(model, flux, np.full_like(ivar, np.inf), cond)


def test_a_trained_model_through_the_method_row_and_the_whiten_command(tmp_path, capsys):
    """``fader_decoded``: a real ChemTwin, its metric learnt from its training file without the groups."""
    from chemtwin.data.dataset import open_dataset
    from chemtwin.data.dataset_writer import DatasetWriter
    from chemtwin.evaluation.evaluate import evaluate
    from chemtwin.methods import get_method
    from chemtwin.tagging.estimator import ChemTwin
    from fake_twins import write_fake

    train, val = tmp_path / "train.h5", tmp_path / "val.h5"
    write_fake(train, n_groups=150, seed=0, ivar_value=1e4)
    write_fake(val, n_groups=60, seed=1, ivar_value=1e4)
    ct = ChemTwin(epochs=3, latent_dim=5, batch_size=64, seed=0, device="cpu").fit(str(train), progress=False)
    ct.save(tmp_path / "m")
    with open_dataset(train) as ds:
        metric = DecodedTwinMetric(n_pairs=200, seed=0).fit_dataset(ct, ds)
    assert metric.n_pairs_ == 200 and np.isfinite(metric.whitening_).all()
    result = evaluate(get_method("fader_decoded"), str(val), model=str(tmp_path / "m"), train=str(train),
                      metric="l2", progress=False)
    assert result["decoded_twin_metric"]["n_pairs"] == 300  # all 300 training stars, fewer than 5000
    with open_dataset(val) as ds:
        z = metric.transform(ct.transform(ds))
    assert z.shape == (120, 5) and np.isfinite(z).all()
    assert 0 <= result["frac_rank0"] <= 1

    # the same metric through `chemtwin embed` + `chemtwin whiten --model --spectra`
    latents, white = tmp_path / "z.h5", tmp_path / "white.h5"
    assert main(["-q", "embed", str(tmp_path / "m"), str(val), "--out", str(latents)]) == 0
    assert main(["-q", "whiten", str(latents), "--model", str(tmp_path / "m"), "--spectra", str(train),
                 "--pairs", "200", "--out", str(white)]) == 0
    with h5py.File(white) as f:
        np.testing.assert_allclose(f["z"][:], z, rtol=1e-4, atol=1e-4)
        assert f.attrs["twin_metric_pairs"] == 200 and f.attrs["twin_metric_seed"] == 0
    # a survey's file: no star in a known group; the metric never reads the groups, so it is the same
    survey = tmp_path / "survey.h5"
    with open_dataset(train) as ds:
        batch = ds.read()
        with DatasetWriter(survey, ds.wavelength, list(ds.label_names)) as w:
            w.append(batch.flux, batch.ivar, batch.labels, np.full(ds.n_stars, -1))
    assert main(["-q", "whiten", str(latents), "--model", str(tmp_path / "m"), "--spectra", str(survey),
                 "--pairs", "200", "--out", str(tmp_path / "survey_white.h5")]) == 0
    with h5py.File(white) as f, h5py.File(tmp_path / "survey_white.h5") as g:
        assert np.array_equal(f["z"][:], g["z"][:])

    # with the labels' errors: another metric, recorded in the file
    assert main(["-q", "whiten", str(latents), "--model", str(tmp_path / "m"), "--spectra", str(train),
                 "--pairs", "200", "--label-errors", "TEFF=50,LOGG=0.07", "--out", str(white), "--overwrite"]) == 0
    with h5py.File(white) as f:
        assert not np.allclose(f["z"][:], z, atol=1e-3)
        assert json.loads(f.attrs["twin_metric_label_errors"]) == {"TEFF": 50.0, "LOGG": 0.07}

    # bad input: one line, exit 2, nothing written
    out = tmp_path / "o.h5"
    for argv, message in [(["--model", str(tmp_path / "m")], "either --train"),
                          (["--train", str(latents), "--model", str(tmp_path / "m"), "--spectra", str(train)],
                           "either --train"),
                          (["--model", str(tmp_path / "nowhere"), "--spectra", str(train)], "nowhere"),
                          (["--model", str(tmp_path / "m"), "--spectra", str(tmp_path / "missing.h5")], "missing.h5"),
                          (["--model", str(tmp_path / "m"), "--spectra", str(train), "--label-errors", "TEFF=-5"],
                           "finite and >= 0"),
                          (["--model", str(tmp_path / "m"), "--spectra", str(train), "--label-errors", "=5"],
                           "conditioned on"),
                          (["--model", str(tmp_path / "m"), "--spectra", str(train), "--label-errors", "TEFF"],
                           "NAME=VALUE"),
                          (["--model", str(tmp_path / "m"), "--spectra", str(train), "--label-errors", "FE_H=0.1"],
                           "conditioned on")]:
        assert main(["whiten", str(latents), *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()
