"""Training loop, checkpoints/resume, the train/embed commands and their bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fake_twins import LABEL_NAMES, fake_twins, write_fake

from chemtwin.cli import main
from chemtwin.data.dataset import open_dataset
from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.errors import InputError
from chemtwin.tagging.model_folder import read_history
from chemtwin.tagging.training_data import Loader, split_by_group

torch.set_num_threads(1)
FAST = ["--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_fake(d / "train.h5", 150, seed=1), write_fake(d / "val.h5", 60, seed=2)


def test_split_by_group_never_straddles():
    group = np.repeat(np.arange(300), 3)
    group[::7] = -1  # unknown groups: each star its own group
    for seed in range(3):
        val = split_by_group(group, 0.2, seed)
        known = group >= 0
        for g in np.unique(group[known]):
            assert len(set(val[group == g])) == 1
        assert 0.15 < val.mean() < 0.25
    assert not split_by_group(group, 0.0, 0).any()


def test_streaming_loader_visits_every_training_row_once(data):
    train, _ = data
    with open_dataset(train) as ds:
        rows = np.flatnonzero(~split_by_group(ds.group, 0.2, 0))
        mem = Loader(ds, rows, [0, 1], True, in_memory=True)
        disk = Loader(ds, rows, [0, 1], True, in_memory=False, block_rows=32, buffer_blocks=2)
        seen = {}
        for name, loader in (("mem", mem), ("disk", disk)):
            batches = list(loader.epoch(torch.Generator().manual_seed(0), 50))
            assert len(batches) == loader.steps(50) and all(len(b[0]) == 50 for b in batches[:-1])
            seen[name] = np.sort(torch.cat([b[2][:, 0] for b in batches]).numpy())
        np.testing.assert_array_equal(seen["mem"], seen["disk"])
        np.testing.assert_array_equal(seen["mem"], np.sort(ds.labels()[rows, 0]))
        # skipping batches replays the same order
        tail = list(disk.epoch(torch.Generator().manual_seed(0), 50, skip=3))
        again = list(disk.epoch(torch.Generator().manual_seed(0), 50))[3:]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(tail, again))


def _rows(path):
    return read_history(path)


def test_train_embed_roundtrip_and_streaming(data, tmp_path, capsys):
    train, val = data
    out = tmp_path / "m"
    assert main(["train", str(train), "--out", str(out), "--epochs", "3", "--val-data", str(val), *FAST]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["status"] == "finished" and meta["data"]["in_memory"] and meta["final"]["epoch"] == 3
    hist = _rows(out)
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    assert {"val_recon", "val_swap", "val_adv_acc", "val_rank0", "train_adv_acc"} <= set(hist[0])
    # the same run streamed from disk gives the same model
    out2 = tmp_path / "m2"
    assert main(["train", str(train), "--out", str(out2), "--epochs", "3", "--val-data", str(val),
                 "--max-memory-gb", "0", *FAST]) == 0
    assert not json.loads((out2 / "config.json").read_text())["data"]["in_memory"]
    assert _rows(out2)[-1]["val_recon"] == pytest.approx(hist[-1]["val_recon"], rel=0.5)
    # embed: every star, group/labels copied
    lat = tmp_path / "z.h5"
    assert main(["embed", str(out), str(val), "--out", str(lat)]) == 0
    with h5py.File(lat) as f, open_dataset(val) as ds:
        assert f["z"].shape == (ds.n_stars, 20) and f["z"].dtype == np.float32
        np.testing.assert_array_equal(f["group"][:], ds.group)
        assert list(f["labels"].attrs["names"].astype(str)) == ds.label_names
    from chemtwin.search.latents import open_latents

    with open_latents(lat) as lf:
        assert lf.read().shape == (120, 20)
    assert main(["embed", str(out), str(val), "--out", str(lat)]) == 2  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_time_limit_stops_cleanly_and_resume_extends(data, tmp_path):
    train, val = data
    out = tmp_path / "m"
    t = time.monotonic()
    assert main(["train", str(train), "--out", str(out), "--epochs", "100000", "--time-limit", "4", *FAST]) == 0
    assert time.monotonic() - t < 30
    meta = json.loads((out / "config.json").read_text())
    assert meta["status"] == "stopped at the time limit" and meta["final"]["time_s"] < 6
    assert (out / "checkpoint.safetensors").exists() and (out / "model.safetensors").exists()
    n = len(_rows(out))
    assert main(["train", str(train), "--out", str(out), "--resume", "--time-limit", "7", *FAST]) == 0
    hist = _rows(out)
    assert len(hist) > n and np.all(np.diff([r["step"] for r in hist]) > 0)
    assert hist[-1]["time_s"] < 10


def test_resume_after_sigkill_continues_the_same_curve(data, tmp_path):
    """kill -9 in the middle of training, --resume: the loss curve is the uninterrupted one."""
    train, val = data
    args = ["train", str(train), "--epochs", "25", "--batch-size", "16", "--val-data", str(val), *FAST]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "chemtwin", "-q", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "history.csv").exists() and len((out / "history.csv").read_text().splitlines()) >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(_rows(out))
    assert 4 <= killed_at < 25
    assert main([*args, "--out", str(out), "--resume"]) == 0
    got, want = _rows(out), _rows(ref)
    assert [r["epoch"] for r in got] == list(range(1, 26))
    for key in ("train_loss", "train_recon", "val_recon", "val_swap", "lr", "lambda"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=1e-4, err_msg=key)


# ------------------------------------------------------------------ bad input
def _bad(tmp_path, name, mutate, label_names=LABEL_NAMES):
    flux, ivar, labels, group = fake_twins(40, 200, seed=5)
    cols = [LABEL_NAMES.index(n) for n in label_names]
    mutate(flux, ivar)
    path = tmp_path / name
    with DatasetWriter(path, np.arange(200.0), list(label_names)) as w:
        w.append(flux, ivar, labels[:, cols], group)
    return str(path)


def _run(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, [line for line in err if "error" in line]


def test_bad_input_one_line_exit_2(tmp_path, capsys, data):
    train, _ = data
    out = str(tmp_path / "m")
    no_teff = _bad(tmp_path, "nolabels.h5", lambda f, i: None, label_names=("FE_H", "MG_FE"))
    rc, err = _run(["train", no_teff, "--out", out, "--epochs", "1"], capsys)
    assert rc == 2 and len(err) == 1 and "TEFF" in err[0] and "LOGG" in err[0]

    def nan_flux(f, i):
        f[17, 33] = np.nan

    rc, err = _run(["train", _bad(tmp_path, "nan.h5", nan_flux), "--out", out, "--epochs", "1"], capsys)
    assert rc == 2 and len(err) == 1 and "row 17" in err[0]
    assert not Path(out).exists() or not (Path(out) / "model.safetensors").exists()

    rc, err = _run(["train", str(train), "--out", out, "--latent-dim", "0"], capsys)
    assert rc == 2 and len(err) == 1 and "latent dimension" in err[0]
    rc, err = _run(["train", str(train), "--out", out, "--condition", "TEFF,FOO"], capsys)
    assert rc == 2 and len(err) == 1 and "FOO" in err[0]
    rc, err = _run(["embed", str(tmp_path), str(train), "--out", str(tmp_path / "z.h5")], capsys)
    assert rc == 2 and len(err) == 1 and "not a chemtwin model" in err[0]
    rc, err = _run(["embed", str(tmp_path / "nope"), str(train), "--out", str(tmp_path / "z.h5")], capsys)
    assert rc == 2 and len(err) == 1
    rc, err = _run(["train", str(train), "--out", str(tmp_path / "x"), "--resume"], capsys)
    assert rc == 2 and len(err) == 1
    assert not (tmp_path / "z.h5").exists()


def test_all_zero_ivar_rows_are_skipped_with_a_count(tmp_path, capsys, caplog):
    def zero_rows(f, i):
        i[[3, 4, 50]] = 0
        f[3] = np.nan

    path = _bad(tmp_path, "zero.h5", zero_rows)
    out = tmp_path / "m"
    with caplog.at_level("WARNING"):
        assert main(["train", path, "--out", str(out), "--epochs", "1", *FAST]) == 0
    assert any("skipped 3 rows" in r.getMessage() for r in caplog.records)
    meta = json.loads((out / "config.json").read_text())
    assert meta["data"]["skipped_rows"] == 3 and meta["data"]["n_train"] + meta["data"]["n_val"] == 77
    lat = tmp_path / "z.h5"
    with caplog.at_level("WARNING"):
        assert main(["embed", str(out), path, "--out", str(lat)]) == 0
    with h5py.File(lat) as f:
        assert f["z"].shape == (77, 20) and np.isfinite(f["z"][:]).all()
        assert 3 not in f["row"][:] and f["star_id"].asstr()[0] == "0" and f["star_id"].asstr()[3] == "5"


def test_existing_output_needs_overwrite(data, tmp_path, capsys):
    train, _ = data
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, err = _run(["train", str(train), "--out", str(out), "--epochs", "1", "--overwrite"], capsys)
    assert rc == 2 and "holds no chemtwin model" in err[0] and (out / "notes.txt").exists()
    with pytest.raises(InputError):
        from chemtwin.tagging import ChemTwin

        ChemTwin.load(out)


def test_fit_arrays_without_validation_or_groups(tmp_path):
    from chemtwin.tagging import ChemTwin

    flux, ivar, labels, _ = fake_twins(60, 200, seed=7)
    ct = ChemTwin(epochs=2, latent_dim=4, val_fraction=0.0).fit(
        flux, None, {"TEFF": labels[:, 0], "LOGG": labels[:, 1]}, progress=False, out_dir=tmp_path / "m")
    assert len(ct.history) == 2 and np.isnan(ct.history[-1]["val_rank0"])
    assert ct.transform(flux[:3], None, labels[:3, :2]).shape == (3, 4)
    assert ChemTwin.load(tmp_path / "m").transform(flux[:3], None, labels[:3, :2]).shape == (3, 4)
