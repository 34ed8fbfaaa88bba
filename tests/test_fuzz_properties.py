"""Property-based slice of the fuzz campaign (benchmarks/fuzz_campaign.py), fast enough for CI.

Every property states the error boundary of issue 19 for tiny inputs (8-40 stars, 40 pixels):
bad input gives ``InputError`` from a reader and, from the CLI, one line and exit code 2 with
nothing written; masked input (ivar = 0) is accepted and gives finite outputs; nothing else
escapes (no other exception, no hang, no NaN).  Hypothesis draws the corruptions with a small,
derandomized budget and without shrinking (a failing example is reported as drawn), so that
the file runs in well under a minute.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import tempfile
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from chemtwin.cli import main
from chemtwin.core.files import file_sha256
from chemtwin.data.dataset import open_dataset
from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.data.shard_folder import write_manifest
from chemtwin.errors import InputError

from fake_twins import fake_twins

torch.set_num_threads(1)

N_PIXELS = 40
FAST = settings(max_examples=25, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: |^WARNING: .*\[[\w.]+\]$")
SKIP_HEAD = re.compile(r"^chemtwin [\w -]+: \d+ of \d+ file\(s\) skipped:$")


# ------------------------------------------------------------------ helpers
class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: int):
    """Turn a run that would hang CI into a failure (SIGALRM; the main thread only)."""
    def alarm(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(*argv, seconds: int = 10) -> tuple[int, list[str]]:
    """``chemtwin -q ARGV`` in this process: (exit code, stderr lines that are not log records).
    Any exception other than argparse's SystemExit propagates: that is a failure of the boundary."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()), time_limit(seconds):
        try:
            rc = main(["-q", *map(str, argv)])
        except SystemExit as exc:
            rc = exc.code
    lines = [line for line in err.getvalue().splitlines() if line.strip() and not LOG_LINE.match(line)]
    return rc, lines


def assert_one_line_exit_2(rc, lines, *outputs: Path) -> None:
    """The CLI's answer to bad input: exit 2, one ``chemtwin CMD: error: ...`` line (after the
    argparse usage, or the documented list of skipped files), and no output written."""
    errors = [line for line in lines if re.match(r"^chemtwin [\w -]+: error: ", line)]
    others = [line for line in lines if line not in errors and not line.startswith(("usage:", " "))
              and not SKIP_HEAD.match(line)]
    assert rc == 2 and len(errors) == 1 and not others, f"exit {rc}, stderr {lines}"
    for out in outputs:
        assert not out.exists(), f"{out} written although the run failed"
    for out in outputs:
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")] if out.parent.is_dir() else []
        assert not leftovers, f"temporary files left: {leftovers}"


def write_dataset(path: Path, flux, ivar, labels, group, names=("TEFF", "LOGG", "FE_H", "MG_FE")) -> Path:
    with DatasetWriter(path, 15000.0 + np.arange(flux.shape[1], dtype=float), list(names),
                       attrs={"generator": "fake_twins", "seed": 0, "snr": 100.0}) as w:
        w.append(flux, ivar, labels, group)
    return path


def tiny(n_groups: int = 20):
    flux, ivar, labels, group = fake_twins(n_groups, N_PIXELS, seed=1)
    return flux, ivar, labels[:, :4], group


