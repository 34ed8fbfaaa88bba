"""The Payne: both .npz weight formats, the fitter, the trainer and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chemtwin.cli import main
from chemtwin.data.dataset import open_dataset
from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.errors import InputError
from chemtwin.spectral_models.payne import (
    MLP_ARRAYS,
    PER_PIXEL_ARRAYS,
    PayneEmulator,
    emulator_population,
    is_chemical_label,
)
from chemtwin.tagging.payne_fit import PayneFitter, fit_dataset

NAMES = ["TEFF", "LOGG", "FE_H", "MG_FE", "C_FE"]
X_MIN = np.array([3800.0, 0.5, -1.0, -0.3, -0.3])
X_MAX = np.array([5500.0, 3.8, 0.4, 0.5, 0.5])
TOLERANCE = np.array([10.0, 0.02, 0.01, 0.01, 0.01])  # K, dex, dex ...


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one torch thread is faster (and immune to a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def wavelength(p):
    return np.exp(np.linspace(np.log(15100.0), np.log(15200.0), p))


def smooth(rng, shape, width=2.0):
    """Random weights correlated along the pixel axis (0): spectral features a few pixels wide."""
    x = rng.normal(size=(shape[0] + 16,) + shape[1:])
    kernel = np.exp(-0.5 * (np.arange(-8, 9) / width) ** 2)
    out = sum(kernel[k] * x[k : k + shape[0]] for k in range(17))
    return out / np.sqrt((kernel**2).sum())


def mlp_arrays(seed=0, p=120, h=64, n_labels=5):
    rng = np.random.default_rng(seed)
    return {
        "w_array_0": rng.normal(0, 1.5, (h, n_labels)),
        "b_array_0": rng.normal(0, 0.3, h),
        "w_array_1": rng.normal(0, 1 / np.sqrt(h), (h, h)),
        "b_array_1": rng.normal(0, 0.1, h),
        "w_array_2": 0.05 * smooth(rng, (p, h)) / np.sqrt(h),
        "b_array_2": 1.0 - 0.02 * np.abs(rng.normal(size=p)),
        "x_min": X_MIN[:n_labels].copy(),
        "x_max": X_MAX[:n_labels].copy(),
    }


def per_pixel_arrays(seed=0, p=120, h=6, n_labels=5):
    rng = np.random.default_rng(seed)
    return {
        "w_array_0": smooth(rng, (p, h, n_labels)) * 1.5,
        "b_array_0": rng.normal(0, 0.5, (p, h)),
        "w_array_1": 0.05 * smooth(rng, (p, h)),
        "b_array_1": 1.0 - 0.02 * np.abs(rng.normal(size=p)),
        "x_min": X_MIN[:n_labels].copy(),
        "x_max": X_MAX[:n_labels].copy(),
    }


# NumPy references, written from the format description (docs/science.md section 4)
def numpy_scaled(arrays, labels):
    return (labels - arrays["x_min"]) / (arrays["x_max"] - arrays["x_min"]) - 0.5


def numpy_mlp(arrays, labels):
    def leaky(z):
        return np.where(z > 0, z, 0.01 * z)

    s = numpy_scaled(arrays, labels)
    out = []
    for row in np.atleast_2d(s):
        h1 = leaky(arrays["w_array_0"] @ row + arrays["b_array_0"])
        h2 = leaky(arrays["w_array_1"] @ h1 + arrays["b_array_1"])
        out.append(arrays["w_array_2"] @ h2 + arrays["b_array_2"])
    return np.array(out)


def numpy_per_pixel(arrays, labels):
    s = numpy_scaled(arrays, labels)
    out = []
    for row in np.atleast_2d(s):
        flux = np.empty(arrays["b_array_1"].shape[0])
        for p in range(flux.size):
            inside = arrays["w_array_0"][p] @ row + arrays["b_array_0"][p]
            flux[p] = arrays["w_array_1"][p] @ (1 / (1 + np.exp(-inside))) + arrays["b_array_1"][p]
        out.append(flux)
    return np.array(out)


def random_labels(n, seed=1, margin=0.03):
    rng = np.random.default_rng(seed)
    return X_MIN + (X_MAX - X_MIN) * rng.uniform(margin, 1 - margin, (n, len(NAMES)))


FORMATS = {"mlp": (mlp_arrays, numpy_mlp), "per_pixel": (per_pixel_arrays, numpy_per_pixel)}


# ---------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_numpy_formula(fmt):
    make, reference = FORMATS[fmt]
    arrays = make()
    labels = random_labels(7)
    emu = PayneEmulator.from_arrays(arrays, NAMES, dtype=torch.float64)
    assert emu.format == fmt
    np.testing.assert_allclose(emu.predict(labels), reference(arrays, labels), rtol=0, atol=1e-12)
    emu32 = PayneEmulator.from_arrays(arrays, NAMES)
    np.testing.assert_allclose(emu32.predict(labels), reference(arrays, labels), rtol=0, atol=2e-5)
    # torch forward with extra batch dimensions
    flux = emu(torch.from_numpy(labels.reshape(7, 1, -1)))
    assert flux.shape == (7, 1, emu.n_pixels)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(fmt, tmp_path):
    arrays = FORMATS[fmt][0]()
    emu = PayneEmulator.from_arrays(arrays, NAMES, wavelength=wavelength(120))
    path = emu.save(tmp_path / "emu.npz")
    assert not list(tmp_path.glob(".*tmp*"))
    again = PayneEmulator.load(path)
    assert again.format == fmt and again.label_names == NAMES
    np.testing.assert_array_equal(again.wavelength, emu.wavelength)
    labels = random_labels(20)
    np.testing.assert_array_equal(again.predict(labels), emu.predict(labels))
    with np.load(path, allow_pickle=False) as data:  # the public layout plus names
        expected = MLP_ARRAYS if fmt == "mlp" else PER_PIXEL_ARRAYS
        assert set(data.files) == set(expected) | {"label_names", "wavelength"}
        assert data["label_names"].dtype.kind == "U"
    with pytest.raises(InputError, match="exists"):
        emu.save(path)
    emu.save(path, overwrite=True)


def test_public_file_without_names(tmp_path):
    arrays = mlp_arrays()
    np.savez(tmp_path / "public.npz", **arrays)
    with pytest.raises(InputError, match="label names missing"):
        PayneEmulator.load(tmp_path / "public.npz")
    emu = PayneEmulator.load(tmp_path / "public.npz", label_names="TEFF,LOGG,FE_H,MG_FE,C_FE")
    assert emu.label_names == NAMES and emu.wavelength is None
    with pytest.raises(InputError, match="4 label names"):
        PayneEmulator.load(tmp_path / "public.npz", label_names=NAMES[:4])
    emu.save(tmp_path / "named.npz")
    with pytest.raises(InputError, match="differ"):
        PayneEmulator.load(tmp_path / "named.npz", label_names=NAMES[::-1])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["w_array_0", "b_array_0", "w_array_1", "b_array_1", "x_min", "x_max", "w_array_2", "b_array_2"])
def test_missing_and_misshapen_arrays(fmt, name, tmp_path):
    arrays = FORMATS[fmt][0]()
    if name not in arrays:
        return
    missing = {k: v for k, v in arrays.items() if k != name}
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(InputError, match=f"missing array {name}"):
        PayneEmulator.load(tmp_path / "missing.npz", label_names=NAMES)
    bad = dict(arrays)  # one row too many: the message names it (or the array it disagrees with names it)
    bad[name] = np.concatenate([arrays[name], arrays[name][:1]], axis=0)
    with pytest.raises(InputError, match=name):
        PayneEmulator.from_arrays(bad, NAMES)
    bad[name] = arrays[name][..., None]  # one dimension too many
    with pytest.raises(InputError, match=name):
        PayneEmulator.from_arrays(bad, NAMES)


def test_other_bad_files(tmp_path):
    arrays = mlp_arrays()
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(InputError, match="not a readable"):
        PayneEmulator.load(tmp_path / "text.npz", label_names=NAMES)
    with pytest.raises(InputError, match="no such file"):
        PayneEmulator.load(tmp_path / "absent.npz", label_names=NAMES)
    np.savez(tmp_path / "pickled.npz", **arrays, label_names=np.array([object()], dtype=object))
    with pytest.raises(InputError, match="pickle"):
        PayneEmulator.load(tmp_path / "pickled.npz")
    nan = dict(arrays, b_array_1=np.full(64, np.nan))
    with pytest.raises(InputError, match="b_array_1"):
        PayneEmulator.from_arrays(nan, NAMES)
    flat = dict(arrays, x_max=arrays["x_min"].copy())
    with pytest.raises(InputError, match="x_max"):
        PayneEmulator.from_arrays(flat, NAMES)
    with pytest.raises(InputError, match="wavelength"):
        PayneEmulator.from_arrays(arrays, NAMES, wavelength=wavelength(50))
    with pytest.raises(InputError, match="appears twice"):
        PayneEmulator.from_arrays(arrays, ["TEFF"] * 5)


def test_labels_outside_box():
    emu = PayneEmulator.from_arrays(mlp_arrays(), NAMES)
    labels = random_labels(3)
    labels[2, 1] = 4.5
    with pytest.raises(InputError, match=r"LOGG=4.5 \(row 2\) is outside the emulator's box \[0.5, 3.8\]"):
        emu.predict(labels)
    with pytest.raises(InputError, match="LOGG"):
        emu(torch.from_numpy(labels))
    assert np.isfinite(emu.predict(labels, allow_extrapolation=True)).all()
    labels[0, 0] = np.nan
    with pytest.raises(InputError, match="TEFF"):
        emu.predict(labels, allow_extrapolation=True)
    with pytest.raises(InputError, match="shape"):
        emu.predict(np.zeros((3, 4)))
    emu.predict(X_MIN)  # the box edges themselves are inside
    emu.predict(X_MAX.astype(np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_differentiable(fmt):
    emu = PayneEmulator.from_arrays(FORMATS[fmt][0](), NAMES, dtype=torch.float64)
    labels = torch.from_numpy(random_labels(3)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: emu(x), (labels,), eps=1e-6, atol=1e-5)
    jac = emu.jacobian(random_labels(2))
    assert jac.shape == (2, emu.n_pixels, 5)


def test_chemical_labels():
    assert [n for n in NAMES + ["VMICRO", "vmacro", "RV", "Vturb"] if is_chemical_label(n)] == ["FE_H", "MG_FE", "C_FE"]


# ---------------------------------------------------------------------- fitting
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rv", [False, True])
def test_fit_recovers_noiseless_labels(fmt, rv):
    emu = PayneEmulator.from_arrays(FORMATS[fmt][0](p=300), NAMES, wavelength=wavelength(300))
    truth = random_labels(24, seed=3)
    flux = emu.predict(truth)
    fitter = PayneFitter(emu, rv=rv, n_starts=4, n_candidates=1024, rv_max=60.0)
    velocity = None
    if rv:  # observed spectra at known velocities, built with the fitter's own shift
        velocity = np.random.default_rng(4).uniform(-40, 40, truth.shape[0])
        with torch.no_grad():
            flux = fitter.model.shift(torch.from_numpy(flux).double(), torch.from_numpy(velocity)).numpy()
    ivar = np.full_like(flux, np.inf)  # noiseless
    result = fitter.fit(flux, ivar)
    error = np.abs(result.labels - truth)
    assert (error <= TOLERANCE).all(), error.max(0)
    assert result.converged.all()
    assert result.chi2.max() < 1e-8
    assert result.covariance.shape == (24, 5 + rv, 5 + rv)
    assert result.param_names == NAMES + (["RV"] if rv else [])
    if rv:
        assert np.abs(result.rv - velocity).max() < 0.05


def test_fit_noisy_uncertainties_and_masks():
    emu = PayneEmulator.from_arrays(mlp_arrays(p=400), NAMES, wavelength=wavelength(400))
    rng = np.random.default_rng(5)
    truth = random_labels(60, seed=6, margin=0.15)
    clean = emu.predict(truth)
    sigma = 0.002
    flux = clean + rng.normal(0, sigma, clean.shape)
    ivar = np.full_like(flux, 1 / sigma**2)
    # masked pixels: garbage or NaN flux with ivar 0
    flux[:, 10:30] = 5.0
    ivar[:, 10:30] = 0.0
    flux[:, 40] = np.nan
    ivar[:, 40] = 0.0
    result = PayneFitter(emu).fit(flux, ivar)
    assert (result.n_pixels == 400 - 21).all()
    pulls = (result.labels - truth) / result.labels_err
    assert 0.6 < np.std(pulls) < 1.5
    assert 0.7 < np.median(result.reduced_chi2) < 1.3
    # the exact-Hessian path finds the same minimum
    exact = PayneFitter(emu, hessian="exact").fit(flux, ivar)
    assert (np.abs(exact.labels - result.labels) < 1e-3 * (X_MAX - X_MIN)).all()


def test_fit_threads_and_batches_agree():
    emu = PayneEmulator.from_arrays(mlp_arrays(p=200), NAMES, wavelength=wavelength(200))
    truth = random_labels(40, seed=8)
    flux = emu.predict(truth)
    serial = PayneFitter(emu, hessian="exact").fit(flux)
    threaded = PayneFitter(emu, hessian="exact", threads=2, batch_size=7).fit(flux)
    assert (np.abs(threaded.labels - serial.labels) < 1e-4 * (X_MAX - X_MIN)).all()
    assert (np.abs(serial.labels - truth) <= TOLERANCE).all()


def test_shared_fisher_is_exact():
    """Stars sharing their pixel weights up to a factor get J^T W J from the shared matrix: it must
    equal the full-Jacobian one (and stars with other weights still get the full one)."""
    emu = PayneEmulator.from_arrays(mlp_arrays(p=150), NAMES, wavelength=wavelength(150))
    fitter = PayneFitter(emu)
    theta = torch.from_numpy(np.random.default_rng(3).uniform(-0.45, 0.45, (6, len(NAMES))))
    w = torch.full((6, 150), 4.0)
    w[:, 20:30] = 0.0  # one mask for all
    w[1] *= 9.0  # another SNR
    w[5, 100:] = 0.5  # a star with its own weights: the general path
    fisher = fitter.model.fisher(theta, w)
    jac = fitter.model.jacobian(theta).double()
    exact = torch.einsum("rpi,rp,rpj->rij", jac, w.double(), jac)
    assert torch.allclose(fisher, exact, rtol=1e-4, atol=1e-6 * float(exact.abs().max()))


def test_suspects_and_restarts():
    emu = PayneEmulator.from_arrays(mlp_arrays(p=200), NAMES, wavelength=wavelength(200))
    fitter = PayneFitter(emu)
    n = 8
    result = PayneFitter(emu).fit(np.ones((n, 200)) * 0.99)  # any result of the right shape
    result.n_pixels[:] = 200 + len(NAMES)  # dof = 200
    unweighted = np.array([True] * 4 + [False] * 4)
    # unit weights: float32 noise (1e-15 per pixel) is no failure, 1e-6 is; ivar weights: 10x the median
    result.chi2[:] = 200 * np.array([1e-16, 1e-15, 3e-16, 1e-6, 0.9, 1.0, 1.1, 15.0])
    assert fitter._suspects(result, unweighted).tolist() == [3, 7]
    # restarts only replace a star's fit by a better one
    rng = np.random.default_rng(12)
    truth = random_labels(40, seed=13, margin=0.1)
    flux = emu.predict(truth) + rng.normal(0, 0.002, (40, 200))
    ivar = np.full_like(flux, 0.002**-2)
    once = PayneFitter(emu, n_retries=0, n_starts=1).fit(flux, ivar)
    again = PayneFitter(emu, n_starts=1).fit(flux, ivar)
    assert np.all(again.chi2 <= once.chi2 * (1 + 1e-9))


def test_fit_bad_input():
    emu = PayneEmulator.from_arrays(mlp_arrays(), NAMES)
    fitter = PayneFitter(emu)
    with pytest.raises(InputError, match="shape"):
        fitter.fit(np.ones((3, 50)))
    with pytest.raises(InputError, match="ivar"):
        fitter.fit(np.ones((3, 120)), np.ones((2, 120)))
    with pytest.raises(InputError, match="wavelength"):
        PayneFitter(emu, rv=True)
    ivar = np.ones((3, 120))
    ivar[2, 7] = np.nan
    with pytest.raises(InputError, match=r"row 12, pixel 7 has NaN or negative ivar \(nan\)"):
        fitter.fit(np.ones((3, 120)), ivar, row_offset=10)
    flux = np.ones((3, 120))
    flux[1, 5] = np.inf
    with pytest.raises(InputError, match=r"row 1, pixel 5 has NaN/inf flux \(inf\) where ivar > 0"):
        fitter.fit(flux, np.ones((3, 120)))
    result = fitter.fit(np.ones((2, 120)), np.zeros((2, 120)))  # fully masked stars: NaN, not converged
    assert np.isnan(result.labels).all() and not result.converged.any()


# ---------------------------------------------------------------------- datasets, training, CLI
def write_dataset(path, emu, n, seed=0, noiseless=True):
    labels = random_labels(n, seed=seed, margin=0.0)[:, : emu.n_labels]
    flux = emu.predict(labels)
    ivar = np.full_like(flux, np.inf if noiseless else 1e6)
    with DatasetWriter(path, emu.wavelength, emu.label_names, attrs={"snr": np.inf}) as w:
        w.append(flux, ivar, labels, np.arange(n))
    return labels


def test_train_reproduces_emulator(tmp_path):
    from chemtwin.tagging.payne_train import train_emulator

    teacher = PayneEmulator.from_arrays(per_pixel_arrays(p=60, n_labels=3), NAMES[:3], wavelength=wavelength(60))
    write_dataset(tmp_path / "train.h5", teacher, 1500)
    emu, report = train_emulator(tmp_path / "train.h5", hidden=32, epochs=40, lr=3e-3, seed=0, progress=False)
    assert emu.format == "mlp" and emu.label_names == NAMES[:3] and report.loss == "mse"
    spread = np.median(np.abs(teacher.predict(random_labels(200)[:, :3]) - teacher.b_array_1.numpy()))
    assert report.val_median_abs_error < 0.15 * spread, (report.val_median_abs_error, spread)
    # deterministic
    again, report2 = train_emulator(tmp_path / "train.h5", hidden=32, epochs=2, seed=0, progress=False)
    third, report3 = train_emulator(tmp_path / "train.h5", hidden=32, epochs=2, seed=0, progress=False)
    assert report2.val_loss == report3.val_loss
    with pytest.raises(InputError, match="unknown label"):
        train_emulator(tmp_path / "train.h5", labels=["TEFF", "NI_FE"], epochs=1, progress=False)


def test_cli_train_and_fit(tmp_path, capsys):
    teacher = PayneEmulator.from_arrays(mlp_arrays(p=80), NAMES, wavelength=wavelength(80))
    truth = write_dataset(tmp_path / "d.h5", teacher, 300)
    emu_path = tmp_path / "emu.npz"
    assert main(["-q", "payne", "train", str(tmp_path / "d.h5"), "--out", str(emu_path), "--hidden", "16",
                 "--epochs", "2", "--json", str(tmp_path / "train.json")]) == 0
    assert PayneEmulator.load(emu_path).format == "mlp"
    teacher.save(tmp_path / "teacher.npz")
    out = tmp_path / "labels.h5"
    assert main(["-q", "payne", "fit", str(tmp_path / "teacher.npz"), str(tmp_path / "d.h5"), "--out", str(out)]) == 0
    import h5py

    with h5py.File(out, "r") as f:
        labels = f["labels"][:]
        assert list(f["labels"].attrs["names"]) == NAMES
        assert f["labels_err"].shape == labels.shape and f["covariance"].shape == (300, 5, 5)
        assert f["chi2"].shape == (300,) and f["group"].shape == (300,)
    assert (np.abs(labels - truth) <= TOLERANCE).mean() > 0.97
    assert main(["-q", "payne", "fit", str(tmp_path / "teacher.npz"), str(tmp_path / "d.h5"), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_cli_bad_input(tmp_path, capsys):
    teacher = PayneEmulator.from_arrays(mlp_arrays(), NAMES, wavelength=wavelength(120))
    write_dataset(tmp_path / "d.h5", teacher, 10)
    arrays = mlp_arrays()
    np.savez(tmp_path / "public.npz", **arrays)
    np.savez(tmp_path / "broken.npz", **{k: v for k, v in arrays.items() if k != "b_array_2"})
    np.savez(tmp_path / "shape.npz", **dict(arrays, w_array_1=arrays["w_array_1"][:3]))
    np.savez(tmp_path / "small.npz", **mlp_arrays(p=50))
    cases = [
        (["payne", "fit", str(tmp_path / "public.npz"), str(tmp_path / "d.h5")], "label names missing"),
        (["payne", "fit", str(tmp_path / "broken.npz"), str(tmp_path / "d.h5"), "--label-names", *NAMES], "b_array_2"),
        (["payne", "fit", str(tmp_path / "shape.npz"), str(tmp_path / "d.h5"), "--label-names", *NAMES], "w_array_1"),
        (["payne", "fit", str(tmp_path / "small.npz"), str(tmp_path / "d.h5"), "--label-names", *NAMES], "pixels"),
        (["payne", "fit", str(tmp_path / "public.npz"), str(tmp_path / "nope.h5"), "--label-names", *NAMES], "no such file"),
        (["payne", "train", str(tmp_path / "d.h5"), "--labels", "TEFF", "XX_FE"], "XX_FE"),
    ]
    for argv, message in cases:
        out = tmp_path / "out.x"
        code = main(["-q"] + argv + ["--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2, argv
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists() and not list(tmp_path.glob(".out.x*"))


def test_fit_dataset_rows(tmp_path):
    emu = PayneEmulator.from_arrays(mlp_arrays(), NAMES, wavelength=wavelength(120))
    write_dataset(tmp_path / "d.h5", emu, 20)
    path, result, seconds = fit_dataset(emu, tmp_path / "d.h5", tmp_path / "l.h5", rows=slice(5, 12), progress=False)
    assert result.labels.shape == (7, 5) and seconds > 0
    with open_dataset(tmp_path / "d.h5") as ds:
        truth = ds.labels()[5:12]
    assert (np.abs(result.labels - truth) <= TOLERANCE).mean() > 0.9


# ---------------------------------------------------------------------- emulators as generators
def test_emulator_population():
    emu = PayneEmulator.from_arrays(per_pixel_arrays(), NAMES)
    labels, group = emulator_population(emu, [2, 3, 1], 7, ranges={"TEFF": (4000, 4500)})
    assert labels.shape == (6, 5) and group.tolist() == [0, 0, 1, 1, 1, 2]
    for g in range(3):
        rows = labels[group == g]
        assert np.ptp(rows[:, 2:], axis=0).max() == 0  # chemistry shared
        if len(rows) > 1:
            assert np.ptp(rows[:, :2], axis=0).min() > 0  # TEFF, LOGG per star
    assert labels[:, 0].min() >= 4000 and labels[:, 0].max() <= 4500
    assert (labels >= X_MIN).all() and (labels <= X_MAX).all()
    again, _ = emulator_population(emu, [2, 3, 1], 7, ranges={"TEFF": (4000, 4500)})
    np.testing.assert_array_equal(again, labels)
    labels, group = emulator_population(emu, [4], 0, chemical_labels=["FE_H"])
    assert np.ptp(labels[:, 2]) == 0 and np.ptp(labels[:, 3]) > 0
    with pytest.raises(InputError, match="outside the emulator's box"):
        emulator_population(emu, [2], 0, ranges={"LOGG": (0.0, 3.0)})
    with pytest.raises(InputError, match="not one of the emulator's labels"):
        emulator_population(emu, [2], 0, chemical_labels=["NI_FE"])


def test_generate_with_emulator(tmp_path, capsys):
    emu = PayneEmulator.from_arrays(per_pixel_arrays(p=60), NAMES, wavelength=wavelength(60))
    emu.save(tmp_path / "emu.npz")
    out = tmp_path / "twins.h5"
    argv = ["-q", "generate", "-o", str(out), "--emulator", str(tmp_path / "emu.npz"), "--n-groups", "30",
            "--group-size", "3", "--snr", "100", "--label-range", "TEFF", "4000", "4800", "--seed", "3"]
    assert main(argv) == 0
    with open_dataset(out) as ds:
        assert ds.n_stars == 90 and ds.label_names == NAMES and ds.attrs["generator"] == "payne-emulator"
        labels, group, batch = ds.labels(), ds.group, ds.read()
    assert labels[:, 0].min() >= 4000 and labels[:, 0].max() <= 4800
    assert all(np.ptp(labels[group == g][:, 2:], axis=0).max() == 0 for g in range(30))
    assert np.allclose(batch.ivar, 100**2)
    noise = batch.flux - emu.predict(labels.astype(np.float64))
    assert 0.008 < noise.std() < 0.012
    assert main(argv + ["--overwrite", "--chemical-labels", "FE_H", "MG_FE"]) == 0  # same seed: same labels
    with open_dataset(out) as ds:
        assert np.ptp(ds.labels()[ds.group == 0][:, 4]) > 0  # C_FE now drawn per star
    np.savez(tmp_path / "public.npz", **per_pixel_arrays(p=60))
    cases = [
        (["--emulator", str(tmp_path / "emu.npz"), "--label-range", "LOGG", "0", "2"], "outside the emulator's box"),
        (["--emulator", str(tmp_path / "public.npz")], "label names missing"),
        (["--emulator", str(tmp_path / "public.npz"), "--label-names", *NAMES], "wavelength"),
        (["--emulator", str(tmp_path / "emu.npz"), "--label-range", "NI_FE", "0", "1"], "NI_FE"),
        (["--emulator", str(tmp_path / "emu.npz"), "--teff", "4000", "4200"], "--label-range TEFF"),
    ]
    for extra, message in cases:
        bad = tmp_path / "bad.h5"
        assert main(["-q", "generate", "-o", str(bad), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not bad.exists()


def test_emulated_twins_train_and_evaluate_end_to_end(tmp_path):
    """A twin file generated by a small per-pixel emulator goes through train -> evaluate."""
    import json

    emu = PayneEmulator.from_arrays(per_pixel_arrays(p=100), NAMES, wavelength=wavelength(100))
    emu.save(tmp_path / "emu.npz")
    for name, seed, groups in (("train", 1, 150), ("val", 2, 50)):
        assert main(["-q", "generate", "-o", str(tmp_path / f"{name}.h5"), "--emulator", str(tmp_path / "emu.npz"),
                     "--n-groups", str(groups), "--snr", "200", "--seed", str(seed)]) == 0
    model = tmp_path / "model"
    assert main(["-q", "train", str(tmp_path / "train.h5"), "--out", str(model), "--epochs", "2",
                 "--val-data", str(tmp_path / "val.h5"), "--threads", "1"]) == 0
    result = tmp_path / "result.json"
    assert main(["-q", "evaluate", str(model), str(tmp_path / "val.h5"), "--json", str(result)]) == 0
    res = json.loads(result.read_text())
    assert res["n_stars"] == 100 and 0 <= res["frac_rank0"] <= res["frac_rank_lt_1pct"] <= 1
    assert np.isfinite(res["mse_reconstruction"])
