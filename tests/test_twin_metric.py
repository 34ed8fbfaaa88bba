"""The twin metric: whitening learned from known twins, and ``chemtwin whiten``."""

import h5py
import numpy as np
import pytest

from chemtwin.cli import main
from chemtwin.errors import InputError
from chemtwin.evaluation.metrics import evaluate_tags
from chemtwin.search.latents import write_latents
from chemtwin.search.twin_metric import TwinMetric


def _nuisance_latents(n_pairs, seed):
    """Twins share 3 chemistry dimensions (small spread); a 4th carries a TEFF-like nuisance
    drawn per star, with a thousand times the spread: L1 on raw latents is ruled by it."""
    rng = np.random.default_rng(seed)
    chem = np.repeat(rng.normal(size=(n_pairs, 3)), 2, axis=0) + 0.01 * rng.normal(size=(2 * n_pairs, 3))
    nuisance = 10 * rng.normal(size=(2 * n_pairs, 1))
    mix = np.array([[1.0, 0.2, 0.0, 0.3], [0.0, 1.0, 0.1, -0.2], [0.3, 0.0, 1.0, 0.1], [0.1, 0.1, 0.1, 1.0]])
    return np.hstack([chem, nuisance]) @ mix, np.repeat(np.arange(n_pairs), 2)


def test_whitens_the_twin_scatter_and_finds_twins_the_raw_latent_misses():
    z_train, g_train = _nuisance_latents(2000, seed=0)
    z_train[:3] = np.nan  # unusable stars are ignored, not propagated
    metric = TwinMetric().fit(z_train, g_train)
    assert metric.n_groups_ == 1998  # pairs 0 and 1 lost a member
    white = metric.transform(z_train[4:])
    d = white[0::2] - white[1::2]
    np.testing.assert_allclose(d.T @ d / len(d) / 2, np.eye(4), atol=1e-6)  # unit within-twin covariance
    np.testing.assert_allclose(white.mean(axis=0), 0, atol=0.1)

    z_val, g_val = _nuisance_latents(300, seed=1)
    raw = evaluate_tags(z_val, g_val, "l1", progress=False)
    whitened = evaluate_tags(metric.transform(z_val), g_val, "l2", progress=False)
    assert raw["frac_rank0"] < 0.2 and whitened["frac_rank0"] > 0.95


def test_a_dead_latent_dimension_stays_finite_and_does_not_matter():
    z, g = _nuisance_latents(500, seed=2)
    dead = np.column_stack([z, np.full(len(z), 7.0)])
    a = evaluate_tags(TwinMetric().fit(z, g).transform(z), g, "l2", progress=False)
    white = TwinMetric().fit(dead, g).transform(dead)
    assert np.isfinite(white).all() and np.abs(white[:, -1]).max() < 1e-3
    assert evaluate_tags(white, g, "l2", progress=False)["frac_rank0"] == a["frac_rank0"]


def test_bad_input():
    z, g = _nuisance_latents(50, seed=3)
    with pytest.raises(InputError, match="twin groups"):
        TwinMetric().fit(z, np.arange(len(z)))
    with pytest.raises(InputError, match="do not match"):
        TwinMetric().fit(z, g[:-1])
    with pytest.raises(InputError, match="not fitted"):
        TwinMetric().transform(z)
    with pytest.raises(InputError, match="fitted on 4 dimensions"):
        TwinMetric().fit(z, g).transform(z[:, :3])


def test_whiten_command_writes_a_latent_file_that_ranks_in_the_twin_metric(tmp_path):
    z_train, g_train = _nuisance_latents(1000, seed=0)
    z_val, g_val = _nuisance_latents(200, seed=1)
    train = write_latents(tmp_path / "train.h5", z_train, group=g_train)
    ids = np.array([f"2M{i:08d}" for i in range(len(z_val))])
    val = write_latents(tmp_path / "val.h5", z_val, group=g_val, star_id=ids)
    out = tmp_path / "white.h5"
    assert main(["-q", "whiten", str(val), "--train", str(train), "--out", str(out), "--chunk-rows", "64"]) == 0
    # latent files hold float32
    expected = TwinMetric().fit(z_train.astype(np.float32), g_train).transform(z_val.astype(np.float32))
    with h5py.File(out) as f:
        np.testing.assert_allclose(f["z"][:], expected, rtol=1e-5, atol=1e-4)
        assert (f["group"][:] == g_val).all() and list(f["star_id"].asstr()[:]) == list(ids)
        assert f.attrs["twin_metric_groups"] == 1000
    raw_json, white_json = tmp_path / "raw.json", tmp_path / "white.json"
    assert main(["-q", "evaluate", "--latents", str(val), "--json", str(raw_json)]) == 0
    assert main(["-q", "evaluate", "--latents", str(out), "--metric", "l2", "--json", str(white_json)]) == 0
    import json

    assert json.loads(raw_json.read_text())["frac_rank0"] < 0.2
    assert json.loads(white_json.read_text())["frac_rank0"] > 0.95


def test_whiten_bad_input_one_line_exit_2(tmp_path, capsys):
    z, g = _nuisance_latents(50, seed=4)
    ungrouped = write_latents(tmp_path / "ungrouped.h5", z)
    grouped = write_latents(tmp_path / "grouped.h5", z, group=g)
    narrow = write_latents(tmp_path / "narrow.h5", z[:, :3])
    empty = write_latents(tmp_path / "empty.h5", np.zeros((0, 4)))
    nan = z.copy()
    nan[7, 1] = np.nan
    nan = write_latents(tmp_path / "nan.h5", nan, group=g)
    out = tmp_path / "o.h5"
    for argv, message in [([str(grouped), "--train", str(ungrouped)], "no 'group'"),
                          ([str(narrow), "--train", str(grouped)], "3-dimensional"),
                          ([str(grouped), "--train", str(tmp_path / "missing.h5")], "no such file"),
                          ([str(grouped), "--train", str(grouped), "--chunk-rows", "0"], "--chunk-rows"),
                          ([str(empty), "--train", str(grouped)], "holds no latents"),
                          ([str(nan), "--train", str(grouped)], "row 7 holds NaN"),
                          ([str(grouped), "--train", str(nan)], "row 7 holds NaN")]:
        assert main(["whiten", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()