@pytest.fixture(scope="module")
def work() -> Path:
    d = Path(tempfile.mkdtemp(prefix="chemtwin-fuzz-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def data(work) -> Path:
    return write_dataset(work / "data.h5", *tiny())


@pytest.fixture(scope="module")
def model(work, data) -> Path:
    from chemtwin.tagging import ChemTwin

    out = work / "model"
    ChemTwin(epochs=1, latent_dim=3, batch_size=8, decoder_hidden=(8,), adversary_hidden=(8,), val_fraction=0.0,
             device="cpu").fit(str(data), out_dir=out, progress=False)
    return out


@pytest.fixture(scope="module")
def shards(work) -> Path:
    """Two shards of 20 stars each and their manifest (the layout of docs/dataset.md)."""
    from chemtwin.data.shard_folder import grid_hash

    folder = work / "shards"
    folder.mkdir()
    flux, ivar, labels, group = tiny()
    entries = []
    for k, rows in enumerate((slice(0, 20), slice(20, 40))):
        path = write_dataset(folder / f"shard-{k:05d}.h5", flux[rows], ivar[rows], labels[rows], group[rows])
        entries.append({"path": path.name, "rows": 20, "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    write_manifest(folder, {"format": "chemtwin-shards", "format_version": 1, "kind": "dataset", "layout_version": 1,
                            "n_rows": 40, "n_pixels": N_PIXELS,
                            "pixel_grid": grid_hash(15000.0 + np.arange(N_PIXELS, dtype=float)), "shards": entries})
    return folder


@contextmanager
def scratch():
    d = Path(tempfile.mkdtemp(prefix="chemtwin-case-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ damaged bytes
@settings(FAST, max_examples=40)
@given(cut=st.one_of(st.none(), st.floats(0, 1)),
       flips=st.lists(st.tuples(st.one_of(st.integers(0, 4095), st.floats(0, 1, exclude_max=True)), st.integers(1, 255)),
                      min_size=1, max_size=8))
def test_damaged_dataset_bytes_are_an_input_error_or_a_valid_read(data, cut, flips):
    """Truncations and byte flips anywhere in a dataset file: the reader raises InputError
    naming the file, or reads arrays of the declared shapes; never an h5py/OSError/KeyError."""
    with scratch() as d:
        raw = bytearray(data.read_bytes())
        for where, xor in flips:  # an offset in the first 4 KiB (superblock, object headers) or a fraction
            raw[where % len(raw) if isinstance(where, int) else int(where * len(raw))] ^= xor
        if cut is not None:
            raw = raw[: int(cut * len(raw))]
        path = d / "damaged.h5"
        path.write_bytes(bytes(raw))
        try:
            with open_dataset(path) as ds:
                batch = ds.read()
                labels, group, wavelength = ds.labels(), ds.group, ds.wavelength
        except InputError as exc:
            assert str(path) in str(exc)
            return
        n, p = len(ds), ds.n_pixels
        assert batch.flux.shape == batch.ivar.shape == (n, p)
        assert labels.shape == (n, len(ds.label_names)) and group.shape == (n,) and wavelength.shape == (p,)


# ------------------------------------------------------------------ dataset structure
def _edit_structure(path: Path, name: str, kind: str, elsewhere: Path) -> None:
    with h5py.File(path, "r+") as f:
        values = f[name][()]
        attrs = dict(f[name].attrs)
        del f[name]
        if kind == "missing":
            return
        if kind == "group":
            f.create_group(name)
        elif kind == "scalar":
            f[name] = np.float32(1)
        elif kind == "strings":
            f.create_dataset(name, data=values.astype("S12"))
        elif kind == "one-more-dimension":
            f.create_dataset(name, data=values[..., None])
        elif kind == "one-row-short":
            f.create_dataset(name, data=values[:-1] if values.ndim and values.shape[0] > 1 else values[:0])
        elif kind == "external-link":
            with h5py.File(elsewhere, "w") as g:
                g[name] = values
            f[name] = h5py.ExternalLink(str(elsewhere), f"/{name}")
        elif kind == "external-storage":
            raw = elsewhere.with_suffix(".raw")
            values.tofile(raw)
            f.create_dataset(name, shape=values.shape, dtype=values.dtype, external=[(str(raw), 0, values.nbytes)])
        if kind not in ("group", "scalar") and name in f:
            f[name].attrs.update(attrs)


COMMANDS = {
    "info": lambda d, m, p: ["info", p],
    "evaluate-raw": lambda d, m, p: ["evaluate", p, "--method", "raw", "--json", d / "out.json"],
    "augment": lambda d, m, p: ["augment", p, "-o", d / "out.h5", "--seed", "1", "--snr", "50"],
    "embed": lambda d, m, p: ["embed", m, p, "--out", d / "out.h5"],
    "train": lambda d, m, p: ["train", p, "--out", d / "out", "--epochs", "1", "--threads", "1"],
    "cannon-train": lambda d, m, p: ["cannon", "train", p, "--labels", "TEFF,LOGG", "--out", d / "out.npz"],
}


def _outputs(d: Path) -> list[Path]:
    return [d / "out.json", d / "out.h5", d / "out", d / "out.npz"]


@FAST
@given(name=st.sampled_from(["flux", "ivar", "wavelength", "labels", "group"]),
       kind=st.sampled_from(["missing", "group", "scalar", "strings", "one-more-dimension", "one-row-short",
                             "external-link", "external-storage"]),
       command=st.sampled_from(sorted(COMMANDS)))
def test_dataset_structure_errors_are_one_line_exit_2(data, model, name, kind, command):
    """A required array missing, a group where a dataset belongs, strings, wrong shapes, or data
    stored outside the file (external links / storage): every reader refuses, in one line."""
    with scratch() as d:
        path = d / "in" / "data.h5"
        path.parent.mkdir()
        shutil.copy(data, path)
        _edit_structure(path, name, kind, d / "elsewhere.h5")
        rc, lines = run_cli(*COMMANDS[command](d, model, path))
        assert_one_line_exit_2(rc, lines, *_outputs(d))


# ------------------------------------------------------------------ values: NaN, inf, negative, masked
VALUE_EDITS = st.lists(st.tuples(st.integers(0, 39), st.integers(0, N_PIXELS - 1), st.sampled_from(["flux", "ivar"]),
                                 st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 0.0, 1e30])), max_size=6)


@FAST
@given(edits=VALUE_EDITS, masked_rows=st.lists(st.integers(0, 39), max_size=5), all_masked=st.booleans(),
       command=st.sampled_from(["augment", "embed", "evaluate-raw", "cannon-train", "train"]))
def test_nonfinite_or_negative_values_are_refused_or_masked_never_nan_out(model, edits, masked_rows, all_masked,
                                                                          command):
    """NaN or infinite flux where ivar > 0 and NaN or negative ivar are bad input (exit 2); ivar = 0
    masks a pixel whatever its flux (docs/dataset.md); a dataset with no usable row is bad input;
    whatever is accepted gives finite outputs."""
    flux, ivar, labels, group = tiny()
    for row, col, which, value in edits:
        (flux if which == "flux" else ivar)[row, col] = value
    ivar[masked_rows] = 0.0
    if all_masked:
        ivar[:] = 0.0
    usable = ivar > 0
    bad = bool((~np.isfinite(flux) & usable).any() or np.isnan(ivar).any() or (ivar < 0).any() or not usable.any())
    with scratch() as d:
        path = write_dataset(d / "data.h5", flux, ivar, labels, group)
        rc, lines = run_cli(*COMMANDS[command](d, model, path))
        if bad:
            assert_one_line_exit_2(rc, lines, *_outputs(d))
            return
        assert rc == 0, f"exit {rc}, stderr {lines}"
        if command == "augment":
            with h5py.File(d / "out.h5") as f:
                out_flux, out_ivar = f["flux"][()], f["ivar"][()]
            assert not np.isnan(out_ivar).any() and (out_ivar >= 0).all()
            assert np.isfinite(out_flux[out_ivar > 0]).all()
        elif command == "embed":
            with h5py.File(d / "out.h5") as f:
                assert np.isfinite(f["z"][()]).all() and len(f["z"]) >= 1
        elif command == "evaluate-raw":
            json.loads((d / "out.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the results"))


@settings(FAST, max_examples=15)
@given(column=st.sampled_from(["TEFF", "LOGG"]), value=st.sampled_from([np.nan, np.inf, -np.inf]),
       rows=st.sampled_from(["one", "all"]), command=st.sampled_from(["embed", "train", "cannon-train"]))
def test_non_finite_condition_labels_are_refused(model, column, value, rows, command):
    flux, ivar, labels, group = tiny()
    labels[3 if rows == "one" else slice(None), ["TEFF", "LOGG"].index(column)] = value
    with scratch() as d:
        path = write_dataset(d / "data.h5", flux, ivar, labels, group)
        rc, lines = run_cli(*COMMANDS[command](d, model, path))
        assert_one_line_exit_2(rc, lines, *_outputs(d))


# ------------------------------------------------------------------ integer options out of range
OUT_OF_RANGE = st.one_of(st.integers(-10**30, 0), st.integers(10**12, 10**30))
OPTIONS = {
    "generate --n-groups": lambda d, m, x, v: ["generate", "-o", d / "out.h5", "--threads", "1", "--n-groups", v],
    "generate --group-size": lambda d, m, x, v: ["generate", "-o", d / "out.h5", "--threads", "1", "--n-groups", "1",
                                                 "--group-size", v],
    "generate --threads": lambda d, m, x, v: ["generate", "-o", d / "out.h5", "--n-groups", "1", "--threads", v],
    "generate --workers": lambda d, m, x, v: ["generate", "-o", d / "out.h5", "--n-groups", "1", "--workers", v],
    "train --batch-size": lambda d, m, x, v: ["train", x, "--out", d / "out", "--epochs", "1", "--batch-size", v],
    "train --latent-dim": lambda d, m, x, v: ["train", x, "--out", d / "out", "--epochs", "1", "--latent-dim", v],
    "train --n-cat": lambda d, m, x, v: ["train", x, "--out", d / "out", "--epochs", "1", "--n-cat", v],
    "embed --batch-size": lambda d, m, x, v: ["embed", m, x, "--out", d / "out.h5", "--batch-size", v],
    "augment --batch-size": lambda d, m, x, v: ["augment", x, "-o", d / "out.h5", "--seed", "1", "--batch-size", v],
    "evaluate --max-queries": lambda d, m, x, v: ["evaluate", x, "--method", "raw", "--json", d / "out.json",
                                                  "--max-queries", v],
    "cluster --min-cluster-size": lambda d, m, x, v: ["cluster", d / "z.h5", "--out", d / "out.h5",
                                                      "--min-cluster-size", v],
    "search -k": lambda d, m, x, v: ["search", d / "idx", "--star", "0", "-k", v],
    "plot-spectra --index": lambda d, m, x, v: ["plot-spectra", x, "--index", v if int(v) > 0 else str(int(v) - 40),
                                                "--out", d / "out.png"],
}


@settings(FAST, max_examples=20)
@given(option=st.sampled_from(sorted(OPTIONS)), value=OUT_OF_RANGE)
def test_integer_options_out_of_range_are_refused_before_any_work(data, model, option, value):
    """Sizes that cannot exist or cannot fit, counts below one, seeds and thread counts no
    library takes: one line, exit 2, before anything is written (and without hanging)."""
    with scratch() as d:
        if option.startswith(("cluster", "search")):
            assert run_cli("embed", model, data, "--out", d / "z.h5")[0] == 0
            assert run_cli("index", d / "z.h5", "--out", d / "idx")[0] == 0
        rc, lines = run_cli(*OPTIONS[option](d, model, data, str(value)))
        assert_one_line_exit_2(rc, lines, d / "out.h5", d / "out", d / "out.json", d / "out.png")


@settings(FAST, max_examples=10)
@given(seed=st.one_of(st.integers(-10**30, -1), st.integers(2**64, 10**30)),
       command=st.sampled_from(["generate", "train", "augment"]))
def test_seeds_no_generator_takes_are_refused(data, seed, command):
    with scratch() as d:
        argv = {"generate": ["generate", "-o", d / "out.h5", "--n-groups", "1", "--threads", "1"],
                "train": ["train", data, "--out", d / "out", "--epochs", "1"],
                "augment": ["augment", data, "-o", d / "out.h5", "--snr", "50"]}[command]
        rc, lines = run_cli(*argv, "--seed", seed)
        assert_one_line_exit_2(rc, lines, d / "out.h5", d / "out")


# ------------------------------------------------------------------ shard manifests
def _tamper(folder: Path, how: str, outside: Path) -> None:
    man = json.loads((folder / "manifest.json").read_text())
    if how == "duplicate-entry":
        man["shards"].insert(1, dict(man["shards"][0]))
    elif how == "duplicate-copy":
        shutil.copy(folder / man["shards"][0]["path"], folder / "copy.h5")
        man["shards"].append(dict(man["shards"][0], path="copy.h5"))
    elif how in ("absolute-path", "dotdot-path", "symlink-outside"):
        shutil.move(folder / man["shards"][1]["path"], outside)
        if how == "absolute-path":
            man["shards"][1]["path"] = str(outside)
        elif how == "dotdot-path":
            man["shards"][1]["path"] = os.path.relpath(outside, folder)
        else:
            (folder / man["shards"][1]["path"]).symlink_to(outside)
    elif how == "checksum-mismatch":
        shard = folder / man["shards"][1]["path"]
        raw = bytearray(shard.read_bytes())
        raw[-100] ^= 0x01  # raw flux bytes: size unchanged, data changed
        shard.write_bytes(bytes(raw))
    elif how == "rows-wrong":
        man["shards"][1]["rows"] += 1
    (folder / "manifest.json").write_text(json.dumps(man))


@settings(FAST, max_examples=30)
@given(how=st.sampled_from(["duplicate-entry", "duplicate-copy", "absolute-path", "dotdot-path", "symlink-outside",
                            "checksum-mismatch", "rows-wrong"]),
       command=st.sampled_from(sorted(COMMANDS)))
def test_tampered_manifests_are_refused_by_every_reader(shards, model, how, command):
    """A shard listed twice (or a copy of one), a shard outside the folder, a shard whose bytes do
    not match its checksum: every reader of a shard folder refuses, not only `chemtwin info`."""
    with scratch() as d:
        folder = d / "in" / "shards"
        shutil.copytree(shards, folder)
        _tamper(folder, how, d / "outside.h5")
        rc, lines = run_cli(*COMMANDS[command](d, model, folder))
        assert_one_line_exit_2(rc, lines, *_outputs(d))


# ------------------------------------------------------------------ latent files
@FAST
@given(edits=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 2), st.sampled_from([np.nan, np.inf, -np.inf])),
                      max_size=3),
       command=st.sampled_from(["index", "whiten", "cluster", "evaluate"]))
