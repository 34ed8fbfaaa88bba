"""Cycle-StarNet: identity on identical domains, the adapted emulator in The Payne's fitter,
checkpoints and resume after kill -9, the stability monitor, the commands and their bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chemtwin.cli import main
from chemtwin.data.dataset import open_dataset
from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.errors import InputError
from chemtwin.spectral_models.payne import PayneEmulator
from chemtwin.tagging.cyclestarnet import CycleConfig, CycleEmulator, CycleStarNet, losses
from chemtwin.tagging.cyclestarnet_train import (load, map_syn_to_obs, read_folder, read_history, split_box_of,
                                                 train)
from chemtwin.tagging.payne_fit import PayneFitter

sys.path.insert(0, str(Path(__file__).parent))
from fake_twins import write_fake  # noqa: E402

NAMES = ["TEFF", "LOGG", "FE_H", "MG_FE"]
EPOCHS = 150
TINY = dict(hidden=48, latent=8, split=2, correction_hidden=16, disc_hidden=16, batch_size=32, lr=3e-3)


def _emulator(path, n_pixels):
    """A small random MLP emulator over the fake data's label box (deterministic)."""
    with open_dataset(path) as ds:
        labels = np.asarray(ds.labels(NAMES), dtype=np.float64)
        wavelength, mean = ds.wavelength, ds.read(0, ds.n_stars).flux.mean(0)
    emu = PayneEmulator.mlp(labels.min(0), labels.max(0), n_pixels, NAMES, hidden=16, wavelength=wavelength,
                            seed=1, output_bias=mean)
    with torch.no_grad():
        emu.w_array_2.mul_(5.0)  # visible structure in the spectra
    return emu


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cycle")
    syn = write_fake(root / "syn.h5", n_groups=48, n_pixels=60, label_names=NAMES, ivar_value=np.inf)
    emu = _emulator(syn, 60)
    emu_path = emu.save(root / "emu.npz")
    # the synthetic domain's spectra are the emulator's: write them as the observed file too (identical domains)
    with open_dataset(syn) as ds:
        labels, group, wavelength = np.asarray(ds.labels(NAMES)), ds.group, ds.wavelength
    flux = emu.predict(labels)
    same = root / "same.h5"
    with DatasetWriter(same, wavelength, NAMES) as w:
        w.append(flux, np.full_like(flux, 1e6), labels, group)
    torch.set_num_threads(1)
    model = root / "identity"
    train(syn, same, model, CycleConfig(epochs=EPOCHS, warmup_epochs=EPOCHS, **TINY), emulator=emu_path, progress=False)
    return {"root": root, "syn": syn, "same": same, "emu": emu_path, "model": model, "flux": flux, "labels": labels}


def test_identical_domains_map_a_spectrum_to_itself(setup):
    net, emu, adapted, meta = load(setup["model"])
    assert meta["status"] == "finished" and meta["final"]["epoch"] == EPOCHS
    flux = setup["flux"]
    mapped = map_syn_to_obs(net, flux)
    spread = np.sqrt(np.mean((flux - flux.mean(0)) ** 2))
    err = np.sqrt(np.mean((mapped - flux) ** 2))
    assert err < 0.15 * spread, (err, spread)
    # the residual mode is exact at the start and stays close: the correction learnt is small
    res = CycleEmulator(emu, net, "residual").predict(setup["labels"])
    assert np.sqrt(np.mean((res - flux) ** 2)) < 0.15 * spread
    rows = read_history(setup["model"])
    assert len(rows) == EPOCHS and all(r["monitor"] == "ok" for r in rows)
    assert float(rows[-1]["rec_obs"]) < 0.5 * float(rows[0]["rec_obs"])


