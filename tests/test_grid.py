"""APOGEE grids against the published ASPCAP wavelength grid, conversions and resampling."""

from pathlib import Path

import numpy as np
import pytest

from chemtwin.core.grids import apstar_wavelength, convert, get_grid, identify_grid, resample
from chemtwin.errors import InputError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def test_grid_sizes_and_log_linear_apstar():
    assert get_grid("apstar").n_pixels == 8575
    assert get_grid("aspcap").n_pixels == 7214
    assert get_grid("aspcap7514").n_pixels == 7514
    wave = apstar_wavelength()
    assert wave[0] == pytest.approx(10**4.179)
    assert np.allclose(np.diff(np.log10(wave)), 6e-6)
    assert 15100 < wave[0] < 15200 and 16900 < wave[-1] < 17000


@pytest.mark.skipif(not (SHARED / "reference").is_dir(), reason="../shared/reference not present (fresh clone)")
def test_aspcap_grid_matches_the_payne_reference():
    ref = np.load(SHARED / "reference" / "apogee_wavelength.npz")["wavelength"]
    assert np.abs(get_grid("aspcap").wavelength - ref).max() < 1e-6
    assert identify_grid(ref) == "aspcap"


@pytest.mark.skipif(not (SHARED / "reference").is_dir(), reason="../shared/reference not present (fresh clone)")
def test_7514_convention_aligns_two_independent_continuum_masks():
    """The Cannon's continuum pixels (7,214 grid, from The Payne) moved to the 7,514 grid with our
    pixel convention coincide best with the DR17 continuum mask (7,514 grid, from astroNN) at zero
    shift: the convention [246,3274), [3585,6080), [6344,8335) is right to the pixel."""
    masks = np.load(SHARED / "reference" / "aspcap_l31c_masks.npy")
    dr17 = np.load(SHARED / "reference" / "dr17_contmask.npy")
    cannon = np.load(SHARED / "reference" / "cannon_cont_pixels_apogee.npz")["pixels_cannon"]
    assert masks.shape == dr17.shape == (get_grid("aspcap7514").n_pixels,)
    moved = convert(cannon.astype(float)[None], "aspcap", "aspcap7514")[0] > 0
    overlap = {k: int((dr17 & np.roll(moved, k)).sum()) for k in range(-3, 4)}
    assert max(overlap, key=overlap.get) == 0
    assert overlap[0] > 1.4 * max(overlap[-1], overlap[1])


def test_convert_round_trip_and_fill():
    values = np.arange(7214, dtype=float)[None]
    full = convert(values, "aspcap", "apstar", fill=-1)
    assert full.shape == (1, 8575) and np.sum(full == -1) == 8575 - 7214
    assert np.array_equal(convert(full, "apstar", "aspcap"), values)
    with pytest.raises(InputError, match="expected 7214 pixels"):
        convert(np.zeros(10), "aspcap", "apstar")
    with pytest.raises(InputError, match="unknown grid"):
        get_grid("sdss")


def test_resample_identity_shift_and_ivar_propagation():
    wave = apstar_wavelength()[1000:1200]
    flux = 1 - 0.5 * np.exp(-0.5 * ((wave - wave[100]) / 0.5) ** 2)
    ivar = np.full_like(flux, 100.0)
    f, iv = resample(wave, flux, ivar, wave)
    assert np.allclose(f, flux) and np.allclose(iv, ivar)
    # half a pixel in between: var = (0.25 + 0.25) / 100 -> ivar 200
    mid = np.sqrt(wave[:-1] * wave[1:])[10:20]
    f, iv = resample(wave, flux, ivar, mid)
    assert np.allclose(iv, 200.0, rtol=1e-3)
    # a radial velocity of one pixel (4.14 km/s) moves the line by one pixel
    v = 299792.458 * (10**6e-6 - 1)
    f, iv = resample(wave, flux, ivar, wave, rv_kms=v)
    assert np.argmin(f[5:-5]) + 5 == 99


def test_resample_masks_bad_and_outside_pixels():
    wave = apstar_wavelength()[:50]
    flux, ivar = np.ones(50), np.ones(50)
    flux[20] = np.nan
    ivar[30] = 0
    out_wave = np.concatenate([[wave[0] - 1.0], wave[1:-1], [wave[-1] + 1.0]])
    f, iv = resample(wave, flux, ivar, out_wave)
    assert iv[0] == 0 and iv[-1] == 0 and f[0] == 0
    assert iv[20] == 0 and iv[30] == 0 and np.all(np.isfinite(f))
    assert np.all(iv[[10, 25, 40]] > 0)
    with pytest.raises(InputError):
        resample(wave, flux, ivar[:10], wave)
