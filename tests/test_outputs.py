"""Issue 17, items 2 and 4: stars out of the model's depth are flagged, and latents, twin-search
results and clusters open in astropy's ``Table.read`` (and TOPCAT) without arguments.

A tiny model is trained on synthetic giants on the ASPCAP grid (seconds); the real stars are the
two DR17 apStar fixtures in ../shared/fixtures/apogee, ingested with ``chemtwin ingest``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import astropy.units as u
import h5py
import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from test_ingest import APSTARS, FIXTURES

from chemtwin.cli import main
from chemtwin.errors import InputError
from chemtwin.search.latents import open_latents, write_latents
from chemtwin.search.tables import output_format
from chemtwin.tagging.depth import LABELS_OUT_OF_RANGE, LATENT_FAR, POOR_RECONSTRUCTION

torch.set_num_threads(1)
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"real APOGEE fixtures not found: {FIXTURES}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, its training set): 2 epochs on 120 synthetic giants at SNR 100."""
    from chemtwin.data.generate import generate_dataset
    from chemtwin.tagging import ChemTwin

    d = tmp_path_factory.mktemp("model")
    data = generate_dataset(d / "train.h5", n_groups=60, snr=100, seed=3, progress=False, threads=1)
    out = d / "m"
    ChemTwin(epochs=2, latent_dim=4, batch_size=32, decoder_hidden=(32,), adversary_hidden=(16,),
             val_fraction=0.0, device="cpu").fit(data, out_dir=out, progress=False)
    return out, Path(data)


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    """The two apStar fixtures ingested with their RV-pipeline labels (a 3,677 K giant at LOGG 0.53
    and a 5,226 K dwarf at LOGG 5.0): both outside the training prior (4,050-5,500 K, LOGG 1-3.5)."""
    if not FIXTURES.is_dir():
        pytest.skip("no fixtures")
    d = tmp_path_factory.mktemp("real")
    catalog = d / "allStar-small.fits"
    Table({"APOGEE_ID": ["2M17335483-2753043", "2M19485057+5005279"], "TEFF": np.array([3676.9, 5226.2], "f4"),
           "LOGG": np.array([0.53, 5.0], "f4")}).write(catalog)
    out = d / "real.h5"
    assert main(["ingest", *map(str, APSTARS), "--catalog", str(catalog), "--out", str(out)]) == 0
    return out


def _one_line_exit_2(capsys, argv, message: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and not x.startswith(("INFO", "WARNING"))]
    assert len(err) == 1 and err[0].startswith("chemtwin ") and message in err[0], err


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def test_reference_is_recorded_at_train_time(trained):
    model, _ = trained
    ref = json.loads((model / "config.json").read_text())["reference"]
    assert ref["n_stars"] == 120 and ref["quantile"] == 0.999
    assert 4000 < ref["label_min"][0] < ref["label_max"][0] < 5600 and 0.9 < ref["label_min"][1] < ref["label_max"][1] < 3.6
    assert np.asarray(ref["latent_cov"]).shape == (4, 4)
    assert ref["recon_chi2_threshold"] >= 3 * ref["recon_chi2_median"] > 0 and ref["latent_distance_threshold"] > 0


def test_reference_survives_load_and_save(trained, tmp_path):
    from chemtwin.tagging import ChemTwin

    model, _ = trained
    ChemTwin.load(model).save(tmp_path / "copy")
    assert (json.loads((tmp_path / "copy" / "config.json").read_text())["reference"]
            == json.loads((model / "config.json").read_text())["reference"])


def test_training_stars_are_in_depth(trained, tmp_path, caplog):
    model, data = trained
    out = tmp_path / "z.h5"
    assert main(["embed", str(model), str(data), "--out", str(out)]) == 0
    with open_latents(out) as lf:
        flags = lf.column("flags")
        assert flags.dtype == np.int16 and len(flags) == 120
        assert not (flags & LABELS_OUT_OF_RANGE).any()  # the training set is its own range
        assert not flags.any()  # bits 2 and 4: no training star lies beyond its own envelope
        chi2 = lf.column("recon_chi2")
        assert 0.5 < np.median(chi2) < 2  # chi2 per pixel ~1 on the training stars by construction
        depth = json.loads(lf.attrs["depth"])
        assert depth["checked"] == 120 and depth["reference"] == "model folder"


