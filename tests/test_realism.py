"""Line finding, the line census and fitting a spectrum with the synthesizer (issue 15's realism
measurement), and the calibrated line list's species."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chemtwin.errors import InputError
from chemtwin.evaluation.realism import find_lines, line_census, nearest_distance
from chemtwin.spectral_models.fit import fit_spectrum, shift_pixels
from chemtwin.spectral_models.labels import LABEL_NAMES, default_vmacro, default_vmicro
from chemtwin.spectral_models.linelist import UNIDENTIFIED, LineList, load_linelist
from chemtwin.spectral_models.lines import LineSynthesizer

CENTRES = np.array([100.3, 180.0, 260.7, 400.25])
DEPTHS = np.array([0.30, 0.08, 0.50, 0.03])


def gaussian_lines(n=600, centres=CENTRES, depths=DEPTHS, sigma=1.3):
    x = np.arange(n)[:, None]
    return 1.0 - (depths * np.exp(-0.5 * ((x - centres) / sigma) ** 2)).sum(axis=1)


def test_find_lines_recovers_positions_and_depths_and_skips_shallow_and_masked():
    flux = gaussian_lines()
    pos, depth = find_lines(flux, None, min_depth=0.05)
    # the 3 % line is below the threshold; the others within a tenth of a pixel (parabola on a Gaussian)
    np.testing.assert_allclose(pos, CENTRES[:3], atol=0.1)
    np.testing.assert_allclose(depth, DEPTHS[:3], atol=0.02)
    ivar = np.full(flux.size, 1e4)
    ivar[255:266] = 0  # the 50 % line masked: not a line of the data
    pos, _ = find_lines(flux, ivar, min_depth=0.05)
    np.testing.assert_allclose(pos, CENTRES[:2], atol=0.1)
    # at a pixel noise of 5 % (ivar 400) a line must stand out by 15 %: the 8 % line does not
    pos, _ = find_lines(flux, np.full(flux.size, 400.0), min_depth=0.05)
    np.testing.assert_allclose(pos, CENTRES[[0, 2]], atol=0.1)


def test_nearest_distance():
    np.testing.assert_allclose(nearest_distance(np.array([0.0, 5.2, 9.0]), np.array([5.0, 1.0])), [1.0, 0.2, 4.0])
    assert np.isinf(nearest_distance(np.array([1.0]), np.array([]))).all()


def test_line_census_counts_shared_missing_and_extra_lines():
    real = gaussian_lines()
    ivar = np.full(real.size, 1e4)
    same = line_census(real, ivar, real)
    assert same["rms"] == 0 and same["real_in_model"] == 1 and same["model_in_real"] == 1 and same["depth_scatter"] < 1e-12
    flat = line_census(real, ivar, np.ones(real.size))
    assert flat["real_in_model"] == 0 and np.isnan(flat["model_in_real"]) and flat["rms"] == pytest.approx(flat["rms_flat"])
    # the model lacks the 50 % line and has one the data lack; the 30 % line is modelled at 4 %, still "present"
    model = gaussian_lines(centres=np.array([100.3, 180.0, 330.0]), depths=np.array([0.04, 0.08, 0.2]))
    census = line_census(real, ivar, model)
    assert census["n_real_lines"] == 3 and census["real_in_model"] == pytest.approx(2 / 3)
    assert census["n_model_lines"] == 2 and census["model_in_real"] == pytest.approx(1 / 2)


def test_shift_pixels_moves_a_line_by_a_fraction_of_a_pixel():
    flux = torch.as_tensor(gaussian_lines(centres=np.array([50.0]), depths=np.array([0.5])))[None].repeat(2, 1)
    chips = (slice(0, 300), slice(300, 600))
    shifted = shift_pixels(flux, torch.tensor([0.5, -2.25], dtype=flux.dtype), chips).numpy()
    depth = 1 - shifted[:, :300]
    centroid = (depth * np.arange(300)).sum(1) / depth.sum(1)
    np.testing.assert_allclose(centroid, [50.5, 47.75], atol=0.02)


def labels(teff, logg, feh=0.0, **x_fe):
    out = np.zeros(len(LABEL_NAMES))
    c = LABEL_NAMES.index
    out[c("TEFF")], out[c("LOGG")], out[c("FE_H")] = teff, logg, feh
    out[c("VMICRO")], out[c("VMACRO")] = default_vmicro(logg), default_vmacro(logg)
    for name, value in x_fe.items():
        out[c(name)] = value
    return out


def test_fit_spectrum_recovers_labels_velocity_and_continuum_of_a_synthetic_star():
    synth = LineSynthesizer(grid="aspcap")
    truth = labels(4550, 2.1, -0.3, MG_FE=0.2)
    flux = synth.from_numpy(truth[None])[0].astype(float)
    # a 3 km/s Doppler shift and a continuum tilt of 2 % across each chip, as in a real spectrum
    shifted = shift_pixels(torch.as_tensor(flux)[None], torch.tensor([3.0 / synth.pixel_kms], dtype=torch.float64),
                           synth.grid.chip_slices)[0].numpy()
    tilt = np.concatenate([np.linspace(0.99, 1.01, s.stop - s.start) for s in synth.grid.chip_slices])
    observed = shifted * tilt + np.random.default_rng(1).normal(0, 0.005, flux.size)
    ivar = np.full(flux.size, 1 / 0.005**2)
    starts = np.stack([labels(4000, 1.5), labels(5000, 3.0)])
    fit = fit_spectrum(synth, observed, ivar, starts, free=("TEFF", "LOGG", "FE_H", "MG_FE", "VMACRO"), steps=250)
    assert abs(fit.label("TEFF") - 4550) < 60 and abs(fit.label("LOGG") - 2.1) < 0.25 and abs(fit.label("FE_H") + 0.3) < 0.06
    assert abs(fit.rv_kms - 3.0) < 0.3
    assert fit.rms < 0.0065  # noise 0.005 plus what is left of the fit


def test_fit_spectrum_bad_input():
    synth = LineSynthesizer(grid="aspcap")
    start = labels(4500, 2.0)[None]
    with pytest.raises(InputError, match="on the synthesizer's grid"):
        fit_spectrum(synth, np.ones(10), np.ones(10), start)
    with pytest.raises(InputError, match="too few"):
        fit_spectrum(synth, np.ones(synth.wavelength.size), np.zeros(synth.wavelength.size), start)
    with pytest.raises(InputError, match="unknown label"):
        fit_spectrum(synth, np.ones(synth.wavelength.size), np.ones(synth.wavelength.size), start, free=("TEFF", "ZN_FE"))


def test_line_lists_by_name_and_unidentified_lines_follow_iron():
    calibrated, drawn = load_linelist("calibrated"), load_linelist("drawn")
    assert len(calibrated) > 1000 and UNIDENTIFIED in set(calibrated.species) and UNIDENTIFIED not in set(drawn.species)
    assert set(calibrated.species) >= {"CO", "CN", "OH", "Fe", "Mg"}
    with pytest.raises(InputError, match="unknown line list"):
        load_linelist("turbospectrum")

    def one_line(species):
        return LineList(species=np.array([species]), ion=np.array([0]), wavelength=np.array([15500.0]), chi_exc=np.array([5.0]),
                        log_strength_ref=np.array([0.0]), damping=np.array([0.01]))

    x_line, fe_line = (LineSynthesizer(grid="aspcap", linelist=one_line(s), dtype=torch.float64) for s in (UNIDENTIFIED, "Fe"))
    stars = np.stack([labels(4000, 1.0, -1.0), labels(5200, 3.5, 0.4, MG_FE=0.5)])
    np.testing.assert_array_equal(x_line.from_numpy(stars), fe_line.from_numpy(stars))
    assert (x_line.from_numpy(stars[1:]) < x_line.from_numpy(labels(5200, 3.5, -0.6, MG_FE=0.5)[None])).any()
