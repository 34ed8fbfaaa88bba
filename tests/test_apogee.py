"""APOGEE readers and preprocessing, on the real DR17 files in ../shared/fixtures/apogee."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from chemtwin.core.grids import (
    APSTAR_N_PIXELS,
    SPEED_OF_LIGHT_KMS,
    apstar_wavelength,
    get_grid,
)
from chemtwin.data.allstar import read_catalog
from chemtwin.data.apogee import (
    BAD_PIXEL_MASK,
    read_apstar,
    read_apvisit,
    read_aspcapstar,
    read_spectrum,
)
from chemtwin.data.preprocess import (
    continuum_pixels,
    fit_continuum,
    normalize,
    preprocess,
)
from chemtwin.errors import InputError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "apogee"
REFERENCE = SHARED / "reference"
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"real APOGEE fixtures not found: {FIXTURES} (the ../shared folder is absent)"
)
needs_reference = pytest.mark.skipif(
    not REFERENCE.is_dir(), reason=f"reference tables not found: {REFERENCE} (the ../shared folder is absent)"
)

APSTAR_3 = FIXTURES / "apStar-dr17-2M17335483-2753043.fits"  # 3 visits
APSTAR_1 = FIXTURES / "apStar-dr17-2M19485057+5005279.fits"  # 1 visit
APVISIT_45 = FIXTURES / "apVisit-r13-5095-55844-128.fits"
APVISIT_90 = FIXTURES / "apVisit-r13-9518-57729-104.fits"
KMS_PER_PIXEL = SPEED_OF_LIGHT_KMS * np.log(10) * 6e-6


# ------------------------------------------------------------------ header facts (docs/apogee.md)


@needs_fixtures
@pytest.mark.parametrize(
    "path, nvisits, rows, snr, vhelio",
    [(APSTAR_3, 3, 5, 154.155, 15.681), (APSTAR_1, 1, 2, 137.489, 13.960)],
)
def test_apstar_header_facts(path, nvisits, rows, snr, vhelio):
    with fits.open(path) as hdus:
        header = hdus[0].header
        assert header["NVISITS"] == nvisits
        assert header["SNR"] == pytest.approx(snr, abs=1e-3)
        assert header["VHELIO"] == pytest.approx(vhelio, abs=1e-3)
        assert header["CRVAL1"] == 4.179 and header["CDELT1"] == 6e-6 and header["NWAVE"] == APSTAR_N_PIXELS
        assert "APOGEE_ID" not in header and header["OBJID"] == path.stem.split("dr17-")[1]
        # HDU1 flux, HDU2 error, HDU3 bitmask, all (rows, 8575); the bitmask is integer.
        shapes = [hdus[i].data.shape for i in (1, 2, 3)]
        assert shapes == [(rows, APSTAR_N_PIXELS)] * 3
        assert hdus[3].data.dtype.kind == "i"
        assert "Pixel bitmask" in hdus[3].header["BUNIT"]
        flux = hdus[1].data
        # Row 0 (combined) is NaN in the detector gaps; its S/N matches the header SNR.
        assert np.isnan(flux[0, :100]).all() and np.isnan(flux[0, 3400]) and np.isnan(flux[0, 6200])
        good = np.isfinite(flux[0])
        assert np.median(flux[0][good] / hdus[2].data[0][good]) == pytest.approx(snr, rel=1e-3)
        if nvisits == 1:
            assert not np.any(flux[1])  # the second row of a 1-visit file is empty
        else:
            # rows 2.. are the visits: their S/N are the header's SNRVISk
            for k in range(nvisits):
                row = 2 + k
                ok = flux[row] > 0
                assert np.median(flux[row][ok] / hdus[2].data[row][ok]) == pytest.approx(header[f"SNRVIS{k + 1}"], rel=1e-3)
            assert not np.any(hdus[3].data[1])  # the globally weighted row has no bitmask


@needs_fixtures
@pytest.mark.parametrize("path, snr", [(APVISIT_45, 44.967), (APVISIT_90, 89.595)])
def test_apvisit_header_facts(path, snr):
    with fits.open(path) as hdus:
        header = hdus[0].header
        assert header["SNR"] == pytest.approx(snr, abs=1e-3)
        assert "NVISITS" not in header and "CRVAL1" not in header
        for i in (1, 2, 3, 4):
            assert hdus[i].data.shape == (3, 4096)
        assert "Wavelength" in hdus[4].header["BUNIT"]
        wave = hdus[4].data
        assert np.all(np.diff(wave, axis=1) < 0)  # decreasing along each chip
        assert wave[0].min() > wave[1].max() > wave[2].max()  # rows: red, green, blue
        assert header["VHELIO"] == pytest.approx(header["VRAD"] + header["BC"], abs=1e-3)


# ------------------------------------------------------------------ readers


@needs_fixtures
def test_read_apstar_masks_bad_pixels():
    spec = read_apstar(APSTAR_3)
    assert spec.kind == "apStar" and spec.apogee_id == "2M17335483-2753043"
    assert spec.nvisits == 3 and spec.snr == pytest.approx(154.155, abs=1e-3) and spec.vhelio == pytest.approx(15.681, abs=1e-3)
    assert spec.rest_frame and not spec.normalized
    np.testing.assert_allclose(spec.wavelength, apstar_wavelength())
    bad = (spec.bitmask & BAD_PIXEL_MASK) != 0
    assert bad.sum() > 100
    assert np.all(spec.ivar[bad] == 0)
    assert np.all(np.isfinite(spec.flux)) and np.all(np.isfinite(spec.ivar))
    assert np.all(spec.ivar[:150] == 0)  # detector-gap NaNs are masked
    # Pixels flagged only with bits we keep (e.g. PERSIST_LOW, bit 11) stay usable.
    kept = (spec.bitmask != 0) & ~bad
    assert kept.any() and np.all(spec.ivar[kept & np.isfinite(spec.flux) & (spec.flux > 0)] > 0)


@needs_fixtures
def test_read_apstar_rows():
    combined = read_apstar(APSTAR_3)
    visit = read_apstar(APSTAR_3, row="visit3")
    with fits.open(APSTAR_3) as hdus:
        np.testing.assert_array_equal(visit.bitmask, hdus[3].data[4])
    assert not np.array_equal(combined.flux, visit.flux)
    assert np.all(visit.ivar[:150] == 0)  # visit rows hold 0 +- 1e13 in the gaps: no data
    flux, ivar = preprocess(visit)
    good = ivar > 0
    assert good.mean() > 0.8 and np.median(flux[good]) > 0.8
    with pytest.raises(InputError, match="NVISITS = 1"):
        read_apstar(APSTAR_1, row="visit2")
    with pytest.raises(InputError, match="single-visit"):
        read_apstar(APSTAR_1, row="global")


@needs_fixtures
def test_read_apvisit_orders_chips():
    spec = read_apvisit(APVISIT_90)
    assert spec.kind == "apVisit" and not spec.rest_frame
    assert spec.apogee_id == "2M00242666+5341178"
    assert spec.vrad == pytest.approx(-67.472, abs=1e-3)
    assert np.all(np.diff(spec.wavelength) > 0) and spec.wavelength.size == 3 * 4096
    assert [s.stop - s.start for s in spec.chip_slices] == [4096] * 3
    assert np.all(spec.ivar[(spec.bitmask & BAD_PIXEL_MASK) != 0] == 0)


@needs_fixtures
def test_read_spectrum_detects_kind():
    assert read_spectrum(APSTAR_1).kind == "apStar"
    assert read_spectrum(APVISIT_45).kind == "apVisit"
    with pytest.raises(InputError, match="not an apVisit"):
        read_apvisit(APSTAR_1)


@needs_fixtures
def test_truncated_fits_is_input_error(tmp_path):
    data = APSTAR_1.read_bytes()
    for cut in (100, 5760, 200_000, 500_000, len(data) - 2880):
        broken = tmp_path / f"cut{cut}.fits"
        broken.write_bytes(data[:cut])
        with pytest.raises(InputError, match="cut"):
            read_spectrum(broken)


def test_non_apogee_fits_is_input_error(tmp_path):
    image = tmp_path / "image.fits"
    fits.HDUList([fits.PrimaryHDU(np.zeros((10, 10)))]).writeto(image)
    table = tmp_path / "table.fits"
    Table({"A": [1, 2]}).write(table)
    cube = tmp_path / "cube.fits"
    fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU(np.zeros((2, 100))) for _ in range(3)]).writeto(cube)
    text = tmp_path / "notes.fits"
    text.write_text("hello")
    for path in (image, table, cube, text, tmp_path / "missing.fits"):
        with pytest.raises(InputError):
            read_spectrum(path)


def _write_aspcapstar(path: Path, n_pixels: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    flux = 1 - 0.3 * rng.random(n_pixels)
    error = np.full(n_pixels, 0.01)
    flux[:10] = 0.0  # ASPCAP leaves unusable pixels at 0
    header = fits.Header({"OBJID": "2M00000000+0000000", "SNR": 99.0, "VHELIO": 1.5, "NVISITS": 2})
    fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(flux), fits.ImageHDU(error), fits.ImageHDU(flux)]).writeto(path)
    return flux


@pytest.mark.parametrize("n_pixels, grid", [(8575, "apstar"), (7214, "aspcap")])
def test_read_aspcapstar_data_model(tmp_path, n_pixels, grid):
    """Follows the DR17 data model (no real aspcapStar file was available to check)."""
    path = tmp_path / "aspcapStar.fits"
    flux = _write_aspcapstar(path, n_pixels)
    spec = read_aspcapstar(path)
    assert spec.kind == "aspcapStar" and spec.normalized and spec.grid == grid and spec.apogee_id == "2M00000000+0000000"
    assert np.all(spec.ivar[:10] == 0) and spec.ivar[100] == pytest.approx(1e4)
    out_flux, out_ivar = preprocess(spec, grid="aspcap")
    assert out_flux.shape == (7214,)
    if grid == "aspcap":  # already normalized: values pass through unchanged
        np.testing.assert_allclose(out_flux[10:], flux[10:])


# ------------------------------------------------------------------ catalogue


def test_catalog_lookup(tmp_path):
    path = tmp_path / "allStar.fits"
    Table({
        "APOGEE_ID": ["A", "B", "B", "C", "D"],
        "TEFF": np.array([4800, 4500, 4600, 4700, np.nan], dtype="f4"),
        "LOGG": np.array([2.4, 2.0, 2.1, 2.2, 1.0], dtype="f4"),
        "FE_H": np.array([0.0, -9999.0, 0.1, np.nan, 0.0], dtype="f4"),
        "SNR": np.array([100, 50, 200, 80, 90], dtype="f4"),
        "ASPCAPFLAG": np.array([0, 0, 0, 1 << 23, 0], dtype="i8"),
    }).write(path)
    cat = read_catalog(path)
    assert cat.label_names == ("TEFF", "LOGG", "FE_H")
    np.testing.assert_allclose(cat.lookup("A"), [4800, 2.4, 0.0], rtol=1e-6)
    np.testing.assert_allclose(cat.lookup("B"), [4600, 2.1, 0.1], rtol=1e-6)  # duplicate: highest SNR wins
    with pytest.raises(InputError, match="STAR_BAD"):
        cat.lookup("C")
    assert np.isnan(cat.lookup("C", keep_flagged=True)[2])
    with pytest.raises(InputError, match="no TEFF"):
        cat.lookup("D")
    with pytest.raises(InputError, match="not in catalogue"):
        cat.lookup("E")
    assert read_catalog(path, ["TEFF", "LOGG"]).label_names == ("TEFF", "LOGG")
    with pytest.raises(InputError, match="MG_FE"):
        read_catalog(path, ["TEFF", "MG_FE"])


def test_catalog_without_teff_is_input_error(tmp_path):
    path = tmp_path / "noteff.fits"
    Table({"APOGEE_ID": ["A"], "LOGG": [2.0]}).write(path)
    with pytest.raises(InputError, match="no TEFF column"):
        read_catalog(path)
    noid = tmp_path / "noid.fits"
    Table({"TEFF": [4000.0], "LOGG": [2.0]}).write(noid)
    with pytest.raises(InputError, match="APOGEE_ID"):
        read_catalog(noid)
    with pytest.raises(InputError, match="no such file"):
        read_catalog(tmp_path / "missing.fits")


# ------------------------------------------------------------------ preprocessing


def test_fit_continuum_recovers_smooth_continuum():
    rng = np.random.default_rng(1)
    x = np.arange(APSTAR_N_PIXELS)
    continuum = 800 + 0.02 * x - 2e-6 * x**2
    lines = np.ones(APSTAR_N_PIXELS)
    free = ~continuum_pixels("dr17")
    lines[free] = 1 - 0.5 * rng.random(free.sum())  # absorption everywhere except continuum pixels
    flux = np.stack([continuum * lines, 2 * continuum * lines])
    ivar = np.full_like(flux, 1e-2)
    fitted = fit_continuum(flux, ivar)
    for a, b in ((246, 3274), (3585, 6080), (6344, 8335)):
        np.testing.assert_allclose(fitted[0, a:b], continuum[a:b], rtol=1e-6)
        np.testing.assert_allclose(fitted[1, a:b], 2 * continuum[a:b], rtol=1e-6)
    assert np.all(fitted[:, :246] == 0)
    norm_flux, norm_ivar = normalize(flux, ivar)
    assert np.all(norm_ivar[:, :246] == 0)
    np.testing.assert_allclose(norm_flux[0, 300:3000], lines[300:3000], rtol=1e-6)


@needs_fixtures
@pytest.mark.parametrize("path", [APSTAR_3, APSTAR_1, APVISIT_45, APVISIT_90])
def test_preprocess_real_spectra(path):
    spec = read_spectrum(path)
    flux, ivar = preprocess(spec, grid="aspcap")
    grid = get_grid("aspcap")
    assert flux.shape == ivar.shape == (grid.n_pixels,)
    assert np.all(np.isfinite(flux)) and np.all(np.isfinite(ivar)) and np.all(ivar >= 0)
    good = ivar > 0
    assert good.mean() > 0.8
    cont = continuum_pixels("dr17")[grid.apstar_index] & good
    assert np.median(flux[cont]) == pytest.approx(1.0, abs=0.01)
    assert 0.85 < np.median(flux[good]) < 1.01
    # S/N survives normalization (within the effect of masking and interpolation)
    snr = np.median(flux[good] * np.sqrt(ivar[good]))
    assert 0.7 * spec.snr < snr < 1.6 * spec.snr
    if spec.kind == "apStar":  # flagged pixels stay masked on the ASPCAP grid
        bad = (spec.bitmask[grid.apstar_index] & BAD_PIXEL_MASK) != 0
        assert np.all(ivar[bad] == 0)


def _lag_pixels(a: np.ndarray, b: np.ndarray, max_lag: int = 30) -> int:
    """Integer shift (pixels) that best aligns absorption in a with that in b (same grid)."""
    da, db = 1 - a, 1 - b
    da, db = da - da.mean(), db - db.mean()
    n = a.size
    scores = [np.dot(da[max(0, k) : n + min(0, k)], db[max(0, -k) : n - max(0, k)]) for k in range(-max_lag, max_lag + 1)]
    return int(np.argmax(scores)) - max_lag


@needs_fixtures
def test_rest_frame_conventions():
    """apStar spectra are rest-frame; apVisit spectra need VRAD (not VHELIO) removed.

    The apVisit giant (TEFF ~4,500 K) is cross-correlated with the apStar giant; VRAD is
    -67.5 km/s (16 pixels) and VHELIO -82.1 km/s, so a wrong convention shows up as a lag of
    several pixels.
    """
    apgrid = get_grid("aspcap").chip_slices[0]  # blue chip: many lines in both stars
    ref_flux, ref_ivar = preprocess(read_spectrum(APSTAR_3))
    visit = read_spectrum(APVISIT_90)
    wrong_vhelio = (visit.vrad - visit.vhelio) / KMS_PER_PIXEL  # +3.5 px
    for rv, expected in ((None, 0), (0.0, visit.vrad / KMS_PER_PIXEL), (visit.vhelio, wrong_vhelio)):
        flux, ivar = preprocess(visit, rv_kms=rv)
        both = (ivar > 0) & (ref_ivar > 0)
        a = np.where(both, flux, 1.0)[apgrid]
        b = np.where(both, ref_flux, 1.0)[apgrid]
        assert abs(_lag_pixels(a, b) - expected) <= 1, rv


# ------------------------------------------------------------------ shipped tables


@needs_reference
def test_continuum_tables_match_reference():
    dr17 = np.load(REFERENCE / "dr17_contmask.npy", allow_pickle=False)
    with np.load(REFERENCE / "cannon_cont_pixels_apogee.npz", allow_pickle=False) as z:
        cannon = z["pixels_cannon"]
    for name, mask, grid in (("dr17", dr17, "aspcap7514"), ("cannon", cannon, "aspcap")):
        expected = np.zeros(APSTAR_N_PIXELS, dtype=bool)
        expected[get_grid(grid).apstar_index[mask]] = True
        np.testing.assert_array_equal(continuum_pixels(name), expected)


@needs_fixtures
def test_telluric_windows_cover_flagged_pixels():
    from chemtwin.data.augment import telluric_windows

    windows = telluric_windows()
    assert windows.shape == (80, 2) and np.all(np.diff(windows.reshape(-1)) > 0)
    edges = windows.reshape(-1)
    for path in (APVISIT_45, APVISIT_90):
        spec = read_apvisit(path)
        flagged = (spec.bitmask >> 13) & 1 == 1  # SIG_TELLURIC
        inside = np.searchsorted(edges, spec.wavelength[flagged], side="right") % 2 == 1
        assert inside.mean() > 0.97
