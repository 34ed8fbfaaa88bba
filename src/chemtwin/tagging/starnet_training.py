"""StarNet's model folder, training loop and prediction (the network: ``tagging/starnet.py``).

Model folder (``chemtwin starnet train --out DIR``; ``FORMAT`` "chemtwin-starnet",
``FORMAT_VERSION`` 1; docs/starnet.md), the files of a fader model folder with their own
content, written with the same machinery (``model_folder``: atomic writes, the folder lock,
checkpoints in safetensors with their JSON state, the history's truncation on resume):

* ``config.json``             ``format``, ``format_version``, ``chemtwin_version``, ``config``
                              (``StarNetConfig.to_dict()``), ``n_pixels``, ``status``, ``data``,
                              and once stopped ``final``
* ``model.safetensors``       weights, the label statistics and ``data.wavelength``
* ``checkpoint.safetensors``  weights, Adam's state and the counters, at every epoch end, at
                              the time limit and on Ctrl-C / SIGTERM
* ``history.csv``             one row per epoch (``HISTORY_COLUMNS``)

Training holds the training set in memory (float32 flux and ivar: 58 MB per 1,000 APOGEE
spectra).  Each epoch's order is drawn from (seed, epoch) and each batch's augmentation from
(seed, step), so a resumed run continues exactly where the checkpoint stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from chemtwin import __version__
from chemtwin.core.files import atomic_output, describe_error
from chemtwin.data.spectra import check_spectra
from chemtwin.errors import InputError
from chemtwin.tagging import model_folder
from chemtwin.tagging.model_folder import Status
from chemtwin.tagging.starnet import StarNetConfig, StarNetModel, loss_fn
from chemtwin.tagging.training import check_out_dir, pick_device
from chemtwin.tagging.training_data import split_by_group

log = logging.getLogger(__name__)

FORMAT = "chemtwin-starnet"
FORMAT_VERSION = 1
HISTORY_COLUMNS = ("epoch", "step", "time_s", "lr", "train_loss", "val_loss", "val_rmse", "val_pull_std")
PREDICT_BATCH = 512
STATISTICS_STARS = 5000  # training stars (augmented) behind the per-pixel input statistics


@dataclass
class Arrays:
    """A labelled training set in memory: flux, ivar (N, P), labels (N, L), group (N,), wavelength (P,)."""

    flux: np.ndarray
    ivar: np.ndarray
    labels: np.ndarray
    group: np.ndarray
    wavelength: np.ndarray | None
    source: str = "arrays"

    @classmethod
    def checked(cls, flux, ivar, labels, names, group=None, wavelength=None, source="arrays") -> Arrays:
        """Valid spectra with finite labels; rows without a measured pixel are dropped (InputError
        names the first bad row, pixel or label)."""
        flux, ivar = np.asarray(flux, np.float32), np.asarray(ivar, np.float32)
        usable = check_spectra(flux, ivar, source=source)
        labels = np.asarray(labels, np.float64).reshape(len(flux), len(names))
        bad = ~np.isfinite(labels) & usable[:, None]
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise InputError(f"{source}: label {names[col]} is missing (NaN) for {int(bad.any(1).sum())} training "
                             f"star(s) (first: row {row})")
        group = np.arange(len(flux)) if group is None else np.asarray(group, np.int64)
        if not usable.any():
            raise InputError(f"{source}: no training star has a measured pixel (ivar > 0)")
        return cls(flux[usable], ivar[usable], labels[usable], group[usable], wavelength, source)

    @classmethod
    def from_dataset(cls, ds, names, rows=None) -> Arrays:
        """The rows (all when None) of an open dataset, labels ``names`` (InputError naming missing ones)."""
        columns = ds.label_columns(names)
        batch = ds.read() if rows is None else ds.take(np.asarray(rows))
        return cls.checked(batch.flux, batch.ivar, batch.labels[:, columns], list(names), batch.group, ds.wavelength,
                           str(ds.path))


# ------------------------------------------------------------------------------------ the folder
def read_starnet_dir(model_dir) -> dict:
    """config.json of a StarNet model folder; InputError (one line) for anything else, a fader
    model folder included."""
    d = Path(model_dir)
    if not d.is_dir():
        raise InputError(f"{d}: no such model directory")
    try:
        meta = json.loads((d / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        raise InputError(f"{d}: not a StarNet model (no readable config.json)") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt == model_folder.FORMAT:
        raise InputError(f"{d}: a fader model folder (chemtwin train wrote it), not a StarNet model")
    if fmt != FORMAT:
        raise InputError(f"{d}: not a StarNet model (config.json has no format {FORMAT!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(f"{d}: StarNet folder format {meta['format_version']} is newer than this chemtwin reads")
    model_folder.check_config(d, meta, StarNetConfig)
    return meta


def save_model(out_dir, model: StarNetModel, labels, wavelength=None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    model_folder._check_finite(tensors, f"{out_dir}: refusing to save a model")
    if wavelength is not None:
        tensors["data.wavelength"] = torch.as_tensor(np.asarray(wavelength, dtype=np.float64))
    with atomic_output(Path(out_dir) / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"labels": json.dumps(list(labels))})


def load_model(model_dir, device="cpu") -> tuple[StarNetModel, dict, np.ndarray | None]:
    """(network, config.json, wavelength or None) of a StarNet model folder."""
    meta = read_starnet_dir(model_dir)
    cfg = StarNetConfig.from_dict(meta["config"])
    tensors, recorded, wavelength = model_folder.read_weights(
        model_dir, "labels", "no model.safetensors (training never reached a checkpoint)")
    if recorded is not None and recorded != json.dumps(list(cfg.labels)):
        raise InputError(f"{model_dir}: config.json names labels {', '.join(cfg.labels)}, the weights {recorded}")
    model = StarNetModel(cfg, int(meta["n_pixels"]))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise InputError(f"{model_dir}: model.safetensors does not match config.json ({describe_error(exc)})") from None
    return model.to(device).eval(), meta, None if wavelength is None else wavelength.numpy()


# ------------------------------------------------------------------------------------ prediction
@torch.no_grad()
def predict_arrays(model: StarNetModel, flux, ivar, row0: int = 0, source: str = "input") -> tuple[np.ndarray, np.ndarray]:
    """(labels, sigma) float64 (N, L) of a batch; NaN for rows without a measured pixel."""
    flux, ivar = np.asarray(flux), np.asarray(ivar)
    usable = check_spectra(flux, ivar, row0, source)
    if flux.shape[1] != model.n_pixels:
        raise InputError(f"{source}: spectra have {flux.shape[1]} pixels, the StarNet model {model.n_pixels}")
    mean = np.full((len(flux), model.n_labels), np.nan)
    sigma = np.full_like(mean, np.nan)
    model.eval()
    rows = np.flatnonzero(usable)
    for a in range(0, rows.size, PREDICT_BATCH):
        r = rows[a : a + PREDICT_BATCH]
        m, s = model.predict(model.encode(flux[r], ivar[r]))
        mean[r], sigma[r] = m.double().cpu().numpy(), s.double().cpu().numpy()
    return mean, sigma


def predict_dataset(model: StarNetModel, ds, start: int = 0, stop: int | None = None, rows=None,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(labels, sigma) of rows [start, stop) of an open dataset (or of ``rows``), streamed."""
    if ds.n_pixels != model.n_pixels:
        raise InputError(f"{ds.path}: spectra have {ds.n_pixels} pixels, the StarNet model {model.n_pixels}")
    parts = []
    n = (ds.n_stars if stop is None else stop) - start if rows is None else len(rows)
    with tqdm(total=n, desc="starnet predict", unit="star", disable=not progress, leave=False) as bar:
        for a in range(0, n, 4 * PREDICT_BATCH):
            b = min(a + 4 * PREDICT_BATCH, n)
            batch = ds.read(start + a, start + b) if rows is None else ds.take(np.asarray(rows[a:b]))
            parts.append(predict_arrays(model, batch.flux, batch.ivar, start + a, str(ds.path)))
            bar.update(b - a)
    if not parts:
        return np.zeros((0, model.n_labels)), np.zeros((0, model.n_labels))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ------------------------------------------------------------------------------------ training