def test_latents_with_non_finite_values_are_refused_or_outputs_are_finite(model, data, edits, command):
    with scratch() as d:
        assert run_cli("embed", model, data, "--out", d / "z.h5")[0] == 0
        with h5py.File(d / "z.h5", "r+") as f:
            z = f["z"][()]
            for row, col, value in edits:
                z[row, col] = value
            f["z"][...] = z
        argv = {"index": ["index", d / "z.h5", "--out", d / "out"],
                "whiten": ["whiten", d / "z.h5", "--train", d / "z.h5", "--out", d / "out.h5"],
                "cluster": ["cluster", d / "z.h5", "--out", d / "out.h5", "--min-cluster-size", "2"],
                "evaluate": ["evaluate", "--latents", d / "z.h5", "--json", d / "out.json"]}[command]
        rc, lines = run_cli(*argv)
        if edits:
            assert_one_line_exit_2(rc, lines, d / "out", d / "out.h5", d / "out.json")
        else:
            assert rc == 0, lines


# ------------------------------------------------------------------ model folders
def _damage_model(folder: Path, how: str) -> None:
    from safetensors.numpy import load_file, save_file

    config = json.loads((folder / "config.json").read_text())
    weights = folder / "model.safetensors"
    if how == "condition-swapped":
        config["config"]["condition"] = config["config"]["condition"][::-1]
    elif how == "latent-dim-changed":
        config["config"]["latent_dim"] += 1
    elif how in ("weights-nan", "weights-one-nan", "weights-inf"):
        tensors = load_file(str(weights))
        key = next(k for k in sorted(tensors) if k.endswith("weight"))
        if how == "weights-one-nan":
            tensors[key].flat[0] = np.nan
        else:
            tensors[key][...] = np.nan if how == "weights-nan" else np.inf
        save_file(tensors, str(weights))
    elif how.startswith("truncated-"):
        size = weights.stat().st_size
        with open(weights, "r+b") as fh:
            fh.truncate(int(size * float(how.split("-")[1])))
    elif how == "config-not-json":
        (folder / "config.json").write_text("{not json")
        return
    (folder / "config.json").write_text(json.dumps(config))