def test_adapted_emulator_plugs_into_the_payne_fitter(setup):
    _, emu, adapted, _ = load(setup["model"], "residual")
    assert adapted.format == "cyclestarnet" and adapted.label_names == NAMES
    r = PayneFitter(adapted, max_iter=20, n_retries=0).fit(setup["flux"][:6], np.full_like(setup["flux"][:6], 1e4))
    assert r.labels.shape == (6, 4) and np.isfinite(r.labels).all()
    assert np.all(np.abs(r.labels[:, 0] - setup["labels"][:6, 0]) < 600)  # TEFF roughly recovered


def test_free_split_latent_becomes_extra_labels(setup):
    net, emu, _, _ = load(setup["model"])
    flux = setup["flux"][:6]
    box = split_box_of(net, flux, np.full_like(flux, 1e4))
    _, _, adapted, _ = load(setup["model"], "residual", split_box=box)
    assert adapted.label_names == NAMES + ["ZSP_0", "ZSP_1"] and adapted.n_labels == 6
    # at the mean z_sp it is the fixed-split model
    labels = np.c_[setup["labels"][:6], np.tile(net.split_mean.numpy(), (6, 1))]
    fixed = CycleEmulator(emu, net, "residual").predict(setup["labels"][:6])
    np.testing.assert_allclose(adapted.predict(labels), fixed, atol=1e-5)
    r = PayneFitter(adapted, max_iter=10, n_retries=0).fit(flux, np.full_like(flux, 1e4))
    assert r.labels.shape == (6, 6) and np.isfinite(r.labels).all()
    with pytest.raises(InputError):
        CycleEmulator(emu, net, split_box=(np.zeros(2), np.zeros(2)))
    with pytest.raises(InputError):
        adapted.save(setup["root"] / "adapted.npz")


def test_losses_have_every_term_and_a_discriminator_after_warmup():
    net = CycleStarNet(CycleConfig(**TINY), 30)
    xs, xo = torch.rand(5, 30), torch.rand(7, 30)
    wo, sig = torch.ones(7, 30), torch.full((7, 30), 0.01)
    parts, ae, d = losses(net, xs, xo, wo, sig, adversarial=False)
    assert set(parts) == {"rec_syn", "rec_obs", "cycle"} and d is None
    parts, ae, d = losses(net, xs, xo, wo, sig, adversarial=True, gen=torch.Generator().manual_seed(0))
    assert {"adv_g", "adv_d"} <= set(parts) and torch.isfinite(d)
    # identical start: the observed encoder/decoder equal the synthetic ones
    with torch.no_grad():
        assert torch.allclose(net.syn_to_obs(xs), net.decode_syn(net.encode_syn(xs)))


def test_divergence_stops_with_the_last_good_model(setup, tmp_path):
    out = tmp_path / "m"
    cfg = CycleConfig(epochs=6, **{**TINY, "lr": 1e12})  # absurd learning rate: the weights blow up
    meta = train(setup["syn"], setup["same"], out, cfg, emulator=setup["emu"], progress=False)
    assert meta["status"] == "diverged" and meta["final"]["epoch"] < 6
    rows = read_history(out)
    assert rows[-1]["monitor"] in ("non-finite loss", "runaway loss")
    load(out)  # the folder keeps a usable model


def test_resume_after_kill(setup, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-m", "chemtwin", "-q", "cyclestarnet", "train", str(setup["syn"]), str(setup["same"]),
            "-o", str(out), "--emulator", str(setup["emu"]), "--epochs", "400", "--hidden", "48", "--latent", "8",
            "--split", "2", "--batch-size", "32", "--threads", "1"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not (len(read_history(out)) >= 2 if (out / "history.csv").exists() else False):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_folder(out)["status"] == "training" and (out / "checkpoint.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint.safetensors"), "pt") as f:
        epoch = json.loads(f.metadata()["chemtwin"])["state"]["epoch"]
    assert epoch >= 1
    assert main(["-q", "cyclestarnet", "train", str(setup["syn"]), str(setup["same"]), "-o", str(out), "--resume",
                 "--epochs", str(epoch + 2), "--threads", "1"]) == 0
    meta = read_folder(out)
    rows = read_history(out)
    assert meta["status"] == "finished" and meta["final"]["epoch"] == epoch + 2
    assert [int(r["epoch"]) for r in rows] == list(range(1, epoch + 3))


