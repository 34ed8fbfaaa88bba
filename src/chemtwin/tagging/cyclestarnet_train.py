"""Training Cycle-StarNet, and its model folder (read and written here only; docs/cyclestarnet.md).

Folder layout (``FORMAT`` "chemtwin-cyclestarnet", ``FORMAT_VERSION`` 1):

* ``config.json``             ``format``, ``format_version``, ``chemtwin_version``, ``config``
                              (``CycleConfig.to_dict()``), ``n_pixels``, ``status`` (``STATUSES``),
                              ``data`` (the two domains), ``emulator`` (where it came from), ``final``
* ``emulator.npz``            the synthetic domain's Payne emulator (public MLP layout)
* ``model.safetensors``       the network after the last good epoch (+ ``data.wavelength``)
* ``checkpoint.safetensors``  weights, optimiser and RNG states, counters (``model_folder``'s format)
* ``history.csv``             one row per epoch: ``HISTORY_COLUMNS`` (the stability monitor's log)

The synthetic domain is the emulator's spectra at the synthetic file's labels (noiseless); the
observed domain is the observed file's spectra, whose labels (if any) are never read.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from chemtwin import __version__
from chemtwin.core.files import atomic_output, check_free_space, describe_error, write_json
from chemtwin.data.dataset import open_dataset
from chemtwin.data.spectra import check_spectra, pixel_weights
from chemtwin.errors import InputError
from chemtwin.spectral_models.payne import PayneEmulator
from chemtwin.tagging import model_folder
from chemtwin.tagging.cyclestarnet import CycleConfig, CycleEmulator, CycleStarNet, losses
from chemtwin.tagging.payne_train import train_emulator

log = logging.getLogger(__name__)

FORMAT = "chemtwin-cyclestarnet"
FORMAT_VERSION = 1
FILES = ("config.json", "emulator.npz", "model.safetensors", "checkpoint.safetensors", "history.csv")
HISTORY_COLUMNS = ("epoch", "step", "time_s", "gan", "rec_syn", "rec_obs", "cycle", "adv_g", "adv_d", "monitor")
STATUSES = ("training", "finished", "stopped at the time limit", "diverged")


# ---------------------------------------------------------------------------------------------- data
def _load_domains(syn_path, obs_path, emulator: PayneEmulator, max_stars: int | None):
    """Synthetic spectra (emulated at the synthetic file's labels) and the observed spectra,
    weights and noise, as tensors; InputError for missing labels or another pixel grid."""
    with open_dataset(syn_path) as syn, open_dataset(obs_path) as obs:
        if syn.n_pixels != obs.n_pixels or not np.allclose(syn.wavelength, obs.wavelength, rtol=1e-7, atol=0):
            raise InputError(f"{obs.path}: its wavelength grid ({obs.n_pixels} pixels) differs from {syn.path}'s "
                             f"({syn.n_pixels} pixels); resample it onto the synthetic grid first")
        if emulator.n_pixels != syn.n_pixels:
            raise InputError(f"{syn.path}: spectra have {syn.n_pixels} pixels, the emulator {emulator.n_pixels}")
        labels = np.asarray(syn.labels(emulator.label_names), dtype=np.float64)[:max_stars]
        bad = ~np.isfinite(labels).all(1)
        if bad.any():
            raise InputError(f"{syn.path}: row {int(np.flatnonzero(bad)[0])} has NaN labels; the synthetic domain needs "
                             "every label")
        batch = obs.read(0, min(obs.n_stars, max_stars or obs.n_stars))
        check_spectra(batch.flux, batch.ivar, source=str(obs.path))
        summary = {"synthetic": str(syn.path), "observed": str(obs.path), "n_syn": int(len(labels)),
                   "n_obs": int(len(batch.flux))}
        wavelength = syn.wavelength
    xs = torch.from_numpy(emulator.predict(labels, allow_extrapolation=True).astype(np.float32))
    wo = pixel_weights(batch.ivar)
    ivar = np.where(np.isfinite(batch.ivar) & (batch.ivar > 0), batch.ivar, np.inf)
    sigma = np.where(wo > 0, 1.0 / np.sqrt(ivar), 0.0).astype(np.float32)
    xo = np.where(wo > 0, batch.flux, 1.0).astype(np.float32)
    return xs, torch.from_numpy(xo), torch.from_numpy(wo), torch.from_numpy(sigma), summary, wavelength


# ---------------------------------------------------------------------------------------------- folder
def read_folder(folder) -> dict:
    """config.json of a Cycle-StarNet folder; InputError when it is not one (naming what it is)."""
    d = Path(folder)
    if not d.is_dir():
        raise InputError(f"{d}: no such model folder")
    try:
        meta = json.loads((d / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        raise InputError(f"{d}: not a Cycle-StarNet model folder (no readable config.json)") from None
    kind = meta.get("format") if isinstance(meta, dict) else None
    if kind != FORMAT:
        raise InputError(f"{d}: not a Cycle-StarNet model folder (its format is {kind!r}, not {FORMAT!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(f"{d}: format version {meta.get('format_version')} is newer than this chemtwin reads")
    try:
        CycleConfig.from_dict(meta["config"])
    except (KeyError, TypeError) as exc:
        raise InputError(f"{d}: config.json is invalid ({describe_error(exc)})") from None
    return meta


def load(folder, mode: str = "full", split_box=None) -> tuple[CycleStarNet, PayneEmulator, CycleEmulator, dict]:
    """(network, plain emulator, adapted emulator, config.json) of a trained folder (``split_box``:
    see ``CycleEmulator``; ``split_box_of`` gives one for a set of observed spectra)."""
    meta = read_folder(folder)
    d = Path(folder)
    if not (d / "model.safetensors").is_file():
        raise InputError(f"{d}: no model.safetensors (training never finished an epoch)")
    net = CycleStarNet(CycleConfig.from_dict(meta["config"]), int(meta["n_pixels"]))
    try:
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors.pop("data.wavelength", None)
        net.load_state_dict(tensors)
    except Exception as exc:  # safetensors' own errors, or weights that do not fit config.json
        raise InputError(f"{d}: model.safetensors is unusable ({describe_error(exc)})") from None
    emulator = PayneEmulator.load(d / "emulator.npz")
    return net.eval(), emulator, CycleEmulator(emulator, net, mode, source=f"{d} ({mode})", split_box=split_box), meta


def read_history(folder) -> list[dict]:
    path = Path(folder) / "history.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _truncate_history(path: Path, epoch: int) -> None:
    rows = [r for r in read_history(path.parent) if int(float(r["epoch"])) <= epoch]
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def _save_model(out: Path, net: CycleStarNet, wavelength) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors["data.wavelength"] = torch.as_tensor(np.asarray(wavelength, dtype=np.float64))
    with atomic_output(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp))


# ---------------------------------------------------------------------------------------------- training
def _epoch_means(sums: dict, n: int) -> dict:
    return {k: v / max(n, 1) for k, v in sums.items()}


@torch.no_grad()
def _split_mean(net: CycleStarNet, xo, wo, batch: int = 512) -> torch.Tensor:
    return torch.cat([net.encode_obs(xo[a : a + batch], wo[a : a + batch])[1] for a in range(0, len(xo), batch)]).mean(0)


def train(syn_path, obs_path, out_dir, cfg: CycleConfig | None = None, *, emulator=None,
          emulator_time_limit: float = 120.0, max_stars: int | None = None, resume: bool = False,
          overwrite: bool = False, progress: bool = True) -> dict:
    """Train Cycle-StarNet from a labelled synthetic file and an unlabelled observed file into
    ``out_dir``; returns config.json's contents.  ``emulator``: a Payne emulator (.npz or object)
    of the synthetic domain; None trains one on the synthetic file (``emulator_time_limit`` s)."""
    cfg = cfg or CycleConfig()
    t0 = time.monotonic()
    out = Path(out_dir)
    check_free_space(out / "checkpoint.safetensors", what="a model folder")
    resumable = resume and (out / "checkpoint.safetensors").is_file()
    if resume and out.exists():
        read_folder(out)
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"{out} is not empty; pass overwrite=True to replace it or resume=True to continue",
                             "overwrite", "resume")
        if not (out / "config.json").exists():
            raise InputError(f"{out} is not empty and holds no chemtwin model; refusing to overwrite it")
        read_folder(out)
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    # the emulator: the folder's own when resuming, else given or trained here
    emu_info = {}
    if resumable:  # the folder's settings, with the run length asked for now
        saved = read_folder(out)
        cfg = dataclasses.replace(CycleConfig.from_dict(saved["config"]), epochs=cfg.epochs, time_limit=cfg.time_limit)
        emulator, emu_info = PayneEmulator.load(out / "emulator.npz"), saved.get("emulator", {})
    if not resumable and emulator is None:
        emulator, report = train_emulator(syn_path, labels=_emulator_labels(syn_path), hidden=300, epochs=None,
                                          time_limit=emulator_time_limit, max_stars=max_stars, seed=cfg.seed,
                                          progress=progress)
        emu_info = {"source": f"trained on {syn_path}", "epochs": report.epochs, "train_s": report.seconds,
                    "val_median_abs_error": report.val_median_abs_error}
    elif not resumable:
        if not isinstance(emulator, PayneEmulator):
            emu_info = {"source": os.path.abspath(str(emulator))}
            emulator = PayneEmulator.load(emulator)
        else:
            emu_info = {"source": str(emulator.source)}
    xs, xo, wo, sigma, summary, wavelength = _load_domains(syn_path, obs_path, emulator, max_stars)
    out.mkdir(exist_ok=True)
    with model_folder.exclusive(out):
        model_folder.remove_stale_temporaries(out)
        if not resumable:
            for name in FILES:
                (out / name).unlink(missing_ok=True)
            emulator.save(out / "emulator.npz", overwrite=True)
        return _Run(cfg, out, emulator, emu_info, xs, xo, wo, sigma, summary, wavelength, resumable, t0).run(progress)


def _emulator_labels(syn_path) -> list[str]:
    """TEFF, LOGG, FE_H, the X_FE (+ VMICRO/VMACRO where independent) of the synthetic file."""
    from chemtwin.spectral_models.labels import CHEMICAL_LABELS

    with open_dataset(syn_path) as syn:
        names = [n for n in ("TEFF", "LOGG") + tuple(CHEMICAL_LABELS) if n in syn.label_names]
        if not {"TEFF", "LOGG"} <= set(names) or len(names) < 3:
            raise InputError(f"{syn.path}: the synthetic domain needs labels (TEFF, LOGG and abundances); it has "
                             f"{', '.join(syn.label_names) or 'none'}")
        values = np.asarray(syn.labels(names), dtype=np.float64)
    keep = [n for k, n in enumerate(names) if np.nanstd(values[:, k]) > 0]
    return keep


class _Run:
    """One training run: the network, its two optimisers and the stability monitor."""

    def __init__(self, cfg, out, emulator, emu_info, xs, xo, wo, sigma, summary, wavelength, resume, t0):
        self.cfg, self.out, self.t0 = cfg, out, t0
        self.xs, self.xo, self.wo, self.sigma, self.wavelength = xs, xo, wo, sigma, wavelength
        torch.manual_seed(cfg.seed)
        net = self.net = CycleStarNet(cfg, xs.shape[1])
        net.center.copy_(xs.mean(0))
        net.scale.copy_(xs.std(0).clamp_min(0.01))
        self.opts = {"opt_ae": torch.optim.Adam(net.autoencoder_parameters(), lr=cfg.lr),
                     "opt_disc": torch.optim.Adam(net.disc_parameters(), lr=cfg.lr_disc, betas=(0.5, 0.999))}
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.state = {"epoch": 0, "step": 0, "elapsed": 0.0, "best": None}
        self.ckpt, self.hist = out / "checkpoint.safetensors", out / "history.csv"
        if resume:
            before = read_folder(out).get("data", {})
            if (before.get("n_syn"), before.get("n_obs")) != (summary["n_syn"], summary["n_obs"]):
                raise InputError(f"{out}: the checkpoint was trained on other data ({before.get('n_syn')} synthetic / "
                                 f"{before.get('n_obs')} observed stars, now {summary['n_syn']} / {summary['n_obs']})")
            shuffle, self.state = model_folder.load_checkpoint(self.ckpt, net, self.opts, "cpu")
            self.gen.set_state(shuffle)
            _truncate_history(self.hist, self.state["epoch"])
            log.info("cyclestarnet: resuming at epoch %d", self.state["epoch"])
        self.meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "chemtwin_version": __version__,
                     "config": cfg.to_dict(), "n_pixels": int(xs.shape[1]), "status": "training", "data": summary,
                     "emulator": emu_info}
        write_json(out / "config.json", self.meta)
        if not resume:  # the starting point (identical domains) is the "last good model" until an epoch ends
            net.split_mean.copy_(_split_mean(net, xo, wo))
            _save_model(out, net, wavelength)
        self.elapsed0 = self.state["elapsed"]

    def elapsed(self) -> float:
        return self.elapsed0 + time.monotonic() - self.t0

    def epoch(self) -> dict:
        cfg, net, st = self.cfg, self.net, self.state
        gan = st["epoch"] >= cfg.warmup_epochs and cfg.w_adv > 0
        n_o, n_s, bs = len(self.xo), len(self.xs), cfg.batch_size
        perm_o, perm_s = torch.randperm(n_o, generator=self.gen), torch.randperm(n_s, generator=self.gen)
        sums, n = {}, 0
        for a in range(0, n_o, bs):
            io = perm_o[a : a + bs]
            i_s = perm_s[torch.arange(a, a + len(io)) % n_s]
            parts, ae, d = losses(net, self.xs[i_s], self.xo[io], self.wo[io], self.sigma[io], gan, self.gen)
            if not torch.isfinite(ae) or (d is not None and not torch.isfinite(d)):
                return {"monitor": "non-finite loss"}
            self.opts["opt_ae"].zero_grad(set_to_none=True)
            ae.backward()
            torch.nn.utils.clip_grad_norm_(net.autoencoder_parameters(), cfg.clip) if cfg.clip else None
            self.opts["opt_ae"].step()
            if d is not None:
                self.opts["opt_disc"].zero_grad(set_to_none=True)
                d.backward()
                torch.nn.utils.clip_grad_norm_(net.disc_parameters(), cfg.clip) if cfg.clip else None
                self.opts["opt_disc"].step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            n += 1
            st["step"] += 1
        return {"gan": int(gan), **_epoch_means(sums, n)}

    def run(self, progress: bool) -> dict:
        cfg, st = self.cfg, self.state
        status = "finished"
        bar = tqdm(total=cfg.epochs, initial=st["epoch"], desc="cyclestarnet", unit="epoch", disable=not progress)
        try:
            while st["epoch"] < cfg.epochs:
                row = self.epoch()
                watched = row.get("rec_obs", math.nan) + row.get("cycle", math.nan)
                if "monitor" in row or not math.isfinite(watched):
                    status = "diverged"
                    log.warning("cyclestarnet: epoch %d: a loss is not finite; stopped, the folder keeps the model "
                                "of the last good epoch", st["epoch"] + 1)
                    self._log({**row, "epoch": st["epoch"] + 1, "step": st["step"], "time_s": self.elapsed(),
                               "monitor": "non-finite loss"})
                    break
                best = st["best"]
                runaway = row["gan"] and best is not None and watched > cfg.diverge_factor * best
                st["epoch"] += 1
                row.update(epoch=st["epoch"], step=st["step"], time_s=self.elapsed(),
                           monitor="runaway loss" if runaway else "ok")
                self._log(row)
                if runaway:
                    status = "diverged"
                    log.warning("cyclestarnet: epoch %d: observed + cycle loss %.3g is over %g x its best %.3g; "
                                "stopped, the folder keeps the model of the last good epoch", st["epoch"], watched,
                                cfg.diverge_factor, best)
                    break
                st["best"] = watched if best is None else min(best, watched)
                st["elapsed"] = self.elapsed()
                self.net.split_mean.copy_(_split_mean(self.net, self.xo, self.wo))
                model_folder.save_checkpoint(self.ckpt, self.net, self.opts, self.gen.get_state(), st)
                _save_model(self.out, self.net, self.wavelength)
                bar.update(1)
                bar.set_postfix(rec_obs=f"{row['rec_obs']:.3g}", cycle=f"{row['cycle']:.3g}",
                                adv_d=f"{row.get('adv_d', math.nan):.3g}")
                if cfg.time_limit and self.elapsed() >= cfg.time_limit and st["epoch"] < cfg.epochs:
                    status = "stopped at the time limit"
                    break
        finally:
            bar.close()
        self.meta["status"] = status
        self.meta["final"] = {"epoch": st["epoch"], "step": st["step"], "time_s": self.elapsed()}
        write_json(self.out / "config.json", self.meta)
        return self.meta

    def _log(self, row: dict) -> None:
        model_folder.append_history(self.hist, row, HISTORY_COLUMNS)


# ---------------------------------------------------------------------------------------------- use
@torch.no_grad()
def shared_latents(net: CycleStarNet, flux, ivar, batch: int = 512) -> np.ndarray:
    """z_sh (N, latent) of observed spectra (pixels of ivar 0 are ignored)."""
    w = torch.from_numpy(pixel_weights(ivar))
    x = torch.from_numpy(np.where(w.numpy() > 0, flux, 1.0).astype(np.float32))
    return torch.cat([net.encode_obs(x[a : a + batch], w[a : a + batch])[0] for a in range(0, len(x), batch)]).numpy()


@torch.no_grad()
def split_box_of(net: CycleStarNet, flux, ivar, margin: float = 0.1, batch: int = 512):
    """(lo, hi) of the split latent z_sp of observed spectra (their 0.5-99.5 percentiles, widened by
    ``margin`` of the range on each side): the box a fit with free z_sp searches."""
    w = torch.from_numpy(pixel_weights(ivar))
    x = torch.from_numpy(np.where(w.numpy() > 0, flux, 1.0).astype(np.float32))
    zp = torch.cat([net.encode_obs(x[a : a + batch], w[a : a + batch])[1] for a in range(0, len(x), batch)]).numpy()
    lo, hi = np.percentile(zp, [0.5, 99.5], axis=0)
    pad = margin * (hi - lo) + 1e-6
    return lo - pad, hi + pad


@torch.no_grad()
def map_syn_to_obs(net: CycleStarNet, flux) -> np.ndarray:
    """Synthetic spectra (N, P) mapped to the observed domain (z_sp at the observed mean)."""
    return net.syn_to_obs(torch.as_tensor(np.asarray(flux, dtype=np.float32))).numpy()
