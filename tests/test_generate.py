"""Twin datasets: shared chemistry, determinism, streaming writes, and bad input."""

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from chemtwin.cli import main
from chemtwin.data.dataset import open_dataset
from chemtwin.data.generate import generate_dataset
from chemtwin.spectral_models.labels import CHEMICAL_LABELS, LABEL_NAMES, NON_CHEMICAL_LABELS


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "twins.h5"
    generate_dataset(path, n_groups=40, group_size=3, snr=100.0, seed=7, progress=False)
    return path


def test_twins_share_every_abundance_and_differ_in_teff_logg(twins):
    with open_dataset(twins) as ds:
        labels, group = ds.labels(), ds.group
        assert ds.label_names == list(LABEL_NAMES)
    assert labels.shape == (120, len(LABEL_NAMES))
    assert np.array_equal(np.bincount(group), np.full(40, 3))
    chem = labels[:, [LABEL_NAMES.index(n) for n in CHEMICAL_LABELS]]
    phys = labels[:, [LABEL_NAMES.index(n) for n in ("TEFF", "LOGG")]]
    for g in range(40):
        members = group == g
        assert np.all(chem[members] == chem[members][0])  # exactly equal
        assert np.all(np.ptp(phys[members], axis=0) > 0)
    # and different groups have different chemistry
    firsts = chem[::3]
    assert len(np.unique(firsts[:, 0])) == 40


def test_file_layout_and_noise(twins):
    with h5py.File(twins) as f:
        assert f["flux"].dtype == np.float32 and f["ivar"].dtype == np.float32
        assert f["wavelength"].dtype == np.float64 and f["group"].dtype == np.int64
        assert f["flux"].chunks[1] == 7214 and f["flux"].chunks[0] <= 64  # cheap row ranges
        assert f.attrs["snr"] == 100.0 and f.attrs["grid"] == "aspcap" and f.attrs["seed"] == 7
        assert "chemtwin_version" in f.attrs and f.attrs["generator"] == "chemtwin.lines"
        ivar = f["ivar"][:]
        assert np.all(ivar == np.float32(1e4))
    # noise of sigma 1/SNR: compare with the noiseless spectra of the same seed
    clean = twins.with_name("clean.h5")
    generate_dataset(clean, n_groups=40, group_size=3, snr=math.inf, seed=7, progress=False)
    with open_dataset(twins) as noisy, open_dataset(clean) as exact:
        resid = noisy.read().flux - exact.read().flux
        assert np.all(np.isinf(exact.read().ivar))
        assert np.array_equal(noisy.labels(), exact.labels())
    assert abs(resid.std() - 0.01) < 0.0005 and abs(resid.mean()) < 0.0005


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a, b, c = (tmp_path / f"{n}.h5" for n in "abc")
    generate_dataset(a, n_groups=5, snr=50.0, seed=3, progress=False)
    generate_dataset(b, n_groups=5, snr=50.0, seed=3, progress=False, threads=1)
    generate_dataset(c, n_groups=5, snr=50.0, seed=4, progress=False)
    with open_dataset(a) as da, open_dataset(b) as db, open_dataset(c) as dc:
        assert np.array_equal(da.read().flux, db.read().flux)
        assert not np.allclose(da.read().flux, dc.read().flux)


def test_chunks_stream_in_order_with_unique_groups(tmp_path, monkeypatch):
    import chemtwin.data.generate as gen

    monkeypatch.setattr(gen, "CHUNK_STARS", 8)  # force many chunks
    path = tmp_path / "chunks.h5"
    generate_dataset(path, n_groups=13, group_size=2, seed=1, progress=False)
    with open_dataset(path) as ds:
        assert np.array_equal(ds.group, np.repeat(np.arange(13), 2))
        batches = list(ds.iter_batches(batch_size=5))
        assert sum(len(b.flux) for b in batches) == 26 and batches[-1].start == 25


def test_cli_generate_info_and_plot(tmp_path, capsys):
    out = tmp_path / "cli.h5"
    assert main(["-q", "generate", "-o", str(out), "--n-groups", "3", "--group-size", "2", "--snr", "80",
                 "--teff", "4200", "4300", "--logg", "2", "2.2", "--seed", "1"]) == 0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stars       6" in text and "snr         80.0" in text
    with open_dataset(out) as ds:
        teff = ds.labels(["TEFF"])[:, 0]
    assert teff.min() >= 4200 and teff.max() <= 4300
    png = tmp_path / "p.png"
    assert main(["plot-spectra", str(out), "--index", "0", "--index", "1", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--snr", "0"], "--snr must be between"),
        (["--snr", "-5"], "--snr must be between"),
        (["--group-size", "0"], "argument --group-size: expected a positive integer below 2^31, got '0'"),
        (["--n-groups", "0"], "argument --n-groups: expected a positive integer below 2^31, got '0'"),
        (["--teff", "3000", "5000"], "TEFF range"),
        (["--logg", "2", "6"], "LOGG range"),
    ],
)
def test_generate_bad_input_one_line_exit_2(tmp_path, capsys, extra, message):
    out = tmp_path / "bad.h5"
    assert main(["generate", "-o", str(out), "--n-groups", "2", *extra]) == 2
    err = capsys.readouterr().err.strip()
    # one error line (argparse's own checks print the usage above it)
    errors = [line for line in err.splitlines() if not line.startswith(("usage:", " "))]
    assert len(errors) == 1 and message in errors[0], err
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_existing_or_unwritable_output(tmp_path, capsys):
    out = tmp_path / "x.h5"
    out.write_bytes(b"keep me")
    assert main(["generate", "-o", str(out), "--n-groups", "1"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["generate", "-o", str(tmp_path / "missing" / "x.h5"), "--n-groups", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_info_rejects_corrupt_and_foreign_files(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert main(["info", str(corrupt)]) == 2
    assert "not a readable HDF5 file" in capsys.readouterr().err
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(3)
    assert main(["info", str(foreign)]) == 2
    assert "not a chemtwin dataset (missing flux" in capsys.readouterr().err
    newer = generate_dataset(tmp_path / "newer.h5", n_groups=2, progress=False)
    with h5py.File(newer, "a") as f:  # a file from a future chemtwin: refused, not misread
        f.attrs["layout_version"] = 2
    assert main(["info", str(newer)]) == 2
    assert "layout version 2 is newer than this chemtwin reads (1)" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nope.h5")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_killed_writer_leaves_no_final_file(tmp_path, monkeypatch):
    import chemtwin.data.generate as gen

    calls = {"n": 0}
    real = gen.synthesize

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "CHUNK_STARS", 4)
    monkeypatch.setattr(gen, "synthesize", failing)
    with pytest.raises(RuntimeError):
        generate_dataset(tmp_path / "crash.h5", n_groups=6, progress=False)
    assert list(Path(tmp_path).iterdir()) == []


def test_non_chemical_labels_vary_per_star(twins):
    with open_dataset(twins) as ds:
        phys = ds.labels(list(NON_CHEMICAL_LABELS))
    # VMICRO/VMACRO follow the LOGG relations, so they differ between twins too
    assert len(np.unique(phys[:, 2])) > 100 and len(np.unique(phys[:, 3])) > 100
