"""``chemtwin embed MODEL_DIR FILES...``: real APOGEE files ingested on the fly and embedded.

A tiny model is trained here on synthetic spectra on the ASPCAP grid (a few seconds); the
files are the real DR17 fixtures in ../shared/fixtures/apogee.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from test_ingest import APSTARS, APVISITS, FIXTURES, IDS, pytestmark  # noqa: F401  (skips without ../shared)

from chemtwin.cli import main
from chemtwin.data.apogee import header_labels, read_spectrum
from chemtwin.errors import InputError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A small fader model on the 7,214-pixel ASPCAP grid (2 epochs on 120 synthetic giants)."""
    from chemtwin.data.generate import generate_dataset
    from chemtwin.tagging import ChemTwin

    d = tmp_path_factory.mktemp("model")
    data = generate_dataset(d / "train.h5", n_groups=60, snr=100, seed=3, progress=False, threads=1)
    out = d / "m"
    ChemTwin(epochs=2, latent_dim=4, batch_size=32, decoder_hidden=(32,), adversary_hidden=(16,),
             val_fraction=0.0, device="cpu").fit(data, out_dir=out, progress=False)
    return out


@pytest.fixture
def catalog(tmp_path) -> Path:
    path = tmp_path / "allStar-small.fits"
    Table({
        "APOGEE_ID": IDS,
        "TEFF": np.array([3700.0, 4800.0, 6400.0, 4550.0], dtype="f4"),
        "LOGG": np.array([0.6, 2.5, 4.3, 2.9], dtype="f4"),
        "FE_H": np.array([-0.2, np.nan, -0.4, 0.05], dtype="f4"),
    }).write(path)
    return path


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith(("INFO", "WARNING"))]


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def test_embed_fits_equals_ingest_then_embed(model, catalog, tmp_path):
    """Glob + file list, catalogue labels: the latents are those of `ingest` + `embed DATA.h5`."""
    listing = tmp_path / "visits.txt"
    listing.write_text("\n".join(map(str, APVISITS)) + "\n")
    lat = tmp_path / "z.h5"
    assert main(["embed", str(model), str(FIXTURES / "apStar-*.fits"), "--file-list", str(listing),
                 "--catalog", str(catalog), "--out", str(lat)]) == 0
    data, lat2 = tmp_path / "real.h5", tmp_path / "z2.h5"
    assert main(["ingest", *map(str, APSTARS + APVISITS), "--catalog", str(catalog), "--out", str(data)]) == 0
    assert main(["embed", str(model), str(data), "--out", str(lat2)]) == 0
    with h5py.File(lat) as f, h5py.File(lat2) as g:
        z = f["z"][:]
        assert z.shape == (4, 4) and np.isfinite(z).all()
        assert list(f["star_id"].asstr()[:]) == IDS == list(g["star_id"].asstr()[:])
        assert [Path(p).name for p in f["file"].asstr()[:]] == [p.name for p in APSTARS + APVISITS]
        np.testing.assert_array_equal(z, g["z"][:])
        np.testing.assert_array_equal(f["labels"][:], g["labels"][:])
        np.testing.assert_array_equal(f["group"][:], -1)
        assert f.attrs["grid"] == "aspcap" and f.attrs["labels_from"] == str(catalog)
    assert not _leftovers(tmp_path)


def test_embed_fits_with_header_labels(model, tmp_path, caplog):
    """Without --catalog, TEFF/LOGG come from the headers (RV_TEFF... apStar, RVTEFF... apVisit)."""
    lat = tmp_path / "z.h5"
    with caplog.at_level("WARNING"):
        assert main(["embed", str(model), *map(str, APSTARS + APVISITS), "--out", str(lat)]) == 0
    assert any("RV pipeline" in r.getMessage() for r in caplog.records)
    want = []
    for path in APSTARS + APVISITS:
        header = fits.getheader(path)
        want.append([header["RV_TEFF"], header["RV_LOGG"]] if "RV_TEFF" in header else [header["RVTEFF"], header["RVLOGG"]])
    with h5py.File(lat) as f:
        assert list(f["labels"].attrs["names"].astype(str)) == ["TEFF", "LOGG"]
        np.testing.assert_allclose(f["labels"][:], want, rtol=1e-6)
        assert np.isfinite(f["z"][:]).all() and f.attrs["labels_from"] == "headers"


def test_header_labels_prefer_own_names_and_name_the_file(tmp_path):
    spectrum = read_spectrum(APSTARS[0])
    np.testing.assert_allclose(header_labels(spectrum, ["TEFF", "FE_H"]),
                               [spectrum.header["RV_TEFF"], spectrum.header["RV_FEH"]])
    spectrum.header["TEFF"] = 4321.0
    assert header_labels(spectrum, ["TEFF"])[0] == 4321.0
    spectrum.header["LOGG"] = float("nan")  # not finite: the next keyword is used
    assert header_labels(spectrum, ["LOGG"])[0] == spectrum.header["RV_LOGG"]
    with pytest.raises(InputError, match=f"{spectrum.path}: no MG_FE in the header"):
        header_labels(spectrum, ["MG_FE"])


