"""Issue 3's bad input, for `chemtwin train`, `chemtwin embed` and the ChemTwin API alike:
a dataset without TEFF/LOGG, NaN flux where ivar > 0 (rejected naming the row), rows with
ivar all zero (skipped, counted), latent dimension 0, an unknown condition label, a
MODEL_DIR that is not a model.  The CLI prints one line and exits 2; nothing is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fake_twins import LABEL_NAMES, fake_twins, write_fake

from chemtwin.cli import main
from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.errors import InputError
from chemtwin.tagging import ChemTwin

torch.set_num_threads(1)
SMALL = dict(latent_dim=4, decoder_hidden=(16,), adversary_hidden=(8,), batch_size=32, device="cpu")
SMALL_CLI = ["--latent-dim", "4", "--batch-size", "32", "--threads", "1", "--device", "cpu"]


def _write(path: Path, mutate=None, label_names=LABEL_NAMES) -> str:
    flux, ivar, labels, group = fake_twins(30, 100, seed=5)
    if mutate:
        mutate(flux, ivar)
    cols = [LABEL_NAMES.index(n) for n in label_names]
    with DatasetWriter(path, 15000 + np.arange(100.0), list(label_names)) as w:
        w.append(flux, ivar, labels[:, cols], group)
    return str(path)


def _nan_flux(flux, ivar):
    flux[23, 40] = np.nan  # ivar > 0 there: an error naming row 23


def _masked_nan(flux, ivar):
    flux[5, :10] = np.nan  # NaN only where ivar = 0: allowed
    ivar[5, :10] = 0


def _zero_rows(flux, ivar):
    ivar[[2, 9, 31]] = 0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = _write(d / "good.h5")
    model = d / "model"
    ChemTwin(epochs=1, val_fraction=0.0, **SMALL).fit(good, out_dir=model, progress=False)
    not_models = {}
    for name, content in {"empty": None, "garbage_json": "{not json", "other_json": '{"format": "something"}'}.items():
        folder = d / name
        folder.mkdir()
        if content is not None:
            (folder / "config.json").write_text(content)
    not_models["empty"] = d / "empty"
    not_models["garbage_json"] = d / "garbage_json"
    not_models["other_json"] = d / "other_json"
    # a real config.json but broken weights: truncated, missing, or of another shape
    for name in ("truncated_weights", "truncated_checkpoint", "no_weights", "wrong_shape", "bad_config"):
        folder = d / name
        shutil.copytree(model, folder)
        not_models[name] = folder
    for name, file in (("truncated_weights", "model.safetensors"), ("truncated_checkpoint", "checkpoint.safetensors")):
        path = d / name / file
        path.write_bytes(path.read_bytes()[:1000])
    (d / "no_weights" / "model.safetensors").unlink()
    meta = json.loads((d / "wrong_shape" / "config.json").read_text())
    meta["n_pixels"] = 50
    (d / "wrong_shape" / "config.json").write_text(json.dumps(meta))
    meta = json.loads((d / "bad_config" / "config.json").read_text())
    meta["config"]["latent_dim"] = 0
    (d / "bad_config" / "config.json").write_text(json.dumps(meta))
    return {
        "good": good, "model": model, "not_models": not_models,
        "no_teff": _write(d / "no_teff.h5", label_names=("LOGG", "FE_H")),
        "no_labels": _write(d / "no_labels.h5", label_names=("FE_H", "MG_FE")),
        "nan": _write(d / "nan.h5", _nan_flux),
        "masked_nan": _write(d / "masked_nan.h5", _masked_nan),
        "zero": _write(d / "zero.h5", _zero_rows),
        "wide": str(write_fake(d / "wide.h5", 30, n_pixels=120, seed=6)),
    }


def _one_line(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"chemtwin {argv[0]}: error:"), err
    return err[0]


# ------------------------------------------------------------------ train
@pytest.mark.parametrize("data, extra, message", [
    ("no_teff", [], "TEFF"),
    ("no_labels", [], "unknown condition label(s) TEFF, LOGG"),
    ("nan", [], "row 23, pixel 40 has NaN/inf flux"),
    ("good", ["--latent-dim", "0"], "latent dimension must be at least 1"),
    ("good", ["--condition", "TEFF,FOO"], "unknown condition label(s) FOO"),
    ("good", ["--condition", ""], "condition labels must be distinct and not empty"),
])
def test_train_bad_input(files, tmp_path, capsys, data, extra, message):
    out = tmp_path / "m"
    line = _one_line(["train", files[data], "--out", str(out), "--epochs", "1", *SMALL_CLI, *extra], capsys)
    assert message in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("name, data, message", [
    ("empty", "good", "not a chemtwin model"),
    ("garbage_json", "good", "not a chemtwin model"),
    ("other_json", "good", "not a chemtwin model"),
    ("bad_config", "good", "config.json is invalid (latent dimension must be at least 1"),
    ("truncated_checkpoint", "good", "unreadable checkpoint"),
    ("model", "wide", "the checkpoint does not fit this data and model"),  # 100-pixel model, 120-pixel data
])
def test_train_resume_from_a_folder_that_is_not_a_model(files, tmp_path, capsys, name, data, message):
    folder = tmp_path / name
    shutil.copytree(files["not_models"].get(name, files["model"]), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    line = _one_line(["train", files[data], "--out", str(folder), "--resume", *SMALL_CLI], capsys)
    assert str(folder) in line and message in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # untouched


def test_train_masked_nan_is_fine_and_zero_rows_are_counted(files, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert main(["train", files["masked_nan"], "--out", str(tmp_path / "a"), "--epochs", "1", *SMALL_CLI]) == 0
        assert main(["train", files["zero"], "--out", str(tmp_path / "b"), "--epochs", "1", *SMALL_CLI]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["skipped 3 rows whose ivar is all zero"], warnings
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    assert meta["data"]["skipped_rows"] == 3 and meta["data"]["n_train"] + meta["data"]["n_val"] == 57


# ------------------------------------------------------------------ embed
@pytest.mark.parametrize("data, message", [
    ("no_teff", "unknown condition label(s) TEFF"),
    ("no_labels", "unknown condition label(s) TEFF, LOGG"),
    ("nan", "row 23, pixel 40 has NaN/inf flux"),
])
def test_embed_bad_dataset(files, tmp_path, capsys, data, message):
    out = tmp_path / "z.h5"
    assert message in _one_line(["embed", str(files["model"]), files[data], "--out", str(out)], capsys)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("name, message", [
    ("empty", "not a chemtwin model (no readable config.json)"),
    ("garbage_json", "not a chemtwin model (no readable config.json)"),
    ("other_json", "not a chemtwin model (config.json has no format"),
    ("truncated_weights", "model.safetensors is unreadable"),
    ("no_weights", "no model.safetensors"),
    ("wrong_shape", "model.safetensors does not match config.json"),
    ("bad_config", "config.json is invalid (latent dimension must be at least 1"),
    ("missing", "no such model directory"),
])
def test_embed_with_a_folder_that_is_not_a_model(files, tmp_path, capsys, name, message):
    folder = files["not_models"].get(name, tmp_path / "missing")
    out = tmp_path / "out"
    out.mkdir()
    line = _one_line(["embed", str(folder), files["good"], "--out", str(out / "z.h5")], capsys)
    assert message in line and str(folder) in line
    assert not list(out.iterdir())


def test_embed_zero_rows_skipped_with_a_count(files, tmp_path, caplog):
    out = tmp_path / "z.h5"
    with caplog.at_level("WARNING"):
        assert main(["embed", str(files["model"]), files["zero"], "--out", str(out)]) == 0
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "skipped 3 rows whose ivar is all zero (no latent)"]
    with h5py.File(out) as f:
        assert f["z"].shape == (57, 4) and np.isfinite(f["z"][:]).all()
        assert not {2, 9, 31} & set(f["row"][:].tolist())


# ------------------------------------------------------------------ the Python API
def test_api_bad_input(files, tmp_path):
    flux, ivar, labels, group = fake_twins(30, 100, seed=5)
    with pytest.raises(InputError, match="latent dimension must be at least 1"):
        ChemTwin(latent_dim=0).fit(flux, ivar, labels, label_names=LABEL_NAMES, progress=False)  # checked by fit
    with pytest.raises(InputError, match="FOO"):
        ChemTwin(condition=("TEFF", "FOO"), epochs=1, **SMALL).fit(files["good"], out_dir=tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="TEFF"):
        ChemTwin(epochs=1, **SMALL).fit(files["no_teff"], out_dir=tmp_path / "b", progress=False)
    with pytest.raises(InputError, match="TEFF"):  # arrays whose labels lack TEFF
        ChemTwin(epochs=1, **SMALL).fit(flux, ivar, {"LOGG": labels[:, 1]}, progress=False)
    bad = flux.copy()
    bad[23, 40] = np.nan
    with pytest.raises(InputError, match="row 23, pixel 40 has NaN/inf flux"):
        ChemTwin(epochs=1, **SMALL).fit(bad, ivar, labels, label_names=LABEL_NAMES, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    for name in ("empty", "other_json", "truncated_weights", "wrong_shape", "no_weights", "bad_config"):
        with pytest.raises(InputError, match="not a chemtwin model|model.safetensors|config.json is invalid"):
            ChemTwin.load(files["not_models"][name])

    ct = ChemTwin.load(files["model"])
    with pytest.raises(InputError, match="row 23, pixel 40 has NaN/inf flux"):
        ct.transform(bad, ivar, labels[:, :2])
    with pytest.raises(InputError, match="cond lacks label"):
        ct.transform(flux, ivar, {"LOGG": labels[:, 1]})
    with pytest.raises(InputError, match="unknown condition label"):
        ct.embed_dataset(files["no_teff"])
    zero = ivar.copy()
    zero[[2, 9, 31]] = 0
    z = ct.transform(flux, zero, labels[:, :2])
    assert np.isnan(z[[2, 9, 31]]).all() and np.isfinite(np.delete(z, [2, 9, 31], 0)).all()
    # zero-ivar rows in array training are skipped and counted like the dataset's
    fitted = ChemTwin(epochs=1, val_fraction=0.0, **SMALL).fit(flux, zero, labels, label_names=LABEL_NAMES,
                                                                out_dir=tmp_path / "c", progress=False)
    assert fitted.meta["data"]["skipped_rows"] == 3 and fitted.meta["data"]["n_train"] == 57