def test_commands_fit_embed_tsne(setup, tmp_path, capsys):
    model = str(setup["model"])
    assert main(["-q", "cyclestarnet", "fit", model, str(setup["same"]), "-o", str(tmp_path / "l.h5"),
                 "--mode", "residual", "--threads", "1"]) == 0
    with __import__("h5py").File(tmp_path / "l.h5") as f:
        assert f["labels"].shape == (96, 6)  # the labels and the fitted z_sp (ZSP_0, ZSP_1)
    assert main(["-q", "cyclestarnet", "embed", model, str(setup["same"]), "-o", str(tmp_path / "z.h5")]) == 0
    assert main(["-q", "evaluate", "--latents", str(tmp_path / "z.h5"), str(setup["same"]),
                 "-o", str(tmp_path / "e.json")]) == 0
    assert main(["-q", "evaluate", "--method", "cyclestarnet", model, str(setup["same"]),
                 "-o", str(tmp_path / "e2.json")]) == 0
    assert json.loads((tmp_path / "e2.json").read_text())["n_pairs"] > 0
    assert main(["-q", "evaluate", "--method", "cyclestarnet-payne", model, str(setup["same"]),
                 "-o", str(tmp_path / "e3.json")]) == 0
    e3 = json.loads((tmp_path / "e3.json").read_text())
    assert e3["model"]["free_split"] and e3["label_fit"]["labels"] == NAMES + ["ZSP_0", "ZSP_1"]
    assert set(e3["label_fit"]["accuracy"]) == set(NAMES)  # scored on the labels the data has a truth for
    assert main(["-q", "cyclestarnet", "tsne", str(setup["syn"]), str(setup["same"]), "--raw", str(setup["syn"]),
                 "--model", model, "--stars", "40", "-o", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").stat().st_size > 10_000


def _one_line_exit_2(argv, capsys, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chemtwin cyclestarnet"), err
    for w in words:
        assert w in err, err


def test_bad_input_is_one_line_exit_2(setup, tmp_path, capsys):
    root = setup["root"]
    other = write_fake(tmp_path / "other.h5", n_groups=8, n_pixels=50, label_names=NAMES)
    _one_line_exit_2(["cyclestarnet", "train", str(setup["syn"]), str(other), "-o", str(tmp_path / "a"),
                      "--emulator", str(setup["emu"])], capsys, "wavelength grid")
    unlabelled = write_fake(tmp_path / "nolabels.h5", n_groups=8, n_pixels=60, label_names=["TEFF", "LOGG"])
    _one_line_exit_2(["cyclestarnet", "train", str(unlabelled), str(setup["same"]), "-o", str(tmp_path / "b"),
                      "--emulator", str(setup["emu"])], capsys, "FE_H")
    _one_line_exit_2(["cyclestarnet", "train", str(unlabelled), str(setup["same"]), "-o", str(tmp_path / "b")],
                     capsys, "needs labels")
    fader = tmp_path / "fader"
    fader.mkdir()
    (fader / "config.json").write_text(json.dumps({"format": "chemtwin-fader", "config": {}}))
    _one_line_exit_2(["cyclestarnet", "fit", str(fader), str(setup["same"]), "-o", str(tmp_path / "l.h5")], capsys,
                     "not a Cycle-StarNet model folder", "chemtwin-fader")
    _one_line_exit_2(["cyclestarnet", "embed", str(root), str(setup["same"]), "-o", str(tmp_path / "z.h5")], capsys,
                     "not a Cycle-StarNet")
    assert not (tmp_path / "a").exists() and not (tmp_path / "l.h5").exists()
    with pytest.raises(InputError):
        CycleConfig(latent=0)