def test_embed_fits_batch_skips_bad_files_and_lists_them(model, catalog, tmp_path, capsys):
    """Truncated file, a FITS table, a star missing from the catalogue, a header without
    TEFF: each skipped with its own line; exit 1; the good files are embedded."""
    truncated = tmp_path / "apStar-truncated.fits"
    truncated.write_bytes(APSTARS[1].read_bytes()[:500_000])
    table = tmp_path / "table.fits"
    Table({"A": [1, 2]}).write(table)
    small = tmp_path / "cat.fits"
    Table({"APOGEE_ID": IDS[:3], "TEFF": [3700.0, 4800.0, 6400.0], "LOGG": [0.6, 2.5, 4.3]}).write(small)
    out = tmp_path / "out"
    out.mkdir()
    lat = out / "z.h5"
    files = [APSTARS[0], truncated, table, APVISITS[1]]
    assert main(["embed", str(model), *map(str, files), "--catalog", str(small), "--out", str(lat)]) == 1
    err = _err_lines(capsys)
    assert err[0] == "chemtwin embed: 3 of 4 file(s) skipped:"
    assert len(err) == 4
    assert "apStar-truncated.fits" in err[1] and "truncated" in err[1]
    assert "table.fits" in err[2] and "not an APOGEE" in err[2]
    assert APVISITS[1].name in err[3] and "not in catalogue" in err[3]
    with h5py.File(lat) as f:
        assert list(f["star_id"].asstr()[:]) == [IDS[0]] and np.isfinite(f["z"][:]).all()
    assert not _leftovers(out)
    # header labels: a file whose header lost its TEFF keywords is skipped by name
    no_teff = tmp_path / "apStar-noteff.fits"
    with fits.open(APSTARS[0]) as hdus:
        del hdus[0].header["RV_TEFF"]
        hdus.writeto(no_teff)
    assert main(["embed", str(model), str(no_teff), str(APSTARS[1]), "--out", str(lat), "--overwrite"]) == 1
    err = _err_lines(capsys)
    assert len(err) == 2 and "apStar-noteff.fits: no TEFF in the header" in err[1]


def test_embed_fits_nothing_usable_or_bad_setup_is_one_line_exit_2(model, catalog, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lat = out / "z.h5"
    truncated = tmp_path / "cut.fits"
    truncated.write_bytes(APSTARS[0].read_bytes()[:200_000])
    # every file bad: one error line with the first file's reason; nothing written
    assert main(["embed", str(model), str(truncated), str(catalog), "--catalog", str(catalog), "--out", str(lat)]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith("chemtwin embed: error: no usable spectrum among 2 file(s) (first: ")
    assert str(truncated) in err[0]
    no_teff = tmp_path / "noteff.fits"
    Table({"APOGEE_ID": IDS, "LOGG": [1.0, 2.0, 3.0, 4.0]}).write(no_teff)
    fe_only = tmp_path / "fe.fits"
    Table({"APOGEE_ID": IDS, "TEFF": [4000.0] * 4, "LOGG": [2.0] * 4}).write(fe_only)
    fake = tmp_path / "fake"
    _fake_pixel_model(fake)
    cases = [
        (["embed", str(model), str(APSTARS[0]), "--catalog", str(no_teff)], "has no TEFF column"),
        (["embed", str(model), str(APSTARS[0]), "--catalog", str(tmp_path / "missing.fits")], "missing.fits: no such file"),
        (["embed", str(model), str(tmp_path / "nomatch-*.fits")], "matches no file"),
        (["embed", str(model), str(APSTARS[0]), "--grid", "apstar"], "not the apstar grid"),
        (["embed", str(fake), str(APSTARS[0])], "trained on 200 pixels"),
        (["embed", str(model), str(APSTARS[0]), str(tmp_path / "data.h5")], "not several datasets or a mix"),
        (["embed", str(model), str(APSTARS[0]), "--min-good", "2"], "--min-good"),
        (["embed", str(model)], "nothing to embed"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(lat)]) == 2, argv
        err = _err_lines(capsys)
        assert len(err) == 1 and err[0].startswith("chemtwin embed: error:") and message in err[0], (argv, err)
    assert not lat.exists() and not _leftovers(out)


def _fake_pixel_model(out: Path) -> None:
    """A model trained on 200-pixel arrays: no APOGEE grid."""
    from chemtwin.tagging import ChemTwin

    rng = np.random.default_rng(0)
    flux = 1 - 0.1 * rng.random((40, 200))
    ChemTwin(epochs=1, latent_dim=2, decoder_hidden=(8,), adversary_hidden=(8,), val_fraction=0.0, device="cpu").fit(
        flux, None, {"TEFF": rng.uniform(4000, 5000, 40), "LOGG": rng.uniform(1, 3, 40)}, out_dir=out, progress=False)
