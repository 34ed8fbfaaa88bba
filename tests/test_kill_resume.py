"""kill -9 during training and during a checkpoint write, then ``--resume``; same-seed determinism.

The small CI version of the campaign's kill trials (benchmarks/fuzz_campaign.py --category kill,
12 trials at random moments): a training run in its own interpreter is killed (1) while it
writes its checkpoint — ``save_file`` is wrapped to write half the file and then SIGKILL its own
process, so the kill lands mid-write every time — and (2) at a moment drawn after its second
epoch.  The resumed run must continue from the last complete checkpoint: the same loss curve
as an uninterrupted run of the same seed (no jump), the same weights, and no temporary file of
the killed run left in the model folder.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from chemtwin.cli import main

from fake_twins import write_fake
from kill_script import DIE_IN_CHECKPOINT

TRAIN = ["--epochs", "8", "--batch-size", "16", "--latent-dim", "3", "--seed", "0", "--threads", "1"]
LOSSES = ("train_loss", "train_recon", "train_adv_ce", "val_recon")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake(tmp_path_factory.mktemp("kill") / "twins.h5", n_groups=60, n_pixels=40)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run of the same seed."""
    out = tmp_path_factory.mktemp("reference") / "model"
    assert main(["-q", "train", str(data), "--out", str(out), *TRAIN]) == 0
    return out


def _history(model: Path) -> dict[str, np.ndarray]:
    with open(model / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    return {c: np.array([float(r[c]) for r in rows]) for c in ("epoch", *LOSSES)}


def _env() -> dict:
    src = str(Path(__import__("chemtwin").__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")


def _check_resumed(model: Path, reference: Path) -> None:
    ref, got = _history(reference), _history(model)
    np.testing.assert_array_equal(got["epoch"], ref["epoch"])
    # Resume restores weights, optimizer, RNG and data order: the same arithmetic in the same
    # order on one thread, so the same bits (docs/model.md: it continues exactly where it stopped).
    for column in LOSSES:
        np.testing.assert_array_equal(got[column], ref[column], err_msg=column)
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(model / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    left = sorted(p.name for p in model.iterdir() if p.name.startswith("."))
    assert not left, f"temporary files of the killed run left in {model}: {left}"


def _checkpoint_is_whole(model: Path) -> None:
    """What a reader finds after the kill is a complete checkpoint (or none): never a half-written one."""
    path = model / "checkpoint.safetensors"
    if path.exists():
        with safe_open(str(path), "np") as f:
            for key in f.keys():
                f.get_tensor(key)


@pytest.mark.parametrize("k", [2, 5])  # the 2nd and 5th checkpoint: a complete one exists
def test_kill_9_during_a_checkpoint_write_then_resume_continues_the_same_curve(data, reference, tmp_path, k):
    model = tmp_path / "model"
    run = subprocess.run([sys.executable, "-c", DIE_IN_CHECKPOINT, str(k), "-q", "train", str(data), "--out", str(model),
                          *TRAIN], env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    _checkpoint_is_whole(model)
    assert main(["-q", "train", str(data), "--out", str(model), "--resume", *TRAIN]) == 0
    _check_resumed(model, reference)


def test_kill_9_at_a_random_moment_of_training_then_resume(data, reference, tmp_path):
    model = tmp_path / "model"
    rng = np.random.default_rng(19)
    epochs_done = int(rng.integers(2, 6))  # kill once this many epochs are in history.csv
    p = subprocess.Popen([sys.executable, "-m", "chemtwin", "-q", "train", str(data), "--out", str(model), *TRAIN],
                         env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline:
        history = model / "history.csv"
        if history.exists() and len(history.read_text().splitlines()) > epochs_done:
            time.sleep(float(rng.uniform(0, 0.01)))
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run ended before it was killed; make it longer"
    _checkpoint_is_whole(model)
    assert main(["-q", "train", str(data), "--out", str(model), "--resume", *TRAIN]) == 0
    _check_resumed(model, reference)


def test_generate_and_train_are_deterministic_for_a_seed(data, reference, tmp_path):
    import h5py

    for k in range(2):
        assert main(["-q", "generate", "-o", str(tmp_path / f"g{k}.h5"), "--n-groups", "3", "--snr", "50", "--seed", "11",
                     "--threads", str(k + 1)]) == 0
    with h5py.File(tmp_path / "g0.h5") as a, h5py.File(tmp_path / "g1.h5") as b:
        for name in ("flux", "ivar", "labels", "group", "wavelength"):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
    again = tmp_path / "again"
    assert main(["-q", "train", str(data), "--out", str(again), *TRAIN]) == 0
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(again / "model.safetensors"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
