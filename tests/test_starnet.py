"""StarNet (chemtwin.tagging.starnet*, chemtwin starnet train/predict, the "starnet" method):
it learns (overfits a tiny set), masked pixels cannot reach it, it resumes after kill -9
exactly where it stopped, and bad input is one line, exit 2."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from chemtwin.cli import main
from chemtwin.errors import InputError
from chemtwin.tagging.starnet_estimator import StarNet

from fake_twins import LABEL_NAMES, fake_twins, write_fake
from kill_script import DIE_IN_CHECKPOINT

TINY = dict(filters=(4, 8), hidden=(32,), batch_size=16)
TRAIN = ["--filters", "4,8", "--hidden", "32", "--batch-size", "8", "--seed", "0", "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake(tmp_path_factory.mktemp("starnet") / "twins.h5", n_groups=40, n_pixels=64)


def test_starnet_overfits_a_tiny_set():
    flux, ivar, labels, _ = fake_twins(n_groups=24, n_pixels=64)
    names = ("TEFF", "LOGG", "FE_H")
    y = labels[:, :3].astype(np.float64)
    sn = StarNet(labels=names, filters=(4, 8), hidden=(64, 64), batch_size=16, epochs=150, lr=3e-3, val_fraction=0)
    sn.fit(flux, ivar, labels, label_names=LABEL_NAMES, progress=False)
    mean, sigma = sn.predict(flux, ivar, return_std=True)
    relative = np.sqrt(np.mean((mean - y) ** 2, 0)) / y.std(0)
    assert (relative < 0.2).all(), relative  # predicting the mean gives 1
    assert (sigma > 0).all() and np.isfinite(sigma).all()
    assert sn.labels_ == names and sn.history_[-1]["train_loss"] < sn.history_[0]["train_loss"]


def test_masked_pixels_do_not_change_the_prediction():
    flux, ivar, labels, _ = fake_twins(n_groups=10, n_pixels=64)
    sn = StarNet(labels=("TEFF", "FE_H"), epochs=2, val_fraction=0, **TINY)
    sn.fit(flux, ivar, labels, label_names=LABEL_NAMES, progress=False)
    rng = np.random.default_rng(3)
    masked = rng.random(flux.shape) < 0.2
    ivar_m = np.where(masked, 0.0, ivar)
    reference = sn.predict(flux, ivar_m)
    for junk in (0.0, np.nan, 1e6, -3.0):
        changed = np.where(masked, junk, flux)
        np.testing.assert_array_equal(sn.predict(changed, ivar_m), reference)
    changed = np.where(masked, flux + rng.normal(0, 1, flux.shape), flux)
    np.testing.assert_array_equal(sn.predict(changed, ivar_m), reference)
    assert not np.array_equal(sn.predict(flux, ivar), reference)  # the mask itself is seen
    # a star without a measured pixel has no labels (NaN), and the labels file flags it
    none = sn.predict(flux[:2], np.zeros_like(ivar[:2]))
    assert np.isnan(none).all()


def test_cli_train_predict_labels_file_and_resume_options(data, tmp_path):
    model, out = tmp_path / "model", tmp_path / "labels.h5"
    assert main(["-q", "starnet", "train", str(data), "--labels", "TEFF,LOGG,FE_H", "-o", str(model), "--epochs", "2",
                 "--snr", "50:200", "--bad-pixel-frac", "0.01", *TRAIN]) == 0
    meta = json.loads((model / "config.json").read_text())
    assert meta["format"] == "chemtwin-starnet" and meta["status"] == "finished"
    assert meta["config"]["augment"] == {"snr": [50.0, 200.0], "bad_pixel_frac": 0.01}
    assert main(["-q", "starnet", "predict", str(model), str(data), "-o", str(out)]) == 0
    with h5py.File(out) as f:
        assert [n.decode() if isinstance(n, bytes) else n for n in f["labels"].attrs["names"]] == ["TEFF", "LOGG", "FE_H"]
        assert f["labels"].shape == f["labels_err"].shape == (80, 3) and f["covariance"].shape == (80, 3, 3)
        assert f["converged"][()].all() and (f["labels_err"][()] > 0).all()
        assert f.attrs["method"] == "starnet"
    # more epochs on resume: the first two epochs' history stays
    assert main(["-q", "starnet", "train", str(data), "--labels", "TEFF,LOGG,FE_H", "-o", str(model), "--epochs", "3",
                 "--resume", *TRAIN]) == 0
    assert [r["epoch"] for r in csv.DictReader(open(model / "history.csv"))] == ["1", "2", "3"]


def _one_line_exit_2(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_exit_2(data, tmp_path, capsys):
    no_fe = write_fake(tmp_path / "no_fe.h5", n_groups=5, n_pixels=64, label_names=("TEFF", "LOGG"))
    err = _one_line_exit_2(capsys, ["starnet", "train", str(no_fe), "--labels", "TEFF,FE_H", "-o", str(tmp_path / "m")])
    assert "FE_H" in err and "no_fe.h5" in err
    fader = tmp_path / "fader"
    fader.mkdir()
    (fader / "config.json").write_text(json.dumps({"format": "chemtwin-fader", "format_version": 1}))
    err = _one_line_exit_2(capsys, ["starnet", "predict", str(fader), str(data), "-o", str(tmp_path / "l.h5")])
    assert "fader model folder" in err
    err = _one_line_exit_2(capsys, ["starnet", "train", str(data), "--labels", "TEFF", "-o", str(fader), "--overwrite"])
    assert "fader model folder" in err
    model = tmp_path / "model"
    assert main(["-q", "starnet", "train", str(data), "--labels", "TEFF", "-o", str(model), "--epochs", "1", *TRAIN]) == 0
    for argv in (["embed", str(model), str(data), "-o", str(tmp_path / "z.h5")],
                 ["evaluate", str(model), str(data), "-o", str(tmp_path / "e.json")]):
        assert "StarNet model folder" in _one_line_exit_2(capsys, argv)
    err = _one_line_exit_2(capsys, ["starnet", "train", str(data), "--labels", "TEFF", "-o", str(model)])
    assert "--overwrite" in err and "--resume" in err
    err = _one_line_exit_2(capsys, ["starnet", "train", str(data), "--labels", "TEFF", "-o", str(tmp_path / "v"),
                                    "--val-fraction", "1"])
    assert "--val-fraction" in err
    with h5py.File(no_fe, "a") as f:  # a NaN label on a training star
        f["labels"][3, 0] = np.nan
    err = _one_line_exit_2(capsys, ["starnet", "train", str(no_fe), "--labels", "TEFF", "-o", str(tmp_path / "n")])
    assert "TEFF is missing" in err and "row 3" in err


def test_labels_file_flags_stars_without_a_measured_pixel(data, tmp_path):
    model = tmp_path / "model"
    sn = StarNet(labels=("TEFF",), epochs=1, **TINY).fit(data, out_dir=model, progress=False)
    flux, ivar, labels, group = fake_twins(n_groups=3, n_pixels=64)
    ivar[1] = 0
    from chemtwin.data.dataset_writer import DatasetWriter

    path = tmp_path / "holes.h5"
    with DatasetWriter(path, 15000 + np.arange(64, dtype=float), list(LABEL_NAMES)) as w:
        w.append(flux, ivar, labels, group)
    assert main(["-q", "starnet", "predict", str(model), str(path), "-o", str(tmp_path / "l.h5")]) == 0
    with h5py.File(tmp_path / "l.h5") as f:
        assert list(f["converged"][()]) == [True, False, True, True, True, True]
        assert np.isnan(f["labels"][1]).all()
    again = StarNet.load(model)
    np.testing.assert_array_equal(again.predict(path), sn.predict(path))


# --------------------------------------------------------------------------- kill -9, then resume
KILL_TRAIN = ["--labels", "TEFF,LOGG,FE_H", "--epochs", "6", "--snr", "100", *TRAIN]


def _env() -> dict:
    src = str(Path(__import__("chemtwin").__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")


def _losses(model: Path) -> dict:
    with open(model / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    return {c: [r[c] for r in rows] for c in ("epoch", "step", "train_loss", "val_loss", "val_rmse")}


def test_kill_9_during_a_checkpoint_then_resume_continues_exactly(data, tmp_path):
    reference = tmp_path / "reference"
    assert main(["-q", "starnet", "train", str(data), "-o", str(reference), *KILL_TRAIN]) == 0
    model = tmp_path / "model"
    run = subprocess.run([sys.executable, "-c", DIE_IN_CHECKPOINT, "3", "-q", "starnet", "train", str(data), "-o",
                          str(model), *KILL_TRAIN], env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert json.loads((model / "config.json").read_text())["status"] == "training"
    assert main(["-q", "starnet", "train", str(data), "-o", str(model), "--resume", *KILL_TRAIN]) == 0
    assert _losses(model) == _losses(reference)
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(model / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    assert not [p.name for p in model.iterdir() if p.name.startswith(".")]


def test_method_is_registered_but_runs_in_a_bench_only_when_named(data, tmp_path):
    from chemtwin.data.dataset import open_dataset
    from chemtwin.evaluation.bench import BenchConfig, bench_methods
    from chemtwin.methods import METHODS, Inputs

    assert "starnet" in METHODS and "starnet" not in bench_methods()
    assert BenchConfig.quick_config(methods=("starnet",)).methods == ("starnet",)
    method = METHODS["starnet"].with_options(epochs=2, holdout_stars=10, label_names=("TEFF", "LOGG", "FE_H", "MG_FE"))
    with open_dataset(data) as ds:
        fitted = method.fit(Inputs(data=str(data), train=str(data), progress=False), ds)
        tags = fitted.tag(ds)
    assert tags.values.shape == (80, 2) and np.isfinite(tags.values).all()
    assert tags.extra["label_fit"]["holdout"]["n_stars"] == 10
    with pytest.raises(InputError, match="holdout_stars"):
        METHODS["starnet"].with_options(holdout_stars=-1)
