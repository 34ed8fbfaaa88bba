"""'Observed-like' spectra: the synthesizer with a perturbed line list (chemtwin generate --mismatch)."""

from dataclasses import replace

import numpy as np
import pytest

from chemtwin.cli import main
from chemtwin.data.dataset import open_dataset
from chemtwin.data.generate import MISMATCH_SEED, generate_dataset
from chemtwin.errors import InputError
from chemtwin.spectral_models.linelist import load_linelist


def test_perturbed_line_list():
    # each line tagged by its position (blend companions share a wavelength, so that cannot tell them apart)
    lines = replace(load_linelist(), chi_exc=np.arange(len(load_linelist()), dtype=float))
    a = lines.perturbed(loggf_sigma=0.1, drop_fraction=0.1, seed=1)
    assert len(a) == len(lines) - round(0.1 * len(lines))
    # the kept lines are the original ones, in order, with only log gf (log_strength_ref) moved
    kept = np.isin(lines.chi_exc, a.chi_exc)
    assert kept.sum() == len(a)
    assert np.array_equal(lines.species[kept], a.species) and np.array_equal(lines.wavelength[kept], a.wavelength)
    jitter = a.log_strength_ref - lines.log_strength_ref[kept]
    assert abs(jitter.std() - 0.1) < 0.01 and abs(jitter.mean()) < 0.01
    b = lines.perturbed(seed=1)
    assert np.array_equal(a.wavelength, b.wavelength) and np.array_equal(a.log_strength_ref, b.log_strength_ref)
    c = lines.perturbed(seed=2)
    assert not np.array_equal(a.wavelength, c.wavelength)
    assert len(lines.perturbed(loggf_sigma=0.0, drop_fraction=0.0)) == len(lines)
    for bad in ({"loggf_sigma": -0.1}, {"drop_fraction": 1.0}, {"drop_fraction": -0.1}):
        with pytest.raises(InputError):
            lines.perturbed(**bad)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mismatch")
    out = {}
    for name, kwargs in (("clean", {}), ("mismatch", {"mismatch": True}), ("again", {"mismatch": True}),
                         ("other", {"mismatch": 5}), ("noisy", {"mismatch": True, "snr": 50.0})):
        out[name] = root / f"{name}.h5"
        generate_dataset(out[name], n_groups=12, seed=3, progress=False, **kwargs)
    return out


def read(path):
    with open_dataset(path) as ds:
        return ds.read(), ds.attrs


def test_mismatch_spectra_differ_plausibly_with_the_same_labels(files):
    clean, clean_attrs = read(files["clean"])
    mism, attrs = read(files["mismatch"])
    assert np.array_equal(clean.labels, mism.labels) and np.array_equal(clean.group, mism.group)
    assert clean_attrs["generator"] == "chemtwin.lines" and "mismatch_seed" not in clean_attrs
    assert attrs["generator"] == "chemtwin.lines+mismatch" and attrs["mismatch_seed"] == MISMATCH_SEED
    assert attrs["mismatch_loggf_sigma"] == 0.1 and attrs["mismatch_drop_fraction"] == 0.1
    diff = np.abs(mism.flux - clean.flux)
    # most pixels move by a fraction of a percent (log gf jitter on weak lines); a few by tens of
    # percent (dropped strong lines); the continuum stays put
    assert 3e-4 < np.median(diff) < 0.02
    assert 0.1 < diff.max() < 0.9
    assert np.sqrt(np.mean(diff**2)) < 0.1
    assert np.all(np.abs(mism.flux - 1) <= 1)


def test_mismatch_is_deterministic_per_seed(files):
    a, _ = read(files["mismatch"])
    b, _ = read(files["again"])
    other, other_attrs = read(files["other"])
    assert np.array_equal(a.flux, b.flux)
    assert other_attrs["mismatch_seed"] == 5 and np.array_equal(a.labels, other.labels)
    assert np.abs(other.flux - a.flux).max() > 0.05
    noisy, noisy_attrs = read(files["noisy"])
    assert np.array_equal(noisy.labels, a.labels) and noisy_attrs["snr"] == 50.0
    assert abs(np.std(noisy.flux - a.flux) - 0.02) < 0.002  # noise on top of the same mismatched spectra


def test_bad_mismatch_values(tmp_path):
    for bad in (-1, 1.5, "yes"):
        with pytest.raises(InputError, match="mismatch"):
            generate_dataset(tmp_path / "x.h5", n_groups=1, mismatch=bad, progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_oracle_refuses_mismatch_data(files):
    from chemtwin.evaluation.evaluate import evaluate

    with pytest.raises(InputError, match="chemtwin.lines\\+mismatch"):
        evaluate("oracle", files["mismatch"], progress=False)


def test_cli_mismatch(tmp_path, capsys):
    out = tmp_path / "obs.h5"
    assert main(["--quiet", "generate", "-o", str(out), "--n-groups", "2", "--mismatch", "--mismatch-seed", "4"]) == 0
    with open_dataset(out) as ds:
        assert ds.attrs["generator"] == "chemtwin.lines+mismatch" and ds.attrs["mismatch_seed"] == 4
    for args, message in ((["--mismatch", "--emulator", "emu.npz"], "--emulator"),
                          (["--mismatch-seed", "3"], "--mismatch-seed needs --mismatch"),
                          (["--mismatch", "--mismatch-seed", "-2"], "expected a seed from 0")):
        capsys.readouterr()
        assert main(["generate", "-o", str(tmp_path / "bad.h5"), "--n-groups", "2", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "bad.h5").exists()
