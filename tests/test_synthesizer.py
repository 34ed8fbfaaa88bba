"""Physics of the embedded synthesizer: each test states a behaviour a real spectrum has.

Tests taking ``linelist`` run on both shipped line lists (docs/synthesizer.md).  Two stay on the
drawn list, each for a stated reason: the calibrated list has no Ti II line (the only Ti II window
lies in a detector gap, so the real fixtures show none), and its lines at the CO 3-0 bandhead are
CN lines of an N window (see test_co_bandhead...).  The molecular-band test runs on the
calibrated list (the default) only, for the reason given beside it."""

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

from chemtwin.core.grids import get_grid
from chemtwin.errors import InputError
from chemtwin.spectral_models.labels import LABEL_NAMES, X_FE_LABELS
from chemtwin.spectral_models.linelist import load_linelist, window_mask
from chemtwin.spectral_models.lines import LineSynthesizer

COL = LABEL_NAMES.index


LINELISTS = ("drawn", "calibrated")


@pytest.fixture(scope="module", params=LINELISTS)
def linelist(request):
    return request.param


@pytest.fixture(scope="module")
def synth(linelist):
    return LineSynthesizer(dtype=torch.float64, linelist=load_linelist(linelist))


def spectrum(synth, **labels):
    values = synth.reference_labels()
    for name, value in labels.items():
        values[COL(name)] = value
    with torch.no_grad():
        return synth(torch.as_tensor(values[None]))[0].numpy()


def lines_of(species, ion=0, linelist="drawn"):
    """Indices (into a shipped line list) of a species' lines on the apStar grid, strongest last."""
    ll = load_linelist(linelist)
    wave = get_grid("apstar").wavelength
    nearest = np.abs(wave[np.clip(np.searchsorted(wave, ll.wavelength), 0, wave.size - 1)] - ll.wavelength)
    on_chip = (nearest < 0.3) & (ll.wavelength > wave[0] + 2) & (ll.wavelength < wave[-1] - 2)
    sel = np.flatnonzero((ll.species == species) & (ll.ion == ion) & on_chip)
    return sel[np.argsort(ll.log_strength_ref[sel])]


@pytest.fixture(scope="module")
def solo(linelist):
    """A synthesizer per chosen line, with only that line in its list (no blends), on the full apStar
    grid (the only Ti II window, 15,875-15,881 A, falls in the gap the ASPCAP grid removes)."""
    cache = {}

    def make(index):
        if index not in cache:
            cache[index] = LineSynthesizer(grid="apstar", linelist=load_linelist(linelist).select(np.array([index])),
                                           dtype=torch.float64)
        return cache[index]

    return make


def line_ew(synth, **labels):
    """Equivalent width (A) of a single-line synthesizer's spectrum."""
    flux = spectrum(synth, **labels)
    return np.sum((1 - flux) * np.gradient(synth.wavelength))


def test_flux_is_normalized_and_finite(synth):
    flux = spectrum(synth)
    assert flux.shape == (7214,)
    assert np.all(np.isfinite(flux))
    assert flux.max() <= 1.0 + 1e-9 and flux.min() > 0.05
    # a giant's H-band spectrum has many lines: a good fraction of pixels deeper than 2%
    assert 0.2 < np.mean(flux < 0.98) < 0.95


