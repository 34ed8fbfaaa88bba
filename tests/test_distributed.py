"""Scale-out: Dask (2 local worker processes) for generate / ingest / embed, and DDP training
under torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_twins import write_fake
from safetensors.torch import load_file

from chemtwin.cli import main
from chemtwin.core.threads import torch_threads
from chemtwin.data.dataset import open_dataset
from chemtwin.data.generate import generate_dataset, generate_sharded
from chemtwin.data.shard_folder import MANIFEST
from chemtwin.errors import InputError
from chemtwin.search.latents import open_latents

HERE = Path(__file__).resolve().parent
USER_MALLOC_TRIM = os.environ.get("MALLOC_TRIM_THRESHOLD_")  # before any cluster of this file starts
FIXTURES = HERE.parents[1] / "shared" / "fixtures" / "apogee"
SMALL = dict(n_groups=100, group_size=2, snr=50.0, seed=11, chunk_stars=48, progress=False)  # 5 chunks


@pytest.fixture(scope="module")
def client():
    pytest.importorskip("distributed")
    from chemtwin.data.shards import dask_client

    with dask_client(workers=2) as c:
        yield c


def test_local_workers_keep_glibc_malloc_defaults(client):
    """Dask's default MALLOC_TRIM_THRESHOLD_ made every generate shard 2.5x slower; the local
    workers chemtwin starts go without it (or with the user's own value)."""
    if USER_MALLOC_TRIM is not None:
        pytest.skip("MALLOC_TRIM_THRESHOLD_ is set in this environment; the workers rightly inherit it")
    assert set(client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").values()) == {None}


def _same(a, b):
    for field in ("flux", "ivar", "labels", "group"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def _untrained_model(path, wavelength):
    from chemtwin.tagging.estimator import ChemTwin
    from chemtwin.tagging.fader import FaderNet

    torch.manual_seed(0)
    ct = ChemTwin(latent_dim=6)
    ct.net_, ct.wavelength_ = FaderNet(ct.config.net, wavelength.size), wavelength
    return ct.save(path)


def test_dask_generate_and_embed_are_bit_identical_to_one_process(client, tmp_path):
    generate_dataset(tmp_path / "one.h5", **SMALL)
    manifest = generate_sharded(tmp_path / "sharded", client=client, shard_stars=48, **SMALL)
    assert len(manifest["shards"]) == 5
    with open_dataset(tmp_path / "one.h5") as a, open_dataset(tmp_path / "sharded") as b:
        _same(a.read(), b.read())
        model = _untrained_model(tmp_path / "model", a.wavelength)
    address = client.scheduler.address
    # the CLI: generate with the default chunks, embed one dataset in shards of 2 batches
    assert main(["-q", "generate", "-o", str(tmp_path / "cli"), "--n-groups", "30", "--seed", "3", "--scheduler", address]) == 0
    generate_dataset(tmp_path / "cli.h5", n_groups=30, seed=3, progress=False)
    with open_dataset(tmp_path / "cli.h5") as a, open_dataset(tmp_path / "cli") as b:
        _same(a.read(), b.read())
    # A matrix product's rounding depends on how many threads split its sums; the Dask workers run
    # one thread each, so the one-process embed does too (bit identity is per thread count).
    with torch_threads(1):
        assert main(["-q", "embed", str(model), str(tmp_path / "one.h5"), "--out", str(tmp_path / "z.h5"),
                     "--batch-size", "32"]) == 0
    assert main(["-q", "embed", str(model), str(tmp_path / "sharded"), "--out", str(tmp_path / "z"), "--batch-size", "32",
                 "--shard-size", "64", "--scheduler", address]) == 0
    with open_latents(tmp_path / "z.h5") as a, open_latents(tmp_path / "z") as b:
        assert len(b.shard_names) == 4  # 200 rows in shards of 64
        np.testing.assert_array_equal(a.read(), b.read())
        np.testing.assert_array_equal(a.group, b.group)
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(b.star_id(), np.arange(200).astype(str))  # shards always name their stars


def _crash_on_chunk(chunk: int) -> None:
    """Run on every worker: chunk ``chunk`` of a generation now raises (undone by ``_uncrash``)."""
    import chemtwin.data.generate as gen

    real = gen.Plan.chunk

    def crashing(self, synth, k, threads):
        if k == chunk:
            raise RuntimeError("simulated worker crash")
        return real(self, synth, k, threads)

    crashing.real = real
    gen.Plan.chunk = crashing


def _uncrash() -> None:
    import chemtwin.data.generate as gen

    gen.Plan.chunk = getattr(gen.Plan.chunk, "real", gen.Plan.chunk)


def test_failing_task_leaves_no_manifest_and_a_rerun_completes(client, tmp_path):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    out = tmp_path / "run"
    client.run(_crash_on_chunk, 3)
    try:
        with pytest.raises(InputError, match=r"shard 3 \(shard-00003.h5\) failed: RuntimeError: simulated worker crash;.*"
                                             r"rerun the same command"):
            generate_sharded(out, client=client, shard_stars=48, **SMALL)
    finally:
        client.run(_uncrash)
    assert not (out / MANIFEST).exists() and not (out / "shard-00003.h5").exists()
    with pytest.raises(InputError, match="unfinished"):
        open_dataset(out)
    (out / ".shard-00003.h5.tmp-424242").write_bytes(b"half a shard")  # what a killed worker leaves
    generate_sharded(out, client=client, shard_stars=48, **SMALL)
    assert not list(out.glob(".shard-*")) and (out / MANIFEST).exists()
    generate_dataset(tmp_path / "one.h5", **SMALL)
    with open_dataset(tmp_path / "one.h5") as a, open_dataset(out) as b:
        _same(a.read(), b.read())
        b.validate()


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"real APOGEE fixtures not found: {FIXTURES}")
def test_dask_ingest_matches_one_process(client, tmp_path, capsys):
    from astropy.table import Table

    Table({"APOGEE_ID": ["2M17335483-2753043", "2M19485057+5005279"], "TEFF": np.array([3700.0, 4800.0], "f4"),
           "LOGG": np.array([0.6, 2.5], "f4"), "ASPCAPFLAG": np.zeros(2, "i8")}).write(tmp_path / "cat.fits")
    broken = tmp_path / "apStar-broken.fits"
    broken.write_bytes((FIXTURES / "apStar-dr17-2M19485057+5005279.fits").read_bytes()[:500_000])
    files = [str(FIXTURES / "apStar-dr17-2M17335483-2753043.fits"), str(broken),
             str(FIXTURES / "apStar-dr17-2M19485057+5005279.fits")]
    common = ["-q", "ingest", *files, "--catalog", str(tmp_path / "cat.fits")]
    assert main([*common, "--out", str(tmp_path / "one.h5")]) == 1  # one file skipped
    assert main([*common, "--out", str(tmp_path / "sharded"), "--shard-size", "1",
                 "--scheduler", client.scheduler.address]) == 1
    assert "1 of 3 file(s) skipped" in capsys.readouterr().err
    with open_dataset(tmp_path / "one.h5") as a, open_dataset(tmp_path / "sharded") as b:
        assert len(b.shard_names) == 2  # the broken file's shard is empty: not in the manifest
        np.testing.assert_array_equal(a.star_id, b.star_id)
        _same(a.read(), b.read())


def test_unreachable_scheduler_is_one_line_exit_2(tmp_path, capsys):
    from astropy.table import Table

    pytest.importorskip("distributed")
    Table({"APOGEE_ID": ["2M0"], "TEFF": [4500.0], "LOGG": [2.0]}).write(tmp_path / "cat.fits")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for argv in (["generate", "-o", str(tmp_path / "g"), "--n-groups", "5"],
                 ["ingest", "apStar-x.fits", "--catalog", str(tmp_path / "cat.fits"), "--out", str(tmp_path / "i")]):
        capsys.readouterr()
        assert main(["-q", *argv, "--scheduler", f"tcp://127.0.0.1:{port}", "--connect-timeout", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in err, err
    assert main(["-q", "generate", "-o", str(tmp_path / "g"), "--n-groups", "5", "--scheduler", "nonsense://x"]) == 2
    assert main(["-q", "generate", "-o", str(tmp_path / "g"), "--n-groups", "5", "--workers", "0"]) == 2
    assert not (tmp_path / "g").exists()


# ---------------------------------------------------------------- DDP
TRAIN_SCRIPT = '''
import sys, torch
torch.set_num_threads(1)
from chemtwin.data.dataset import open_dataset
from chemtwin.tagging.fader_config import FaderConfig
from chemtwin.tagging.training import train
data, root = sys.argv[1], sys.argv[2]
# "plain": no latent BatchNorm, streamed from disk; "norm": the default latent BatchNorm, then resumed.
# Adversary dropout off: its masks are drawn per rank.  lambda > 0 from the first step.  Global batches
# of 11 rows: rank 0 gets 6, rank 1 gets 5, so the loss weights of the two ranks differ.
runs = [("plain", dict(latent_norm=False, max_memory_gb=0.0, epochs=1), False),
        ("norm", dict(epochs=1), False), ("norm", dict(epochs=2), True)]
for name, extra, resume in runs:
    cfg = FaderConfig(latent_dim=6, batch_size=11, adversary_dropout=0.0, lambda_warmup_frac=0.0, lambda_adv=0.1,
                      val_fraction=0.25, device="cpu", **extra)
    with open_dataset(data) as ds:
        train(ds, f"{root}/{name}", cfg, resume=resume, overwrite=True, progress=False)
'''


def test_ddp_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    data = write_fake(tmp_path / "data.h5", n_groups=22, n_pixels=100)  # 32 training rows: steps of 11, 11, 10
    script = tmp_path / "train_runs.py"
    script.write_text(TRAIN_SCRIPT)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    subprocess.run([sys.executable, str(script), str(data), str(tmp_path / "one")], check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(data), str(tmp_path / "two")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = {"plain": 3, "norm": 6}  # optimizer steps behind each final model (the resumed run: 2 epochs)
    for name in ("plain", "norm"):
        one, two = (load_file(str(tmp_path / d / name / "model.safetensors")) for d in ("one", "two"))
        for key in one:
            if key in ("encoder.layers.0.bias", "latent_norm.running_mean"):
                # The bias in front of the batch-normalised latent has no effect and a zero gradient;
                # Adam turns the rounding noise of that zero into lr-sized steps, which differ from
                # run to run (and shift the latent's running mean alike).  Everything else agrees.
                continue
            if key == "latent_norm.running_var":
                # a buffer, not an Adam weight: an average of batch variances near 1, whose rows the two
                # runs sum in another order; float32 rounds it at 1.2e-7 (one ulp), so a few ulps apart
                np.testing.assert_allclose(two[key], one[key], rtol=1e-6, atol=0, err_msg=f"{name}: {key}")
                continue
            lr = 3e-4 * (5.0 if key.startswith("adversary") else 1.0)  # the "fast" preset's lr, x5 for the adversary
            _assert_same_adam_weights(two[key].double().numpy(), one[key].double().numpy(),
                                      steps=steps[name], lr=lr, err_msg=f"{name}: {key}")
        # only rank 0 wrote: one history row per epoch, the same numbers (the resumed run went on
        # where it stopped); the training losses are averaged over the ranks
        rows = [_history(tmp_path / d / name) for d in ("one", "two")]
        assert len(rows[1]) == (2 if name == "norm" else 1) == len(rows[0])
        for r1, r2 in zip(*rows):
            for column in r1:
                if column != "time_s":
                    np.testing.assert_allclose(float(r2[column]), float(r1[column]), rtol=1e-4, atol=1e-7, err_msg=column)
        meta = json.loads((tmp_path / "two" / name / "config.json").read_text())
        assert meta["data"]["processes"] == 2 and meta["final"]["step"] == 3 * len(rows[1])


def _assert_same_adam_weights(two: np.ndarray, one: np.ndarray, steps: int, lr: float, err_msg: str,
                              rows: int = 11, pixels: int = 100) -> None:
    """Weights after ``steps`` Adam(W) steps from the same start, gradients summed in a different order.

    Adam moves a weight by at most ~lr per step whatever its gradient's size, so differences are
    absolute, in units of lr, not relative to the weight.  A gradient element is a sum of
    rows x pixels terms; summing them in another order (one process vs two, then an all-reduce)
    changes it by at most float32 epsilon times the number of terms, relative, and the Adam step by
    the same relative amount: ``steps * lr * eps32 * rows * pixels`` bounds every resolved weight.
    A gradient element that is itself at the rounding-noise level is the exception: Adam
    normalises it to a step of up to lr whatever the noise, so such a weight may differ by up to
    2 lr per step.  Those are rare (a few of tens of thousands); a real DDP error (a missing
    all-reduce, ranks weighted by process instead of by row) moves most weights of a tensor by a
    sizeable fraction of lr, so at most 1 in 1,000 elements may use the noise allowance.
    """
    resolved = steps * lr * float(np.finfo(np.float32).eps) * rows * pixels
    diff = np.abs(two - one)
    noisy = diff > resolved
    assert noisy.sum() <= max(1, diff.size // 1000), (
        f"{err_msg}: {noisy.sum()} of {diff.size} weights differ by more than {resolved:.2e}")
    assert (diff <= 2 * steps * lr).all(), f"{err_msg}: a weight differs by {diff.max():.2e}, over 2 lr per step"


def _history(model_dir: Path) -> list[dict]:
    import csv

    with open(model_dir / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))