@settings(FAST, max_examples=20)
@given(how=st.sampled_from(["condition-swapped", "latent-dim-changed", "weights-nan", "weights-one-nan", "weights-inf",
                            "truncated-0.5", "truncated-0.01", "config-not-json"]),
       command=st.sampled_from(["embed", "evaluate"]))
def test_damaged_model_folders_are_refused(model, data, how, command):
    """A model folder whose weights are not finite, or whose config disagrees with its weights
    (condition order, latent size), or that is cut short: one line, exit 2 (never garbage latents)."""
    with scratch() as d:
        folder = d / "model"
        shutil.copytree(model, folder)
        _damage_model(folder, how)
        argv = (["embed", folder, data, "--out", d / "out.h5"] if command == "embed"
                else ["evaluate", folder, data, "--json", d / "out.json"])
        rc, lines = run_cli(*argv)
        assert_one_line_exit_2(rc, lines, d / "out.h5", d / "out.json")


@settings(FAST, max_examples=10)
@given(extra=st.dictionaries(st.text("abcdefghij_", min_size=1, max_size=8), st.integers() | st.text(max_size=5),
                             min_size=1, max_size=3),
       history=st.binary(max_size=300))
def test_unknown_config_keys_and_a_damaged_history_do_not_break_a_model(model, data, extra, history):
    """history.csv is a log and unknown configuration keys are a newer writer's additions: a model
    with them embeds (or is refused in one line), never a traceback."""
    with scratch() as d:
        folder = d / "model"
        shutil.copytree(model, folder)
        config = json.loads((folder / "config.json").read_text())
        config["config"].update({f"x_{k}": v for k, v in extra.items()})
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "history.csv").write_bytes(history)
        rc, lines = run_cli("embed", folder, data, "--out", d / "out.h5")
        if rc != 0:
            assert_one_line_exit_2(rc, lines, d / "out.h5")


