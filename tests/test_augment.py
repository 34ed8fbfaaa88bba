"""Augmentations: exact shifts, EW-conserving broadening, masks, seeds, and the CLI commands."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from chemtwin.cli import main
from chemtwin.core.grids import SPEED_OF_LIGHT_KMS, get_grid
from chemtwin.data.augment import (
    Augmenter,
    add_noise,
    continuum_error,
    mask_tellurics,
    persistence,
    telluric_mask,
    telluric_windows,
    zero_bad_pixels,
)
from chemtwin.data.broadening import (
    chip_segments,
    doppler_shift,
    macroturbulence,
    rotation_profile,
    rotational_broadening,
)
from chemtwin.data.dataset import open_dataset
from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.errors import InputError

GRID = get_grid("aspcap")
WAVE = GRID.wavelength
P = GRID.n_pixels
DV = SPEED_OF_LIGHT_KMS * np.log(10) * 6e-6  # km/s per apStar pixel
LINE_PIXELS = (1500.3, 4000.0, 6500.7)  # one line per chip


def line_spectra(n: int = 4, depth: float = 0.6, sigma_px: float = 1.5) -> np.ndarray:
    x = np.arange(P)
    flux = np.ones(P)
    for centre in LINE_PIXELS:
        flux -= depth * np.exp(-0.5 * ((x - centre) / sigma_px) ** 2)
    return np.repeat(flux[None], n, axis=0)


def centroids(flux: np.ndarray) -> np.ndarray:
    out = []
    for centre in LINE_PIXELS:
        lo, hi = int(centre) - 60, int(centre) + 60
        depth = 1 - flux[:, lo:hi]
        out.append(lo + (depth * np.arange(hi - lo)).sum(1) / depth.sum(1))
    return np.stack(out, axis=1)


def equivalent_widths(flux: np.ndarray) -> np.ndarray:
    dlam = np.gradient(WAVE)
    out = []
    for centre in LINE_PIXELS:
        lo, hi = int(centre) - 100, int(centre) + 100
        out.append(((1 - flux[:, lo:hi]) * dlam[lo:hi]).sum(1))
    return np.stack(out, axis=1)


def test_grid_chips_and_pixel_velocity():
    slices, dvs = chip_segments(WAVE)
    assert [(s.start, s.stop) for s in slices] == [(0, 2920), (2920, 5320), (5320, 7214)]
    np.testing.assert_allclose(dvs, DV, rtol=1e-6)


def test_rv_shift_moves_lines_by_the_right_number_of_pixels():
    flux = line_spectra(5)
    shifts_px = np.array([0.0, 1.0, 2.5, -3.25, 10.0])
    rv = SPEED_OF_LIGHT_KMS * np.expm1(shifts_px * DV / SPEED_OF_LIGHT_KMS)  # exact log-lambda shift
    shifted, ivar = doppler_shift(flux, np.ones_like(flux), WAVE, rv)
    np.testing.assert_allclose(centroids(shifted) - centroids(flux), np.repeat(shifts_px[:, None], 3, 1), atol=2e-3)
    # a redshift moves the line to longer wavelength by lambda * v / c
    lam0 = np.interp(centroids(flux)[4, 0], np.arange(P), WAVE)
    lam1 = np.interp(centroids(shifted)[4, 0], np.arange(P), WAVE)
    assert lam1 / lam0 == pytest.approx(1 + rv[4] / SPEED_OF_LIGHT_KMS, rel=2e-7)
    # pixels shifted in from beyond a chip edge are masked; ivar propagates (half pixel: var / 2)
    assert np.all(ivar[4, :10] == 0) and np.all(ivar[4, 2920:2930] == 0)
    np.testing.assert_allclose(ivar[4, 100:200], 1.0, rtol=1e-6)
    half, half_ivar = doppler_shift(flux[:1], np.ones_like(flux[:1]), WAVE, SPEED_OF_LIGHT_KMS * np.expm1(0.5 * DV / SPEED_OF_LIGHT_KMS))
    assert half_ivar[0, 1000] == pytest.approx(2.0)


def test_rotation_profile_is_normalized():
    v = np.linspace(-30, 30, 60001)
    for vsini in (5.0, 20.0):
        for eps in (0.0, 0.6, 1.0):
            assert np.trapezoid(rotation_profile(v, vsini, eps), v) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("noiseless", [True, False])
def test_rotational_broadening_preserves_equivalent_width(noiseless):
    flux = line_spectra(4)
    ivar = np.full_like(flux, np.inf if noiseless else 1e4)
    broad, broad_ivar = rotational_broadening(flux, ivar, WAVE, [0.0, 3.0, 15.0, 60.0], epsilon=0.6)
    np.testing.assert_allclose(equivalent_widths(broad), equivalent_widths(flux), rtol=1e-4)
    np.testing.assert_array_equal(broad[0], flux[0])
    core = int(LINE_PIXELS[0])
    assert broad[1, core] > flux[1, core] and broad[3, core] > broad[2, core] > broad[1, core]  # shallower
    if noiseless:
        assert np.all(np.isinf(broad_ivar))
    else:  # averaging neighbours lowers the variance
        assert np.all(broad_ivar[1:, 1000] > 1e4)


@pytest.mark.parametrize("kind", ["gaussian", "rt"])
def test_macroturbulence_preserves_equivalent_width(kind):
    flux = line_spectra(3)
    broad, _ = macroturbulence(flux, np.full_like(flux, np.inf), WAVE, [2.0, 6.0, 12.0], kind=kind)
    np.testing.assert_allclose(equivalent_widths(broad), equivalent_widths(flux), rtol=1e-4)


def test_broadening_masks_neighbours_of_masked_pixels():
    flux = line_spectra(2)
    ivar = np.full_like(flux, 1e4)
    ivar[:, 1000] = 0
    _, out = rotational_broadening(flux, ivar, WAVE, [0.0, 20.0])
    assert out[0, 1000] == 0 and np.count_nonzero(out[0] == 0) == 1
    assert np.all(out[1, 995:1006] == 0) and out[1, 1010] > 0


def test_noise_reaches_target_snr():
    flux = np.ones((64, P))
    noisy, ivar = add_noise(flux, np.full_like(flux, np.inf), 50.0, 0)
    assert np.std(noisy - flux) == pytest.approx(1 / 50, rel=0.01)
    np.testing.assert_allclose(ivar, 2500.0)
    # already noisier pixels are left alone; masked pixels stay masked
    ivar_in = np.full_like(flux, 100.0)
    ivar_in[:, :10] = 0
    out, out_ivar = add_noise(flux, ivar_in, 50.0, 0)
    np.testing.assert_array_equal(out, flux)
    assert np.all(out_ivar[:, :10] == 0) and np.all(out_ivar[:, 10:] == 100.0)
    snr = np.sqrt(add_noise(flux, np.full_like(flux, np.inf), (40, 400), 1)[1][:, 0])
    assert snr.min() >= 40 and snr.max() <= 400 and snr.std() > 10


def test_telluric_masking_sets_ivar_zero_and_keeps_flux():
    flux = line_spectra(8)
    ivar = np.full_like(flux, 1e4)
    out, out_ivar = mask_tellurics(flux, ivar, WAVE, rng=3, rv_max=50.0)
    np.testing.assert_array_equal(out, flux)
    masked = out_ivar == 0
    assert 0.03 < masked.mean() < 0.15
    # at zero velocity the mask is exactly the windows
    inside = telluric_mask(WAVE, [0.0])[0]
    windows = telluric_windows()
    lam = WAVE[inside]
    assert np.all([np.any((w >= windows[:, 0]) & (w <= windows[:, 1])) for w in lam])


def test_bad_pixels_are_zeroed():
    flux = line_spectra(4)
    out, ivar = zero_bad_pixels(flux, np.full_like(flux, 1e4), 0.02, 7)
    bad = ivar == 0
    assert 0.015 < bad.mean() < 0.025
    assert np.all(out[bad] == 0) and np.array_equal(out[~bad], flux[~bad])


def test_persistence_dilutes_lines_on_one_chip_only():
    flux = line_spectra(4)
    out, _ = persistence(flux, np.full_like(flux, 1e4), WAVE, 0.3, 0, chip="green")
    slices, _ = chip_segments(WAVE)
    np.testing.assert_array_equal(out[:, slices[0]], flux[:, slices[0]])
    np.testing.assert_array_equal(out[:, slices[2]], flux[:, slices[2]])
    core = int(LINE_PIXELS[1])
    assert np.all(out[:, core] >= flux[:, core]) and np.any(out[:, core] > flux[:, core])
    assert np.all(out[:, slices[1]] <= 1.0 + 1e-12)


def test_continuum_error_is_smooth_per_chip_and_scales_ivar():
    flux = line_spectra(4)
    ivar = np.full_like(flux, 1e4)
    out, out_ivar = continuum_error(flux, ivar, WAVE, 0.01, 3)
    factor = out / flux
    np.testing.assert_allclose(out_ivar, ivar / factor**2, rtol=1e-10)
    assert 0 < np.abs(factor - 1).max() < 0.05
    for s in chip_segments(WAVE)[0]:  # a quadratic across each chip: third differences vanish
        assert np.abs(np.diff(factor[:, s], 3)).max() < 1e-9
    same, _ = continuum_error(flux, ivar, WAVE, 0.01, 3)
    np.testing.assert_array_equal(out, same)
    np.testing.assert_array_equal(continuum_error(flux, ivar, WAVE, 0.0, 3)[0], flux)
    with pytest.raises(InputError):
        continuum_error(flux, ivar, WAVE, -1.0, 3)


def test_same_seed_same_output():
    aug = Augmenter(snr=(50, 200), rv_max=5, vsini_max=10, vmacro_max=4, telluric=True, bad_pixel_frac=0.01, persistence=0.1)
    flux = line_spectra(6)
    ivar = np.full_like(flux, np.inf)
    a = aug(flux, ivar, WAVE, np.random.default_rng(42))
    b = aug(flux, ivar, WAVE, 42)
    c = aug(flux, ivar, WAVE, 43)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    np.testing.assert_array_equal(flux, line_spectra(6))  # input untouched


def test_augmenter_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    aug = Augmenter(snr=100.0, rv_max=2.0)
    flux = torch.tensor(line_spectra(3), dtype=torch.float32)
    out, ivar = aug(flux, torch.full_like(flux, 1e6), torch.tensor(WAVE), 0)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == flux.shape


def test_augmenter_rejects_bad_configuration():
    for kwargs in ({"rv_max": -1}, {"bad_pixel_frac": 2}, {"snr": 0}, {"macro_kind": "x"}, {"persistence_chip": "cyan"}):
        with pytest.raises(InputError):
            Augmenter(**kwargs)
    with pytest.raises(InputError):
        Augmenter(rv_max=1)(np.ones((2, 10)), np.ones((2, 11)), np.arange(10.0) + 1, 0)
    with pytest.raises(InputError):
        Augmenter(rv_max=1)(np.ones((2, P)), np.ones((2, P)), WAVE, None)


# ------------------------------------------------------------------ CLI


def _write_dataset(path, flux, ivar, seed=0, star_id=True):
    n = len(flux)
    rng = np.random.default_rng(seed)
    labels = np.column_stack([rng.uniform(4000, 5000, n), rng.uniform(1, 3, n)]).astype("f4")
    with DatasetWriter(path, WAVE, ["TEFF", "LOGG"], attrs={"generator": "test", "grid": "aspcap", "seed": seed, "snr": "inf"},
                       with_star_id=star_id) as w:
        w.append(flux, ivar, labels, np.arange(n) // 2, [f"s{i}" for i in range(n)] if star_id else None)


def test_augment_cli_streams_and_is_reproducible(tmp_path):
    src = tmp_path / "syn.h5"
    _write_dataset(src, line_spectra(10), np.full((10, P), np.inf))
    args = ["--seed", "5", "--snr", "80:150", "--rv-max", "3", "--vsini-max", "8", "--telluric",
            "--bad-pixel-frac", "0.01", "--persistence", "0.1", "--batch-size", "4"]
    assert main(["augment", str(src), "-o", str(tmp_path / "a.h5"), *args]) == 0
    assert main(["augment", str(src), "-o", str(tmp_path / "b.h5"), *args]) == 0
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b, h5py.File(src) as s:
        for name in ("flux", "ivar", "labels", "group"):
            np.testing.assert_array_equal(a[name][:], b[name][:])
        np.testing.assert_array_equal(a["labels"][:], s["labels"][:])
        np.testing.assert_array_equal(a["group"][:], s["group"][:])
        assert list(a["star_id"].asstr()[:]) == [f"s{i}" for i in range(10)]
        assert not np.array_equal(a["flux"][:], s["flux"][:])
        assert np.mean(a["ivar"][:] == 0) > 0.02
        assert "augment" in a.attrs and a.attrs["augment_seed"] == 5
    with open_dataset(tmp_path / "a.h5") as ds:
        assert len(ds) == 10


def test_augment_cli_bad_input(tmp_path, capsys):
    src = tmp_path / "syn.h5"
    _write_dataset(src, line_spectra(2), np.ones((2, P)))
    out = tmp_path / "out.h5"
    out.write_bytes(b"keep me")
    assert main(["augment", str(src), "-o", str(out), "--seed", "1"]) == 2
    assert out.read_bytes() == b"keep me"
    for bad in (["--snr", "abc"], ["--snr", "-3"], ["--rv-max", "-1"], ["--bad-pixel-frac", "3"]):
        assert main(["augment", str(src), "-o", str(tmp_path / "x.h5"), "--seed", "1", *bad]) == 2
    assert main(["augment", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "x.h5"), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err and "missing.h5" in err
    assert not (tmp_path / "x.h5").exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_plot_gap_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)
    syn = np.concatenate([line_spectra(1, depth=d) for d in rng.uniform(0.55, 0.65, 20)])
    real = np.concatenate([line_spectra(1, depth=d) for d in rng.uniform(0.25, 0.35, 12)]) + rng.normal(0, 0.002, (12, P))
    ivar_real = np.full_like(real, 2500.0)
    ivar_real[:, :50] = 0
    _write_dataset(tmp_path / "syn.h5", syn, np.full_like(syn, np.inf))
    _write_dataset(tmp_path / "real.h5", real, ivar_real, star_id=False)
    png = tmp_path / "gap.png"
    assert main(["plot-gap", str(tmp_path / "syn.h5"), str(tmp_path / "real.h5"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "balanced accuracy 1.000" in capsys.readouterr().out  # deep vs shallow lines: a total gap
    assert main(["plot-gap", str(tmp_path / "syn.h5"), str(tmp_path / "real.h5"), "--out", str(png)]) == 2
    assert main(["plot-gap", str(tmp_path / "syn.h5"), str(tmp_path / "nope.h5"), "--out", str(tmp_path / "b.png")]) == 2


def test_augment_never_writes_over_its_own_input(tmp_path, capsys):
    data = tmp_path / "in.h5"
    with DatasetWriter(data, WAVE, ["TEFF", "LOGG"]) as w:
        w.append(np.ones((3, P), np.float32), np.full((3, P), 100.0, np.float32), np.full((3, 2), 4500.0, np.float32),
                 np.arange(3))
    before = data.read_bytes()
    assert main(["-q", "augment", str(data), "-o", str(data), "--seed", "1", "--overwrite"]) == 2
    assert "is also an input of this command" in capsys.readouterr().err
    assert data.read_bytes() == before

