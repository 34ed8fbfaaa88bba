"""The bench's survey protocol: TEFF/LOGG with survey errors, the truth kept for scoring only,
the model-based methods on another code, and the Cannon on that pipeline's labels."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from chemtwin.data.dataset import open_dataset
from chemtwin.data.generate import generate_dataset
from chemtwin.data.label_errors import LabelErrors
from chemtwin.errors import InputError
from chemtwin.evaluation.bench import BenchConfig
from chemtwin.evaluation.pipeline_labels import write_pipeline_labels
from chemtwin.spectral_models.labels import LABEL_NAMES, default_vmicro
from chemtwin.tagging.oracle import oracle_covariance
from chemtwin.tagging.payne_train import train_emulator

NAMES = list(LABEL_NAMES)
TEFF, LOGG, FEH, VMICRO = (NAMES.index(n) for n in ("TEFF", "LOGG", "FE_H", "VMICRO"))


def _truth(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, len(NAMES)))
    labels[:, TEFF] = rng.uniform(4000, 5500, n)
    labels[:, LOGG] = rng.uniform(1, 3.5, n)
    labels[:, FEH] = rng.uniform(-1, 0.5, n)
    return labels


@pytest.mark.parametrize("field", ["teff_random", "logg_random", "teff_per_feh", "logg_per_feh"])
def test_negative_or_non_finite_label_errors_are_refused(field):
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match=field):
            LabelErrors(**{field: bad})


def test_label_errors_follow_their_formula_and_seed():
    truth = _truth(20_000)
    systematic = LabelErrors(teff_random=0, logg_random=0, teff_per_feh=80, logg_per_feh=0.1)
    out = systematic.apply(truth, NAMES, np.random.default_rng(1))
    np.testing.assert_allclose(out[:, TEFF] - truth[:, TEFF], 80 * truth[:, FEH], atol=1e-9)
    np.testing.assert_allclose(out[:, LOGG] - truth[:, LOGG], 0.1 * truth[:, FEH], atol=1e-12)
    np.testing.assert_allclose(out[:, VMICRO], default_vmicro(out[:, LOGG]))  # derived from the survey's LOGG
    untouched = [k for k, n in enumerate(NAMES) if n not in ("TEFF", "LOGG", "VMICRO", "VMACRO")]
    np.testing.assert_array_equal(out[:, untouched], truth[:, untouched])

    random = LabelErrors(teff_random=40, logg_random=0.05, teff_per_feh=0, logg_per_feh=0)
    a = random.apply(truth, NAMES, np.random.default_rng(7))
    dt, dg = a[:, TEFF] - truth[:, TEFF], a[:, LOGG] - truth[:, LOGG]
    assert abs(dt.std() - 40) < 1.5 and abs(dt.mean()) < 1.0
    assert abs(dg.std() - 0.05) < 0.002 and abs(np.corrcoef(dt, dg)[0, 1]) < 0.03
    np.testing.assert_array_equal(a, random.apply(truth, NAMES, np.random.default_rng(7)))
    assert not np.array_equal(a, random.apply(truth, NAMES, np.random.default_rng(8)))
    with pytest.raises(InputError, match="FE_H"):
        random.apply(truth[:, :2], ["TEFF", "LOGG"], np.random.default_rng(0))


def test_generated_survey_set_keeps_the_spectra_and_the_truth(tmp_path):
    plain, survey = tmp_path / "plain.h5", tmp_path / "survey.h5"
    generate_dataset(plain, 40, snr=100, seed=3, progress=False)
    errors = LabelErrors()
    generate_dataset(survey, 40, snr=100, seed=3, progress=False, label_errors=errors)
    with open_dataset(plain) as p, open_dataset(survey) as s:
        assert not p.has_true_labels and s.has_true_labels
        np.testing.assert_array_equal(p.read().flux, s.read().flux)  # the errors are drawn after the noise
        np.testing.assert_array_equal(s.true_labels(), p.labels())
        np.testing.assert_array_equal(p.true_labels(), p.labels())  # no errors: the labels are the truth
        d = s.labels() - p.labels()
        assert np.all(d[:, TEFF] != 0) and np.all(d[:, LOGG] != 0)
        assert 15 < np.std(d[:, TEFF]) < 100
        assert s.attrs["linelist"] == "calibrated" and LabelErrors(**__import__("json").loads(
            s.attrs["label_errors"])) == errors
        # twins share the systematic, not the random draw
        g = s.group
        first, second = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]), np.flatnonzero(np.r_[g[1:] == g[:-1], False]) + 1
        assert np.all(d[first, TEFF] != d[second, TEFF])


def test_oracle_uses_the_truth_and_refuses_another_line_list(tmp_path):
    plain, survey, drawn = tmp_path / "p.h5", tmp_path / "s.h5", tmp_path / "d.h5"
    generate_dataset(plain, 3, snr=100, seed=4, progress=False)
    generate_dataset(survey, 3, snr=100, seed=4, progress=False, label_errors=LabelErrors())
    generate_dataset(drawn, 3, snr=100, seed=4, progress=False, linelist="drawn")
    with open_dataset(plain) as p, open_dataset(survey) as s:
        cov_p, labels_p, _ = oracle_covariance(p, progress=False)
        cov_s, labels_s, _ = oracle_covariance(s, progress=False)
    np.testing.assert_array_equal(labels_s, labels_p)
    np.testing.assert_allclose(cov_s, cov_p, rtol=1e-6)
    with open_dataset(drawn) as d, pytest.raises(InputError, match="'drawn' line list"):
        oracle_covariance(d, progress=False)


def test_the_two_line_lists_make_different_spectra_of_the_same_stars(tmp_path):
    generate_dataset(tmp_path / "c.h5", 5, seed=2, progress=False)
    generate_dataset(tmp_path / "d.h5", 5, seed=2, progress=False, linelist="drawn")
    with open_dataset(tmp_path / "c.h5") as c, open_dataset(tmp_path / "d.h5") as d:
        np.testing.assert_array_equal(c.labels(), d.labels())
        rms = np.sqrt(np.mean((c.read().flux - d.read().flux) ** 2))
    assert rms > 0.02  # lines in other places: not a small perturbation
    with pytest.raises(InputError, match="unknown line list"):
        generate_dataset(tmp_path / "x.h5", 1, progress=False, linelist="turbospectrum")
    assert not (tmp_path / "x.h5").exists()


def test_pipeline_labels_replace_the_abundances_with_the_other_codes_fit(tmp_path):
    """The Cannon's survey labels: TEFF/LOGG as the survey gives them, abundances as a Payne with
    an emulator of other atomic data fits them (wrong by the mismatch), the truth kept apart."""
    emu_data, train = tmp_path / "emu.h5", tmp_path / "train.h5"
    generate_dataset(emu_data, 300, seed=5, progress=False, mismatch=True)
    emulator, _ = train_emulator(emu_data, labels=["TEFF", "LOGG", "FE_H", "MG_FE"], epochs=None, time_limit=15,
                                 seed=0, progress=False)
    generate_dataset(train, 40, snr=100, seed=6, progress=False, label_errors=LabelErrors())
    out = write_pipeline_labels(train, emulator, tmp_path / "pipeline.h5", 60, progress=False)
    with open_dataset(train) as tr, open_dataset(out) as pl:
        assert 10 <= pl.n_stars <= 60 and pl.has_true_labels
        rows = np.flatnonzero(np.isin(tr.read(0, 60).flux[:, 100], pl.read().flux[:, 100]))
        assert len(rows) == pl.n_stars  # the kept stars are training stars, in order
        survey, truth, fitted = tr.labels()[rows], tr.true_labels()[rows], pl.labels()
        np.testing.assert_array_equal(pl.true_labels(), truth)
        for name in ("TEFF", "LOGG", "C_FE"):  # kept: the survey's TEFF/LOGG; not fitted: as the set gives it
            np.testing.assert_array_equal(fitted[:, NAMES.index(name)], survey[:, NAMES.index(name)])
        for name in ("FE_H", "MG_FE"):
            k = NAMES.index(name)
            assert not np.allclose(fitted[:, k], truth[:, k], atol=1e-3)
            assert np.all(np.isfinite(fitted[:, k]))


def test_bench_config_records_the_protocol_and_refuses_an_unknown_one(tmp_path):
    with pytest.raises(InputError, match="unknown protocol"):
        BenchConfig(protocol="asteroseismic")
    cfg = BenchConfig.quick_config(label_errors={"teff_random": 10.0})
    assert cfg.label_errors == LabelErrors(teff_random=10.0) and cfg.needs_pipeline_labels()
    assert not BenchConfig.quick_config(protocol="paper").needs_pipeline_labels()
    assert not BenchConfig.quick_config(methods=("fader", "payne")).needs_pipeline_labels()


def test_a_dataset_with_damaged_true_labels_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    generate_dataset(path, 2, seed=1, progress=False, label_errors=LabelErrors())
    with h5py.File(path, "r+") as f:  # a column of another length than labels
        names = f["true_labels"].attrs["names"]
        del f["true_labels"]
        f["true_labels"] = np.zeros((3, len(NAMES)), np.float32)
        f["true_labels"].attrs["names"] = names
    with pytest.raises(InputError, match="shapes disagree"):
        open_dataset(path)