class _Run:
    """One training run into ``out``: the network, Adam, the split and the counters."""

    def __init__(self, cfg: StarNetConfig, data: Arrays, out: Path, device, resume: bool, t0: float):
        self.cfg, self.data, self.out, self.device, self.t0 = cfg, data, out, device, t0
        self.ckpt, self.hist = out / "checkpoint.safetensors", out / "history.csv"
        val = split_by_group(data.group, cfg.val_fraction, cfg.seed) if cfg.val_fraction > 0 else np.zeros(len(data.group), bool)
        if val.all():
            val[:] = False
        self.train_rows, self.val_rows = np.flatnonzero(~val), np.flatnonzero(val)
        self.augmenter = cfg.augmenter()
        torch.manual_seed(cfg.seed)
        self.model = StarNetModel(cfg, data.flux.shape[1])
        self.model.set_label_statistics(data.labels[self.train_rows])
        # the input statistics of the spectra as the network sees them: augmented when they are
        sample = self.train_rows[:STATISTICS_STARS]
        flux, ivar = data.flux[sample], data.ivar[sample]
        if self.augmenter is not None:
            flux, ivar = self.augmenter(flux, ivar, data.wavelength, np.random.default_rng([cfg.seed, 2**32 + 1]))
        self.model.set_flux_statistics(flux, ivar)
        self.model.to(device).train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.state = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "elapsed": 0.0, "loss_sum": 0.0, "n": 0}
        summary = {"train": data.source, "n_train": int(self.train_rows.size), "n_val": int(self.val_rows.size)}
        if resume:
            before = read_starnet_dir(out).get("data") or {}
            if any(before.get(k) != summary[k] for k in ("n_train", "n_val")):
                raise InputError(f"{out}: the checkpoint was trained on other data ({before.get('n_train')} training / "
                                 f"{before.get('n_val')} validation stars; now {summary['n_train']} / "
                                 f"{summary['n_val']}); resume with the same dataset")
            _, self.state = model_folder.load_checkpoint(self.ckpt, self.model, {"opt": self.opt}, device)
            model_folder.truncate_history(self.hist, self.state["step"], HISTORY_COLUMNS)
            log.info("resuming at epoch %d, step %d", self.state["epoch"], self.state["step"])
        self.val_x = self.val_y = None
        if self.val_rows.size:
            flux, ivar = data.flux[self.val_rows], data.ivar[self.val_rows]
            if self.augmenter is not None:  # the validation stars as the training stars are seen, drawn once
                flux, ivar = self.augmenter(flux, ivar, data.wavelength, np.random.default_rng([cfg.seed, 2**32]))
            self.val_x, self.val_y = self.model.encode(flux, ivar).cpu(), torch.as_tensor(data.labels[self.val_rows], dtype=torch.float32)
        self.meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "chemtwin_version": __version__,
                     "config": cfg.to_dict(), "n_pixels": int(data.flux.shape[1]), "status": Status.TRAINING.value,
                     "data": summary}
        model_folder.write_config(out, self.meta)
        self.steps_per_epoch = math.ceil(self.train_rows.size / cfg.batch_size)
        self.elapsed0 = self.state["elapsed"]

    def elapsed(self) -> float:
        return self.elapsed0 + time.monotonic() - self.t0

    def batches(self, epoch: int):
        order = self.train_rows[np.random.default_rng([self.cfg.seed, epoch]).permutation(self.train_rows.size)]
        for k in range(self.state["batch_in_epoch"], self.steps_per_epoch):
            yield np.sort(order[k * self.cfg.batch_size : (k + 1) * self.cfg.batch_size])

    def step(self, rows: np.ndarray) -> None:
        d, st = self.data, self.state
        flux, ivar = d.flux[rows], d.ivar[rows]
        if self.augmenter is not None:
            flux, ivar = self.augmenter(flux, ivar, d.wavelength, np.random.default_rng([self.cfg.seed, st["step"]]))
        x = self.model.encode(flux, ivar)
        y = self.model.standardise(torch.as_tensor(d.labels[rows], dtype=torch.float32).to(self.device))
        loss = loss_fn(*self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        st["step"] += 1
        st["batch_in_epoch"] += 1
        st["loss_sum"] += loss.item()
        st["n"] += 1

    @torch.no_grad()
    def validate(self) -> dict:
        if self.val_x is None:
            return {}
        self.model.eval()
        parts = [self.model(self.val_x[a : a + PREDICT_BATCH].to(self.device))
                 for a in range(0, len(self.val_x), PREDICT_BATCH)]
        self.model.train()
        mean, log_var = (torch.cat(p).cpu() for p in zip(*parts))
        y = self.model.standardise(self.val_y)
        pull = (y - mean) / torch.exp(0.5 * log_var)
        return {"val_loss": loss_fn(mean, log_var, y).item(), "val_rmse": float(torch.sqrt(((y - mean) ** 2).mean())),
                "val_pull_std": float(pull.std())}

    def checkpoint(self, complete: bool) -> dict:
        st = self.state
        row = {"epoch": st["epoch"] + st["batch_in_epoch"] / self.steps_per_epoch, "step": st["step"], "lr": self.cfg.lr,
               "train_loss": st["loss_sum"] / max(st["n"], 1), **self.validate()}
        if complete:
            st.update(epoch=st["epoch"] + 1, batch_in_epoch=0, loss_sum=0.0, n=0)
            row["epoch"] = st["epoch"]
        row["time_s"] = st["elapsed"] = self.elapsed()
        model_folder.append_history(self.hist, row, HISTORY_COLUMNS)
        model_folder.save_checkpoint(self.ckpt, self.model, {"opt": self.opt}, torch.zeros(1, dtype=torch.uint8), st)
        save_model(self.out, self.model, self.cfg.labels, self.data.wavelength)
        return row

    def run(self, progress: bool) -> dict:
        cfg, st = self.cfg, self.state
        total = cfg.epochs * self.steps_per_epoch
        bar = tqdm(total=total, initial=st["step"], disable=not progress, desc="starnet", unit="step", dynamic_ncols=True)
        row, stopped = {}, False
        try:
            while st["epoch"] < cfg.epochs and not stopped:
                for rows in self.batches(st["epoch"]):
                    if cfg.time_limit and self.elapsed() >= cfg.time_limit:
                        stopped = True
                        break
                    self.step(rows)
                    bar.update(1)
                    if st["step"] % 10 == 0:
                        bar.set_postfix(loss=f"{st['loss_sum'] / st['n']:.3g}", refresh=False)
                else:
                    row = self.checkpoint(True)
                    bar.set_postfix(loss=f"{row['train_loss']:.3g}", val_rmse=f"{row.get('val_rmse', math.nan):.3g}")
                    continue
                if st["batch_in_epoch"]:
                    row = self.checkpoint(False)
        except KeyboardInterrupt:
            if st["batch_in_epoch"]:
                self.checkpoint(False)
            raise
        finally:
            bar.close()
        status = Status.FINISHED if st["epoch"] >= cfg.epochs else Status.TIME_LIMIT
        self.meta["status"] = status.value
        self.meta["final"] = {k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.meta["final"].update(epoch=st["epoch"], step=st["step"], time_s=self.elapsed())
        model_folder.write_config(self.out, self.meta)
        return self.meta["final"]


def train(data: Arrays, out_dir, cfg: StarNetConfig, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Train (or with ``resume`` continue) a StarNet into the model folder ``out_dir`` on ``data``
    (``Arrays``: ``Arrays.from_dataset`` or ``Arrays.checked``); returns the final metrics."""
    t0 = time.monotonic()
    out = Path(out_dir)
    device = pick_device(cfg.device)
    resumable = check_out_dir(out, resume, overwrite, read=read_starnet_dir)
    overwrite, resume = overwrite or (resume and not resumable), resumable
    if not resume and out.is_dir() and (out / "config.json").exists():
        read_starnet_dir(out)  # --overwrite replaces a StarNet folder, not a model of another kind
    out.mkdir(exist_ok=True)
    with model_folder.exclusive(out):
        model_folder.remove_stale_temporaries(out)
        if not resume:
            if not overwrite and any(out.iterdir()):
                raise InputError(f"{out} is not empty; pass overwrite=True to replace it", "overwrite")
            model_folder.clear(out)
        return _Run(cfg, data, out, device, resume, t0).run(progress)