def test_a_model_with_nan_weights_refuses_to_save(model, tmp_path):
    from chemtwin.tagging import ChemTwin

    ct = ChemTwin.load(model)
    with torch.no_grad():
        next(ct.net_.parameters()).fill_(math.nan)
    with pytest.raises(InputError):
        ct.save(tmp_path / "nan-model")
    assert not (tmp_path / "nan-model" / "model.safetensors").exists()


# ------------------------------------------------------------------ file lists and catalogues
@pytest.fixture(scope="module")
def catalog(work) -> Path:
    from astropy.table import Table

    path = work / "catalog.fits"
    Table({"APOGEE_ID": ["2M0"], "TEFF": np.array([4500.0], "f4"), "LOGG": np.array([2.0], "f4")}).write(path)
    return path


@settings(FAST, max_examples=15)
@given(content=st.binary(max_size=400), command=st.sampled_from(["ingest", "embed"]))
def test_any_bytes_as_a_file_list_are_one_line(model, catalog, content, command):
    """``--file-list`` pointing at a binary or garbled file: one line and exit 2 (UnicodeDecodeError
    must not escape), since none of its "paths" is a usable spectrum."""
    with scratch() as d:
        listing = d / "files.txt"
        listing.write_bytes(content)
        argv = (["ingest", "--file-list", listing, "--catalog", catalog, "--out", d / "out.h5"] if command == "ingest"
                else ["embed", model, "--file-list", listing, "--catalog", catalog, "--out", d / "out.h5"])
        rc, lines = run_cli(*argv)
        assert_one_line_exit_2(rc, lines, d / "out.h5")