def test_fe_lines_deepen_as_teff_falls(solo, linelist):
    fe = lines_of("Fe", linelist=linelist)[:: max(1, len(lines_of("Fe", linelist=linelist)) // 12)]
    ew = np.array([[line_ew(solo(i), TEFF=t) for i in fe] for t in (5500, 5000, 4500, 4000)])
    assert np.all(np.diff(ew, axis=0) > 0), "every Fe line deepens at every cooler step"


def test_co_bandhead_strengthens_with_cooler_teff_and_more_carbon():
    # drawn list only: on the calibrated one the 15,582-15,600 A pixels hold CN lines of an N window
    # (the two real fixtures cannot tell CO from CN there), and their depth peaks near 4,500 K
    synth = LineSynthesizer(dtype=torch.float64, linelist=load_linelist("drawn"))
    w = synth.wavelength
    head = (w > 15582) & (w < 15600)
    depth = lambda **kw: 1 - spectrum(synth, **kw)[head].mean()  # noqa: E731
    by_teff = [depth(TEFF=t) for t in (5500, 5000, 4500, 4000)]
    assert np.all(np.diff(by_teff) > 0)
    assert by_teff[-1] > 1.5 * by_teff[0]  # steep
    by_carbon = [depth(C_FE=c) for c in (-0.3, 0.0, 0.3)]
    assert np.all(np.diff(by_carbon) > 0)


# calibrated list only: the drawn list's CN lines, with drawn excitation energies, are nearly flat in
# TEFF (1.09x from 5,500 to 4,000 K); its CO is covered by the bandhead test above
@pytest.mark.parametrize("linelist", ["calibrated"], indirect=True)
def test_molecular_bands_follow_teff_and_carbon_nitrogen_oxygen(linelist):
    """Each molecule's lines alone: CO grows with C and O, CN with C and N and shrinks with O (which
    locks carbon into CO), OH grows with O and shrinks with C; all are far stronger at 4,000 K
    than at 5,500 K, OH at every cooler step (molecules dissociate in hotter atmospheres)."""
    lines = load_linelist(linelist)

    def band(species):
        synth = LineSynthesizer(dtype=torch.float64, linelist=lines.select(np.flatnonzero(lines.species == species)))
        return lambda **kw: float((1 - spectrum(synth, **kw)).sum())  # noqa: E731

    grows = {"CO": ("C_FE", "O_FE"), "CN": ("C_FE", "N_FE"), "OH": ("O_FE",)}
    shrinks = {"CO": (), "CN": ("O_FE",), "OH": ("C_FE",)}
    for species in ("CO", "CN", "OH"):
        depth = band(species)
        for name in grows[species]:
            assert depth(**{name: -0.3}) < depth(**{name: 0.0}) < depth(**{name: 0.3}), (species, name)
        for name in shrinks[species]:
            assert depth(**{name: -0.3}) > depth(**{name: 0.0}) > depth(**{name: 0.3}), (species, name)
        assert depth(TEFF=4000.0) > 1.2 * depth(TEFF=5500.0), species
    by_teff = [band("OH")(TEFF=t) for t in (5500.0, 5000.0, 4500.0, 4000.0)]
    assert np.all(np.diff(by_teff) > 0)


@pytest.mark.parametrize("linelist", ["drawn"], indirect=True)  # the calibrated list has no Ti II line
def test_ionized_line_weakens_with_logg_but_neutral_iron_barely_changes(solo):
    ti2, fe = lines_of("Ti", ion=1), lines_of("Fe")
    ion_change = [line_ew(solo(i), LOGG=3.5) / line_ew(solo(i), LOGG=1.0) for i in ti2]
    fe_change = [line_ew(solo(i), LOGG=3.5) / line_ew(solo(i), LOGG=1.0) for i in fe[:: len(fe) // 8]]
    assert max(ion_change) < 0.7
    assert abs(np.median(fe_change) - 1) < 0.3 * (1 - np.median(ion_change))


def test_saturation_weak_lines_linear_strong_lines_flat(solo, linelist):
    """Doubling the abundance ([Mg/Fe] + log 2) doubles a weak line's EW; a strong line grows far less."""
    mg = lines_of("Mg", linelist=linelist)
    weak, strong = solo(mg[0]), solo(mg[-1])
    grow = lambda s: line_ew(s, MG_FE=np.log10(2.0)) / line_ew(s)  # noqa: E731
    assert 1.85 < grow(weak) < 2.02
    assert grow(strong) < 1.35


def test_microturbulence_desaturates_strong_lines(solo, linelist):
    strong = solo(lines_of("Fe", linelist=linelist)[-1])
    assert line_ew(strong, VMICRO=2.5) > 1.15 * line_ew(strong, VMICRO=0.8)


ELEMENT_WINDOWS = {
    "C_FE": ("C", "CI", "N", "O"), "N_FE": ("C", "CI", "N", "O"), "O_FE": ("C", "CI", "N", "O"),
    "TI_FE": ("Ti", "TiII"),
}


@pytest.mark.parametrize("teff,logg", [(4700.0, 2.4), (4000.0, 1.0), (5500.0, 3.5)])
def test_abundance_response_sits_in_the_element_windows(synth, teff, logg):
    """d flux / d X_FE (autograd) puts >= 80% of its absolute mass inside the element's windows.

    Windows are widened by 2 pixels per side: many ASPCAP windows are 1-3 pixels wide, narrower than
    APOGEE's ~3-pixel resolution element, which spreads any line over its neighbours.  C, N and O are
    one group: CO formation ties the free C and O (and so CN and OH) to all three abundances.
    """
    labels = torch.as_tensor(synth.reference_labels()[None], dtype=torch.float64)
    labels[0, COL("TEFF")], labels[0, COL("LOGG")] = teff, logg
    columns = [COL(n) for n in X_FE_LABELS]
    jac = _jacobian_columns(synth, labels, columns)
    for k, name in enumerate(X_FE_LABELS):
        element = name.split("_")[0].capitalize()
        windows = ELEMENT_WINDOWS.get(name, (element,))
        inside = binary_dilation(window_mask(synth.wavelength, windows), iterations=2)
        mass = np.abs(jac[:, k])
        assert mass.sum() > 0, name
        assert mass[inside].sum() / mass.sum() >= 0.8, name


def _jacobian_columns(synth, labels, columns):
    """Columns d flux / d labels[k] by autograd: the Jacobian-vector product as the gradient of a
    vector-Jacobian product with respect to its (dummy) cotangent, so one backward pass per column."""
    x = labels.clone().requires_grad_(True)
    flux = synth(x)
    cotangent = torch.zeros_like(flux, requires_grad=True)
    (vjp,) = torch.autograd.grad(flux, x, grad_outputs=cotangent, create_graph=True)
    out = [torch.autograd.grad(vjp[0, k], cotangent, retain_graph=True)[0][0] for k in columns]
    return torch.stack(out, dim=1).numpy()


def test_response_to_metallicity_depends_on_teff(synth):
    """Not separable: d flux / d FE_H at 4,000 K is not a rescaled copy of that at 5,500 K."""
    def grad_feh(teff):
        labels = torch.as_tensor(synth.reference_labels()[None], dtype=torch.float64)
        labels[0, COL("TEFF")] = teff
        return _jacobian_columns(synth, labels, [COL("FE_H")])[:, 0]

    cool, hot = grad_feh(4000.0), grad_feh(5500.0)
    corr = np.corrcoef(cool, hot)[0, 1]
    scale = np.dot(cool, hot) / np.dot(hot, hot)
    residual = np.linalg.norm(cool - scale * hot) / np.linalg.norm(cool)
    assert corr < 0.95 and residual > 0.3


def test_gradients_are_finite_for_every_label(synth):
    labels = torch.as_tensor(synth.reference_labels()[None], dtype=torch.float64).requires_grad_(True)
    synth(labels).sum().backward()
    assert torch.all(torch.isfinite(labels.grad))
    assert torch.all(labels.grad[0, [COL("TEFF"), COL("LOGG"), COL("VMICRO"), COL("FE_H")]] != 0)


def test_float32_matches_float64():
    s32, s64 = LineSynthesizer(), LineSynthesizer(dtype=torch.float64)
    labels = s64.reference_labels()[None]
    diff = np.abs(s32.from_numpy(labels) - s64.from_numpy(labels))
    assert diff.max() < 2e-4


def test_labels_outside_valid_range_are_an_error():
    synth = LineSynthesizer()
    labels = synth.reference_labels()[None].copy()
    labels[0, COL("TEFF")] = 8000.0
    with pytest.raises(InputError, match="TEFF"):
        synth.from_numpy(labels)
    labels[0, COL("TEFF")] = np.nan
    with pytest.raises(InputError, match="TEFF"):
        synth.from_numpy(labels)
    with pytest.raises(InputError, match="expected 21 labels"):
        synth.from_numpy(np.zeros((1, 5)))


def test_apstar_grid_matches_aspcap_on_common_pixels():
    from chemtwin.core.grids import convert

    labels = LineSynthesizer().reference_labels()[None]
    full = LineSynthesizer(grid="apstar").from_numpy(labels)
    gapless = LineSynthesizer(grid="aspcap").from_numpy(labels)
    assert np.abs(convert(full, "apstar", "aspcap") - gapless).max() < 1e-5
