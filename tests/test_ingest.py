"""``chemtwin ingest`` on the real DR17 files in ../shared/fixtures/apogee."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.table import Table

from chemtwin.cli import main
from chemtwin.core.grids import get_grid
from chemtwin.data.dataset import open_dataset

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "apogee"
pytestmark = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"real APOGEE fixtures not found: {FIXTURES} (the ../shared folder is absent)"
)

APSTARS = [FIXTURES / "apStar-dr17-2M17335483-2753043.fits", FIXTURES / "apStar-dr17-2M19485057+5005279.fits"]
APVISITS = [FIXTURES / "apVisit-r13-5095-55844-128.fits", FIXTURES / "apVisit-r13-9518-57729-104.fits"]
IDS = ["2M17335483-2753043", "2M19485057+5005279", "2M01183798+8403419", "2M00242666+5341178"]


@pytest.fixture
def catalog(tmp_path) -> Path:
    path = tmp_path / "allStar-small.fits"
    Table({
        "APOGEE_ID": IDS,
        "TEFF": np.array([3700.0, 4800.0, 6400.0, 4550.0], dtype="f4"),
        "LOGG": np.array([0.6, 2.5, 4.3, 2.9], dtype="f4"),
        "FE_H": np.array([-0.2, np.nan, -0.4, 0.05], dtype="f4"),  # a missing abundance stays NaN
        "MG_FE": np.array([0.1, 0.2, 0.0, -9999.0], dtype="f4"),  # the old sentinel becomes NaN
        "ASPCAPFLAG": np.zeros(4, dtype="i8"),
        "SNR": np.array([154.0, 137.0, 45.0, 90.0], dtype="f4"),
    }).write(path)
    return path


def test_ingest_real_apstar_with_a_bad_file(tmp_path, catalog, capsys):
    broken = tmp_path / "apStar-broken.fits"
    broken.write_bytes(APSTARS[1].read_bytes()[:500_000])  # truncated copy
    out = tmp_path / "real.h5"
    code = main(["ingest", str(APSTARS[0]), str(broken), str(APSTARS[1]), "--catalog", str(catalog), "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert "1 of 3 file(s) skipped" in err and "apStar-broken.fits" in err and "truncated" in err
    grid = get_grid("aspcap")
    with open_dataset(out) as ds:
        assert len(ds) == 2 and ds.n_pixels == grid.n_pixels
        np.testing.assert_allclose(ds.wavelength, grid.wavelength)
        assert list(ds.star_id) == IDS[:2]
        assert ds.label_names == ["TEFF", "LOGG", "FE_H", "MG_FE"]
        labels = ds.labels()
        np.testing.assert_allclose(labels[:, :2], [[3700, 0.6], [4800, 2.5]], rtol=1e-6)
        assert np.isnan(labels[1, 2]) and labels[1, 3] == pytest.approx(0.2)
        np.testing.assert_array_equal(ds.group, [-1, -1])
        batch = ds.read()
        assert np.all(np.isfinite(batch.flux)) and np.all(np.isfinite(batch.ivar)) and np.all(batch.ivar >= 0)
        assert np.all((batch.ivar > 0).mean(axis=1) > 0.85)
        assert ds.attrs["generator"] == "chemtwin ingest" and ds.attrs["grid"] == "aspcap"
    assert not list(tmp_path.glob(".*tmp*"))


def test_ingest_apvisit_glob_and_file_list(tmp_path, catalog):
    listing = tmp_path / "files.txt"
    listing.write_text("# visits\n" + "\n".join(str(p) for p in APVISITS) + "\n")
    out = tmp_path / "all.h5"
    code = main(["ingest", str(FIXTURES / "apStar-*.fits"), "--file-list", str(listing), "--catalog", str(catalog),
                 "--out", str(out), "--grid", "aspcap7514"])
    assert code == 0
    with open_dataset(out) as ds:
        assert sorted(ds.star_id) == sorted(IDS) and ds.n_pixels == 7514
    # --overwrite is needed the second time
    assert main(["ingest", str(APSTARS[0]), "--catalog", str(catalog), "--out", str(out)]) == 2
    assert main(["ingest", str(APSTARS[0]), "--catalog", str(catalog), "--out", str(out), "--overwrite"]) == 0


def test_ingest_skips_stars_missing_from_catalogue(tmp_path, capsys):
    catalog = tmp_path / "one.fits"
    Table({"APOGEE_ID": [IDS[1]], "TEFF": [4800.0], "LOGG": [2.5]}).write(catalog)
    out = tmp_path / "one.h5"
    assert main(["ingest", *map(str, APSTARS), "--catalog", str(catalog), "--out", str(out)]) == 1
    assert "is not in catalogue" in capsys.readouterr().err
    with h5py.File(out) as f:
        assert f["flux"].shape == (1, 7214) and list(f["labels"].attrs["names"]) == ["TEFF", "LOGG"]


def test_ingest_nothing_usable_exits_2_and_writes_nothing(tmp_path, catalog, capsys):
    not_a_spectrum = tmp_path / "table.fits"
    Table({"A": [1]}).write(not_a_spectrum)
    out = tmp_path / "none.h5"
    assert main(["ingest", str(not_a_spectrum), str(catalog), "--catalog", str(catalog), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chemtwin ingest: error: no usable spectrum among 2 file(s) (first: ")
    assert "not an APOGEE apStar, aspcapStar or apVisit spectrum" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_ingest_single_problems_are_one_line_exit_2(tmp_path, catalog, capsys):
    no_teff = tmp_path / "noteff.fits"
    Table({"APOGEE_ID": IDS, "LOGG": [1.0, 2.0, 3.0, 4.0]}).write(no_teff)
    cases = [
        ["--catalog", str(tmp_path / "missing.fits")],
        ["--catalog", str(no_teff)],
        ["--catalog", str(catalog), "--min-good", "2"],
    ]
    for extra in cases:
        assert main(["ingest", str(APSTARS[0]), "--out", str(tmp_path / "x.h5"), *extra]) == 2
    assert main(["ingest", str(tmp_path / "nomatch-*.fits"), "--catalog", str(catalog), "--out", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("chemtwin ingest: error:")]
    assert any("missing.fits: no such file" in e for e in errors)
    assert any("has no TEFF column" in e for e in errors)
    assert any("matches no file" in e for e in errors)
    assert not (tmp_path / "x.h5").exists()
