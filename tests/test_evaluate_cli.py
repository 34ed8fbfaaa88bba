"""``chemtwin evaluate``: JSON keys for every method, plots, and bad input (one line, exit 2)."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from fake_twins import LABEL_NAMES, fake_twins, write_fake

from chemtwin.cli import COMMAND_MODULES, main
from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.evaluation.evaluate import evaluate
from chemtwin.search.latents import write_latents

KEYS = {"n_stars", "n_pairs", "mse_reconstruction", "mse_swapped", "frac_rank0", "frac_rank_lt_0p1pct",
        "frac_rank_lt_1pct", "median_rank", "rank_cdf", "method", "metric", "model", "dataset"}


def _run(argv, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.strip().splitlines() if "error" in line]
    return rc, errors


def _latents(path, n_pairs=50, dim=6, seed=0, group=True, **attrs):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_pairs, dim))
    z = np.repeat(base, 2, axis=0) + 0.05 * rng.normal(size=(2 * n_pairs, dim))
    g = np.repeat(np.arange(n_pairs), 2) if group else None
    return write_latents(path, z, group=g, attrs=attrs or None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    return write_fake(d / "train.h5", 120, seed=1), write_fake(d / "val.h5", 50, seed=2)


def test_evaluate_is_a_command():
    assert "evaluate" in COMMAND_MODULES


@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
def test_latents_json_keys(tmp_path, capsys, metric):
    lat = _latents(tmp_path / "z.h5", model="/some/model", data="/some/data.h5")
    out = tmp_path / "out.json"
    assert main(["evaluate", "--latents", str(lat), "--json", str(out), "--metric", metric]) == 0
    res = json.loads(out.read_text())
    assert KEYS <= set(res)
    assert res["metric"] == metric and res["method"] == "latents"
    assert res["n_stars"] == 100 and res["n_pairs"] == 100
    assert res["mse_reconstruction"] is None and res["mse_swapped"] is None
    assert res["frac_rank0"] > 0.9 and res["median_rank"] == 0
    assert res["frac_rank0"] <= res["frac_rank_lt_0p1pct"] <= res["frac_rank_lt_1pct"] <= 1
    assert res["model"]["latents"] == str(lat.resolve()) and res["dataset"]["path"] == "/some/data.h5"


def test_latents_with_dataset_and_plots(tmp_path, capsys, data):
    _, val = data
    n = 100  # write_fake(..., 50) holds 50 pairs
    with h5py.File(val, "r") as f:
        assert len(f["group"]) == n
    lat = _latents(tmp_path / "z.h5", n_pairs=50, group=False)
    out, plots = tmp_path / "out.json", tmp_path / "figs"
    assert main(["evaluate", "--latents", str(lat), str(val), "--json", str(out), "--plots", str(plots)]) == 0
    res = json.loads(out.read_text())
    assert res["dataset"]["path"] == str(Path(val).resolve())
    assert res["dataset"]["attrs"]["seed"] == 2 and res["dataset"]["attrs"]["generator"] == "fake_twins"
    png = plots / "rank_cdf.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an existing output needs --overwrite
    rc, err = _run(["evaluate", "--latents", str(lat), str(val), "--json", str(out)], capsys)
    assert rc == 2 and len(err) == 1 and "--overwrite" in err[0]
    assert main(["evaluate", "--latents", str(lat), str(val), "--json", str(out), "--overwrite"]) == 0


def test_latents_with_row_array_take_the_groups_of_those_rows(tmp_path, data):
    _, val = data
    with h5py.File(val, "r") as f:
        group = f["group"][:]
    rows = np.flatnonzero(np.arange(100) % 10 != 3)  # as if `chemtwin embed` skipped 10 stars
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 4))[group[rows]] + 0.01 * rng.normal(size=(rows.size, 4))
    lat = write_latents(tmp_path / "z.h5", z, group=group[rows])
    with h5py.File(lat, "a") as f:
        f["row"] = rows
    out = tmp_path / "o.json"
    assert main(["evaluate", "--latents", str(lat), str(val), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_stars"] == 90 and res["n_pairs"] == 2 * (50 - 10) and res["frac_rank0"] == 1.0
    with h5py.File(lat, "a") as f:  # groups that disagree with the dataset's
        f["group"][0] = 49
    rc = main(["evaluate", "--latents", str(lat), str(val), "--json", str(out), "--overwrite"])
    assert rc == 2


def test_raw_and_polyres_methods(tmp_path, data):
    train, val = data
    out = tmp_path / "raw.json"
    assert main(["evaluate", str(val), "--method", "raw", "--json", str(out)]) == 0
    raw = json.loads(out.read_text())
    assert KEYS <= set(raw) and raw["method"] == "raw" and raw["mse_swapped"] is None and raw["n_stars"] == 100
    out = tmp_path / "poly.json"
    assert main(["evaluate", str(val), "--method", "polyres", "--train", str(train), "--json", str(out),
                 "--components", "10", "--degree", "3"]) == 0
    poly = json.loads(out.read_text())
    assert KEYS <= set(poly) and poly["method"] == "polyres" and poly["mse_reconstruction"] is None
    assert poly["model"]["degree"] == 3 and poly["model"]["n_components"] == 10
    assert poly["model"]["train"]["path"] == str(Path(train).resolve())


def test_bad_input_one_line_exit_2(tmp_path, capsys, data):
    train, val = data
    out = str(tmp_path / "o.json")
    # latent file and dataset of different lengths
    short = _latents(tmp_path / "short.h5", n_pairs=20, group=False)
    rc, err = _run(["evaluate", "--latents", str(short), str(val), "--json", out], capsys)
    assert rc == 2 and len(err) == 1 and "40 latents" in err[0] and "100 stars" in err[0]
    # no groups of size >= 2: in a latent file, and in a dataset
    lonely = write_latents(tmp_path / "lonely.h5", np.zeros((4, 3)), group=[0, 1, -1, 2])
    rc, err = _run(["evaluate", "--latents", str(lonely), "--json", out], capsys)
    assert rc == 2 and len(err) == 1 and "no twin groups" in err[0]
    flux, ivar, labels, _ = fake_twins(10, 200, seed=0)
    nogroups = tmp_path / "nogroups.h5"
    with DatasetWriter(nogroups, 15000 + np.arange(200.0), list(LABEL_NAMES)) as w:
        w.append(flux, ivar, labels, np.arange(20))
    rc, err = _run(["evaluate", str(nogroups), "--method", "raw", "--json", out], capsys)
    assert rc == 2 and len(err) == 1 and "no twin groups" in err[0]
    # unknown metric / method
    lat = _latents(tmp_path / "z.h5")
    rc, err = _run(["evaluate", "--latents", str(lat), "--json", out, "--metric", "l3"], capsys)
    assert rc == 2 and len(err) == 1 and "unknown metric" in err[0]
    rc, err = _run(["evaluate", str(val), "--method", "magic", "--json", out], capsys)
    assert rc == 2 and len(err) == 1 and "unknown method" in err[0]
    # polyres without --train; latents without group; wrong number of inputs; missing files
    rc, err = _run(["evaluate", str(val), "--method", "polyres", "--json", out], capsys)
    assert rc == 2 and len(err) == 1 and "--train" in err[0]
    nogroup = _latents(tmp_path / "nogroup.h5", group=False)
    rc, err = _run(["evaluate", "--latents", str(nogroup), "--json", out], capsys)
    assert rc == 2 and len(err) == 1 and "group" in err[0]
    rc, err = _run(["evaluate", str(val), "--json", out], capsys)
    assert rc == 2 and len(err) == 1 and "MODEL_DIR" in err[0]
    rc, err = _run(["evaluate", "--latents", str(tmp_path / "missing.h5"), "--json", out], capsys)
    assert rc == 2 and len(err) == 1 and "no such file" in err[0]
    assert not Path(out).exists()


# ---------------------------------------------------------------------------- model path
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data):
    from chemtwin.tagging.estimator import ChemTwin

    train, _ = data
    d = tmp_path_factory.mktemp("model") / "m"
    ct = ChemTwin(epochs=2, latent_dim=6, batch_size=64, seed=0, device="cpu")
    ct.fit(str(train), progress=False)
    ct.save(d)
    return d


def test_model_path_json_and_consistency_with_latents(tmp_path, model_dir, data):
    from chemtwin.data.dataset import open_dataset
    from chemtwin.tagging.estimator import ChemTwin

    _, val = data
    out = tmp_path / "model.json"
    assert main(["evaluate", str(model_dir), str(val), "--json", str(out), "--batch-size", "37"]) == 0
    res = json.loads(out.read_text())
    assert KEYS <= set(res) and res["method"] == "model"
    assert res["model"]["path"] == str(Path(model_dir).resolve()) and res["model"]["latent_dim"] == 6
    assert res["n_stars"] == 100 and res["n_swapped_pairs"] == 100

    # the errors against a direct computation
    ct = ChemTwin.load(model_dir)
    with open_dataset(val) as ds:
        b = ds.read()
        cond = b.labels[:, ds.label_columns(ct.condition)]
        group = ds.group
    z = ct.transform(b.flux, b.ivar, cond)
    rec = ((ct.reconstruct(b.flux, b.ivar, cond) - b.flux) ** 2).mean()
    partner = np.array([np.flatnonzero((group == g))[::-1][list(np.flatnonzero(group == g)).index(i)]
                        for i, g in enumerate(group)])
    swapped = ((ct.swap(z, cond[partner]) - b.flux[partner]) ** 2).mean()
    assert res["mse_reconstruction"] == pytest.approx(float(rec), rel=1e-4)
    assert res["mse_swapped"] == pytest.approx(float(swapped), rel=1e-4)

    # the same ranks from the latent file
    lat = write_latents(tmp_path / "z.h5", z, group=group)
    out2 = tmp_path / "lat.json"
    assert main(["evaluate", "--latents", str(lat), "--json", str(out2)]) == 0
    res2 = json.loads(out2.read_text())
    for key in ("frac_rank0", "frac_rank_lt_0p1pct", "frac_rank_lt_1pct", "median_rank", "rank_cdf"):
        assert res2[key] == res[key]
    # the Python entry point the bench uses gives the same dict
    direct = evaluate("model", str(val), model=ct, progress=False)
    assert direct["frac_rank0"] == res["frac_rank0"] and direct["mse_swapped"] == pytest.approx(res["mse_swapped"])
    assert set(res["condition_r2"]) == set(ct.condition)
    assert all(set(r2) == {"ridge", "knn", "mlp"} for r2 in res["condition_r2"].values())


def test_condition_leakage_tells_a_latent_that_carries_teff_from_one_that_does_not():
    rng = np.random.default_rng(3)
    teff, logg = rng.uniform(4000, 5200, 2000), rng.uniform(1, 3.5, 2000)
    chemistry = rng.normal(size=(2000, 4))
    leaky = np.column_stack([chemistry, np.tanh((teff - 4600) / 300) + 0.05 * rng.normal(size=2000)])
    clean = np.column_stack([chemistry, rng.normal(size=2000)])
    cond = np.column_stack([teff, logg])
    from chemtwin.evaluation.metrics import condition_leakage

    leaky[:10] = np.nan  # unusable stars: left out, not propagated
    r_leaky = condition_leakage(leaky, cond, ["TEFF", "LOGG"], max_stars=900)
    r_clean = condition_leakage(clean, cond, ["TEFF"], max_stars=900)
    assert r_leaky["TEFF"]["ridge"] > 0.8 and r_leaky["TEFF"]["knn"] > 0.8 and r_leaky["TEFF"]["mlp"] > 0.8
    # chance level is R^2 ~ 0 (k-NN: ~ -1/k, it averages noise)
    assert all(-0.3 < v < 0.1 for v in r_leaky["LOGG"].values())  # LOGG is not in either latent
    assert all(-0.3 < v < 0.1 for v in r_clean["TEFF"].values())


# ---------------------------------------------------------------------------- twin metric
def test_twin_metric_from_the_cli_for_a_model_and_polyres(tmp_path, model_dir, data):
    from chemtwin.data.dataset import open_dataset
    from chemtwin.evaluation.metrics import evaluate_tags
    from chemtwin.search.twin_metric import TwinMetric
    from chemtwin.tagging.estimator import ChemTwin

    train, val = data
    out = tmp_path / "tw.json"
    assert main(["evaluate", str(model_dir), str(val), "--twin-metric", "--train", str(train),
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["metric"] == "l2" and res["twin_metric"]["train"]["path"] == str(Path(train).resolve())
    assert res["twin_metric"]["n_train_groups"] == 120
    # the same ranks by hand: latents of both sets, whitening from the training twins
    ct = ChemTwin.load(model_dir)
    with open_dataset(train) as tr, open_dataset(val) as va:
        metric = TwinMetric().fit(ct.embed_dataset(tr), tr.group)
        expected = evaluate_tags(metric.transform(ct.embed_dataset(va)), va.group, "l2", progress=False)
    assert res["frac_rank0"] == expected["frac_rank0"] and res["median_rank"] == expected["median_rank"]

    out = tmp_path / "poly_tw.json"
    assert main(["evaluate", str(val), "--method", "polyres", "--train", str(train), "--components", "10",
                 "--twin-metric", "--metric", "l1", "--json", str(out)]) == 0
    poly = json.loads(out.read_text())
    assert poly["metric"] == "l1" and poly["twin_metric"]["n_train_groups"] == 120


def test_twin_metric_bad_input_one_line_exit_2(tmp_path, capsys, model_dir, data):
    train, val = data
    out = str(tmp_path / "o.json")
    rc, err = _run(["evaluate", str(model_dir), str(val), "--twin-metric", "--json", out], capsys)
    assert rc == 2 and len(err) == 1 and "--train" in err[0]
    rc, err = _run(["evaluate", str(val), "--method", "raw", "--twin-metric", "--train", str(train), "--json", out],
                   capsys)
    assert rc == 2 and len(err) == 1 and "model or --method polyres" in err[0]
    flux, ivar, labels, _ = fake_twins(10, 200, seed=0)
    single = tmp_path / "single.h5"
    with DatasetWriter(single, 15000 + np.arange(200.0), list(LABEL_NAMES)) as w:
        w.append(flux, ivar, labels, np.arange(20))
    rc, err = _run(["evaluate", str(model_dir), str(val), "--twin-metric", "--train", str(single), "--json", out],
                   capsys)
    assert rc == 2 and len(err) == 1 and "twin groups" in err[0]
    assert not Path(out).exists()