@needs_fixtures
def test_real_apstars_out_of_range_are_flagged(trained, real, tmp_path, caplog):
    """The two real stars: labels outside the training range, flagged (bit 1), latents kept, one
    warning line with the counts; their latents are also far and poorly rebuilt by this model."""
    model, _ = trained
    out = tmp_path / "real_z.h5"
    with caplog.at_level("WARNING"):
        assert main(["embed", str(model), str(real), "--out", str(out)]) == 0
    lines = [r.getMessage() for r in caplog.records if "out of the model's depth" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("2 of 2 stars are out of the model's depth: 2 with TEFF/LOGG outside")
    with open_latents(out) as lf:
        assert lf.n_stars == 2 and np.isfinite(lf.read()).all()  # kept, never dropped
        flags = lf.column("flags")
        np.testing.assert_array_equal(flags & LABELS_OUT_OF_RANGE, LABELS_OUT_OF_RANGE)
        assert np.isfinite(lf.column("latent_distance")).all() and np.isfinite(lf.column("recon_chi2")).all()
        assert json.loads(lf.attrs["flag_bits"]) == {"LABELS_OUT_OF_RANGE": 1, "LATENT_FAR": 2, "POOR_RECONSTRUCTION": 4}
    t = Table.read(out)  # the latent file itself, no arguments
    assert list(t["APOGEE_ID"]) == ["2M17335483-2753043", "2M19485057+5005279"]
    assert t["TEFF"].unit == u.K and t["LOGG"].unit == u.dex and t["Z"].shape == (2, 4)
    assert list(t["FLAGS"]) == list(flags) and t["RECON_CHI2"][0] > 0


@needs_fixtures
def test_embed_spectrum_files_to_fits_and_ecsv(trained, tmp_path):
    """`chemtwin embed FILES --out X.fits` / `.ecsv`: one table per star with TELESCOPE/FIELD from the
    headers; the FITS file passes astropy's verification."""
    model, _ = trained
    for name in ("z.fits", "z.ecsv"):
        assert main(["embed", str(model), *map(str, APSTARS), "--out", str(tmp_path / name)]) == 0
        t = Table.read(tmp_path / name)
        assert list(t["APOGEE_ID"]) == ["2M17335483-2753043", "2M19485057+5005279"]
        assert list(t["FIELD"]) == ["000+02", "K04_083+13"]
        assert t["Z"].shape == (2, 4) and t["TEFF"].unit == u.K and all(t["FLAGS"] & LABELS_OUT_OF_RANGE)
    with fits.open(tmp_path / "z.fits") as hdus:
        hdus.verify("exception")
        header = hdus[1].header
        units = {header[f"TTYPE{i}"]: header.get(f"TUNIT{i}") for i in range(1, header["TFIELDS"] + 1)}
        assert units["TEFF"] == "K" and units["LOGG"] == "dex"
    assert not _leftovers(tmp_path)


@needs_fixtures
def test_whiten_keeps_the_flags(trained, real, tmp_path):
    model, data = trained
    assert main(["embed", str(model), str(data), "--out", str(tmp_path / "train_z.h5")]) == 0
    assert main(["embed", str(model), str(real), "--out", str(tmp_path / "real_z.h5")]) == 0
    assert main(["whiten", str(tmp_path / "real_z.h5"), "--train", str(tmp_path / "train_z.h5"),
                 "--out", str(tmp_path / "white.h5")]) == 0
    with open_latents(tmp_path / "real_z.h5") as a, open_latents(tmp_path / "white.h5") as b:
        for name in ("flags", "latent_distance", "recon_chi2"):
            np.testing.assert_array_equal(a.column(name), b.column(name))
        np.testing.assert_array_equal(Table.read(tmp_path / "white.h5")["Z"], b.read())


def _copy_with_config(model, dest, edit):
    """A copy of the model folder ``model`` at ``dest`` whose config.json ``edit(meta)`` changed."""
    dest.mkdir()
    for p in model.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    meta = json.loads((dest / "config.json").read_text())
    edit(meta)
    (dest / "config.json").write_text(json.dumps(meta))
    return dest


def test_old_model_folder_without_reference(trained, tmp_path, caplog):
    """A model folder written before the reference: label range only (from the weights), a note."""
    model, data = trained
    old = _copy_with_config(model, tmp_path / "old", lambda meta: meta.pop("reference"))
    out = tmp_path / "z.h5"
    with caplog.at_level("WARNING"):
        assert main(["embed", str(old), str(data), "--out", str(out)]) == 0
    assert any("no out-of-depth reference" in r.getMessage() for r in caplog.records)
    with open_latents(out) as lf:
        assert not lf.column("flags").any() and np.isnan(lf.column("recon_chi2")).all()


def test_damaged_reference_is_one_line(trained, tmp_path, capsys):
    model, data = trained
    bad = _copy_with_config(model, tmp_path / "bad",
                            lambda meta: meta["reference"].update(latent_cov=[[1.0, 2.0]]))
    _one_line_exit_2(capsys, ["embed", str(bad), str(data), "--out", str(tmp_path / "z.h5")], "out-of-depth reference is invalid")
    assert not (tmp_path / "z.h5").exists() and not _leftovers(tmp_path)


def test_old_latent_files_still_read(tmp_path):
    """A latent file without the new columns or table reads as before (and gives None for them)."""
    path = tmp_path / "old.h5"
    write_latents(path, np.zeros((3, 2)), group=np.array([0, 0, -1]))
    with open_latents(path) as lf:
        assert lf.column("flags") is None and lf.n_stars == 3
        t = lf.table()
        assert list(t["APOGEE_ID"]) == ["0", "1", "2"] and "FLAGS" not in t.colnames


def test_search_and_cluster_tables(trained, tmp_path, capsys):
    """Search results and clusters as FITS, ECSV and HDF5: each opens with Table.read(path)."""
    model, data = trained
    lat = tmp_path / "z.h5"
    assert main(["embed", str(model), str(data), "--out", str(lat)]) == 0
    assert main(["index", str(lat), "--out", str(tmp_path / "idx")]) == 0
    for name in ("twins.fits", "twins.ecsv", "twins.h5"):
        assert main(["search", str(tmp_path / "idx"), "--query", str(lat), "-k", "3", "--out", str(tmp_path / name),
                     "--show", "0"]) == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "several tables" warning: one table per file
            t = Table.read(tmp_path / name)
        assert len(t) == 360 and list(t["RANK"][:3]) == [1, 2, 3] and t.colnames[:3] == ["QUERY_ID", "QUERY_FLAGS", "RANK"]
        assert (np.diff(t["DISTANCE"][:3]) >= 0).all()
    with fits.open(tmp_path / "twins.fits") as hdus:
        hdus.verify("exception")
    assert main(["search", str(tmp_path / "idx"), "--star", "0", "-k", "2", "--out", str(tmp_path / "one.fits")]) == 0
    assert list(Table.read(tmp_path / "one.fits")["QUERY_ID"]) == ["0", "0"]
    for name in ("c.fits", "c.ecsv", "c.h5"):
        assert main(["cluster", str(lat), "--out", str(tmp_path / name), "--min-cluster-size", "3"]) == 0
        t = Table.read(tmp_path / name)
        assert len(t) == 120 and {"CLUSTER", "PROBABILITY", "GROUP"} <= set(t.colnames)
    with fits.open(tmp_path / "c.fits") as hdus:
        hdus.verify("exception")
    with h5py.File(tmp_path / "c.h5") as f:  # the old layout is still there for chemtwin's readers
        assert f["cluster"].shape == (120,) and "params" in f.attrs
    assert not _leftovers(tmp_path)


def test_table_bad_input_one_line_nothing_written(trained, tmp_path, capsys):
    model, data = trained
    lat = tmp_path / "z.h5"
    assert main(["embed", str(model), str(data), "--out", str(lat)]) == 0
    assert main(["index", str(lat), "--out", str(tmp_path / "idx")]) == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    idx = str(tmp_path / "idx")
    cases = [
        (["embed", str(model), str(data), "--out", str(tmp_path / "a.fits"), "--format", "ecsv"], "does not match the suffix"),
        (["embed", str(model), str(data), "--out", str(tmp_path / "a.fits"), "--workers", "1"], "HDF5 latent shards"),
        (["embed", str(model), str(data), "--out", str(tmp_path / "nodir" / "a.fits")], "does not exist"),
        (["embed", str(model), str(tmp_path / "missing.h5"), "--out", str(tmp_path / "a.ecsv")], "missing.h5"),
        (["embed", str(model), str(data), "--out", str(lat), "--format", "fits"], "does not match the suffix"),
        (["search", idx, "--star", "0", "--format", "fits"], "--format applies to --out"),
        (["search", idx, "--star", "0", "--out", str(tmp_path / "t.fits"), "--format", "hdf5"], "does not match"),
        (["search", idx, "--star", "nobody", "--out", str(tmp_path / "t.fits")], "nobody"),
        (["search", idx, "--star", "0", "--out", str(lat)], "exists"),
        (["cluster", str(lat), "--out", str(tmp_path / "c.ecsv"), "--format", "fits"], "does not match"),
        (["cluster", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "c.fits")], "missing.h5"),
    ]
    for argv, message in cases:
        _one_line_exit_2(capsys, argv, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporaries


def test_output_format_rules():
    assert output_format("x.fits") == "fits" and output_format("x.ECSV") == "ecsv" and output_format("x.h5") == "hdf5"
    assert output_format("x.out") == "hdf5" and output_format("x.out", "fits") == "fits"
    with pytest.raises(InputError, match="does not match"):
        output_format("x.h5", "ecsv")
    with pytest.raises(InputError, match="unknown table format"):
        output_format("x", "csv")


@pytest.mark.parametrize("bits", [LATENT_FAR, POOR_RECONSTRUCTION])
def test_flag_bits_distinct(bits):
    assert bits & LABELS_OUT_OF_RANGE == 0
