"""Training loop of the fader model: data preparation, alternating updates, checkpoints.

``train(source, out_dir, cfg)`` is all of it.  One pass over the data first validates
it (NaN flux where ivar > 0 and NaN/negative ivar are errors naming the row; rows whose
ivar is all zero are skipped and counted) and collects the training statistics (per-pixel
mean/std, label range).  The training rows are then held in memory when they fit in
``cfg.max_memory_gb`` and otherwise streamed from the HDF5 file in shuffled blocks.

MODEL_DIR holds ``config.json``, ``model.safetensors`` (weights + preprocessing buffers),
``checkpoint.safetensors`` (weights, optimizer state, RNG state, counters; JSON metadata
in the safetensors header; written atomically at every epoch end, at the time limit and
on Ctrl-C) and ``history.csv`` (one row per epoch).  ``resume=True`` continues from the
checkpoint exactly where it stopped, including after SIGKILL.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chemtwin import __version__
from chemtwin.core.files import atomic_output, describe_error, write_json
from chemtwin.data.dataset import Batch, label_columns
from chemtwin.data.spectra import check_spectra, pixel_weights
from chemtwin.errors import InputError
from chemtwin.tagging.distributed import Ranks
from chemtwin.tagging.fader import (
    FaderConfig,
    FaderNet,
    adversary_loss,
    fit_baseline,
    poly_exponents,
    poly_features,
    recon_loss,
)

log = logging.getLogger(__name__)
FORMAT = "chemtwin-fader"
MODEL_FILES = ("config.json", "model.safetensors", "checkpoint.safetensors", "history.csv")
HISTORY_COLUMNS = ("epoch", "step", "time_s", "lr", "lambda", "train_loss", "train_recon", "train_adv_ce",
                   "train_adv_acc", "val_recon", "val_swap", "val_adv_acc", "adv_chance", "val_rank0", "val_median_rank")
READ_ROWS = 1024


class ArraySource:
    """NumPy arrays behind the same interface as ``SpectraDataset`` (read / take / group)."""

    def __init__(self, flux, ivar, labels, label_names, group=None, wavelength=None):
        self.flux = np.asarray(flux, dtype=np.float32)
        self.ivar = np.ones_like(self.flux) if ivar is None else np.asarray(ivar, dtype=np.float32)
        if self.flux.ndim != 2 or self.ivar.shape != self.flux.shape:
            raise InputError(f"flux {self.flux.shape} and ivar {self.ivar.shape} must both be (stars, pixels)")
        self.n_stars, self.n_pixels = self.flux.shape
        self._labels = np.asarray(labels, dtype=np.float32).reshape(self.n_stars, -1)
        self.label_names = [str(n) for n in label_names]
        if len(self.label_names) != self._labels.shape[1]:
            raise InputError(f"{self._labels.shape[1]} label columns but {len(self.label_names)} label names")
        self.group = np.full(self.n_stars, -1, np.int64) if group is None else np.asarray(group, np.int64)
        self.wavelength = np.arange(self.n_pixels, dtype=float) if wavelength is None else np.asarray(wavelength)
        self.path, self.attrs = "<arrays>", {}

    def labels(self) -> np.ndarray:
        return self._labels

    def read(self, start=0, stop=None) -> Batch:
        s = slice(start, stop)
        return Batch(start, self.flux[s], self.ivar[s], self._labels[s], self.group[s])

    def take(self, rows) -> Batch:
        return Batch(-1, self.flux[rows], self.ivar[rows], self._labels[rows], self.group[rows])




def split_by_group(group: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Validation mask choosing whole groups (stars with group -1 are groups of one)."""
    group = np.asarray(group, dtype=np.int64)
    ids = np.where(group >= 0, group, group.max(initial=0) + 1 + np.arange(group.size))
    uniq = np.unique(ids)
    n_val = int(round(val_fraction * uniq.size))
    chosen = np.random.default_rng(seed).permutation(uniq)[:n_val]
    return np.isin(ids, chosen)


@dataclass
class Scan:
    usable: np.ndarray            # (N,) False where ivar is all zero
    u: np.ndarray                 # (N, k) conditioned labels
    uniform: bool                 # every training row has equal weights on all pixels
    coef: np.ndarray | None = None       # (F, P) per-pixel polynomial baseline in u
    resid_std: np.ndarray | None = None  # (P,) std of the training flux about the baseline


def scan(source, columns, train_mask=None, u_range=None, exponents=None, progress=False) -> Scan:
    """One pass: validate every row; with ``train_mask``, also fit the per-pixel baseline
    (monomials ``exponents`` of u scaled over ``u_range``) to the usable training rows."""
    from tqdm.auto import tqdm

    n, p = source.n_stars, source.n_pixels
    fit = train_mask is not None
    if fit:
        n_feat = len(exponents)
        A, bx = np.zeros((p, n_feat * n_feat)), np.zeros((p, n_feat))
        sxx, cnt = np.zeros(p), np.zeros(p)
        lo, hi = u_range
    usable, u, uniform = np.zeros(n, bool), np.zeros((n, len(columns)), np.float32), True
    for a in tqdm(range(0, n, READ_ROWS), desc="checking data", disable=not progress, leave=False):
        b = source.read(a, min(a + READ_ROWS, n))
        ok = check_spectra(np.asarray(b.flux), np.asarray(b.ivar), a, str(source.path))
        usable[a : a + ok.size] = ok
        lab = b.labels[:, columns]
        bad = ok & ~np.isfinite(lab).all(axis=1)
        if bad.any():
            raise InputError(f"{source.path}: row {a + int(np.flatnonzero(bad)[0])} has a non-finite condition label")
        u[a : a + ok.size] = lab
        if not fit:
            continue
        sel = ok & train_mask[a : a + ok.size]
        w = pixel_weights(b.ivar[sel]).astype(np.float64)
        uniform &= bool((w == 1).all())
        phi = poly_features((lab[sel] - lo) / (hi - lo) - 0.5, exponents)
        wx = w * np.where(w > 0, np.nan_to_num(b.flux[sel]), 0.0)
        A += w.T @ (phi[:, :, None] * phi[:, None, :]).reshape(len(phi), -1)
        bx += wx.T @ phi
        sxx += (wx * np.nan_to_num(b.flux[sel])).sum(0)
        cnt += w.sum(0)
    if not fit:
        return Scan(usable, u, uniform)
    coef, resid_std = fit_baseline(A.reshape(p, n_feat, n_feat), bx, sxx, cnt)
    return Scan(usable, u, uniform, coef, resid_std)


class Loader:
    """Shuffled training batches (flux, weights or None, u) as tensors, in memory or streamed."""

    def __init__(self, source, rows: np.ndarray, columns, uniform: bool, in_memory: bool, block_rows=512, buffer_blocks=8):
        self.source, self.rows, self.columns, self.uniform = source, np.sort(rows), columns, uniform
        self.in_memory, self.n = in_memory, len(rows)
        self.block_rows, self.buffer_blocks = block_rows, buffer_blocks
        if in_memory:  # filled chunk by chunk: peak memory is the arrays themselves
            p = source.n_pixels
            self.x = torch.empty((self.n, p))
            self.w = None if uniform else torch.empty((self.n, p))
            self.u = torch.empty((self.n, len(columns)))
            k = 0
            for a in range(0, source.n_stars, READ_ROWS):
                x, w, u = self._read(a, min(a + READ_ROWS, source.n_stars))
                self.x[k : k + len(x)], self.u[k : k + len(x)] = x, u
                if w is not None:
                    self.w[k : k + len(x)] = w
                k += len(x)
        else:
            starts = np.arange(0, source.n_stars, block_rows)
            counts = np.diff(np.searchsorted(self.rows, np.append(starts, source.n_stars)))
            self.blocks = starts[counts > 0]

    def _read(self, a, b):
        sel = self.rows[(self.rows >= a) & (self.rows < b)] - a
        batch = self.source.read(a, b)
        flux, ivar = np.asarray(batch.flux)[sel], np.asarray(batch.ivar)[sel]
        w = None if self.uniform else torch.from_numpy(pixel_weights(ivar))
        return torch.from_numpy(np.nan_to_num(flux)), w, torch.from_numpy(batch.labels[sel][:, self.columns].astype(np.float32))

    def steps(self, batch_size: int) -> int:
        return math.ceil(self.n / batch_size)

    def epoch(self, gen: torch.Generator, batch_size: int, skip: int = 0):
        """Yield the batches of one epoch in the order drawn from ``gen``, after ``skip`` of them."""
        if self.in_memory:
            perm = torch.randperm(self.n, generator=gen)
            for i in range(skip, self.steps(batch_size)):
                idx = perm[i * batch_size : (i + 1) * batch_size]
                yield self.x[idx], None if self.w is None else self.w[idx], self.u[idx]
            return
        order = torch.randperm(len(self.blocks), generator=gen).numpy()
        carry, i = None, 0
        for k in range(0, len(order), self.buffer_blocks):
            parts = [self._read(a, a + self.block_rows) for a in self.blocks[order[k : k + self.buffer_blocks]]]
            buf = [torch.cat([p[j] for p in parts]) if parts[0][j] is not None else None for j in range(3)]
            if carry is not None:
                buf = [None if c is None else torch.cat([c, b]) for c, b in zip(carry, buf)]
            perm = torch.randperm(buf[0].shape[0], generator=gen)
            buf = [None if t is None else t[perm] for t in buf]
            last = k + self.buffer_blocks >= len(order)
            n_full = buf[0].shape[0] if last else buf[0].shape[0] // batch_size * batch_size
            for a in range(0, n_full, batch_size):
                if i >= skip:
                    yield tuple(None if t is None else t[a : a + batch_size] for t in buf)
                i += 1
            carry = [None if t is None else t[n_full:] for t in buf]


class EvalSet:
    """Up to ``max_stars`` validation stars (whole groups), held in memory, with a twin for each."""

    def __init__(self, source, rows: np.ndarray, columns, max_stars: int, seed: int):
        group = source.group[rows]
        ids = np.where(group >= 0, group, -1 - np.arange(rows.size))
        uniq = np.random.default_rng(seed).permutation(np.unique(ids))
        sizes = dict(zip(*np.unique(ids, return_counts=True)))
        keep, total = [], 0
        for g in uniq:
            if total + sizes[g] > max_stars and total:
                break
            keep.append(g)
            total += sizes[g]
        rows = np.sort(rows[np.isin(ids, keep)])
        b = source.take(rows)
        self.flux = torch.from_numpy(np.nan_to_num(np.asarray(b.flux, np.float32)))
        self.w = torch.from_numpy(pixel_weights(b.ivar))
        self.u = torch.from_numpy(np.asarray(b.labels, np.float32)[:, columns])
        self.group = np.asarray(b.group)
        # partner of each star: the next member of its group (cyclically); itself if alone
        order = np.lexsort((np.arange(rows.size), self.group))
        partner = np.arange(rows.size)
        gs = self.group[order]
        for start in np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]]):
            stop = start + np.argmax(np.r_[gs[start + 1 :] != gs[start], True]) + 1
            members = order[start:stop]
            if gs[start] >= 0 and members.size > 1:
                partner[members] = np.roll(members, -1)
        self.partner = torch.from_numpy(partner)
        self.has_twin = torch.from_numpy(partner != np.arange(rows.size))

    def __len__(self):
        return len(self.group)


def _nearest_twin_ranks(z: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Each star's doppelganger rank against its closest group-mate (empty without twins)."""
    from chemtwin.core.ranks import doppelganger_ranks

    if not np.isfinite(z).all():
        return np.zeros(0, np.int64)
    try:
        return doppelganger_ranks(z, group, progress=False).nearest()[1]
    except InputError:  # no group with two members
        return np.zeros(0, np.int64)


@torch.no_grad()
def evaluate(model: FaderNet, ev: EvalSet, device, batch: int = 1024) -> dict:
    """Reconstruction and swapped-latent MSE, adversary accuracy and twin ranks on ``ev``."""
    model.eval()
    z, rec, swap, acc = [], 0.0, 0.0, 0.0
    n, n_swap = len(ev), int(ev.has_twin.sum())
    for a in range(0, n, batch):
        x, w, u = (t[a : a + batch].to(device) for t in (ev.flux, ev.w, ev.u))
        zb = model.encode(x, w, u)
        rec += recon_loss(model.decode(zb, u), x, w).item() * len(x)
        acc += adversary_loss(model.adversary, zb, model.u_bins(u))[1].item() * len(x)
        z.append(zb)
    z = torch.cat(z)
    for a in range(0, n, batch):
        i = torch.arange(a, min(a + batch, n))[ev.has_twin[a : a + batch]]
        if len(i):
            j = ev.partner[i]
            x_j, w_j, u_j = ev.flux[j].to(device), ev.w[j].to(device), ev.u[j].to(device)
            swap += recon_loss(model.decode(z[i.to(device)], u_j), x_j, w_j).item() * len(i)
    ranks = _nearest_twin_ranks(z.cpu().numpy(), ev.group)
    model.train()
    return {
        "val_recon": rec / max(n, 1), "val_swap": swap / max(n_swap, 1) if n_swap else float("nan"),
        "val_adv_acc": acc / max(n, 1),
        "val_rank0": float((ranks == 0).mean()) if ranks.size else float("nan"),
        "val_median_rank": float(np.median(ranks)) if ranks.size else float("nan"),
    }


def _residual_sample(loader: Loader, model: FaderNet, seed: int, n: int = 4096) -> torch.Tensor:
    """Encoder inputs of about ``n`` random training rows (own RNG: the run's is untouched)."""
    parts, got = [], 0
    for x, w, u in loader.epoch(torch.Generator().manual_seed(seed + 2), 1024):
        parts.append(model.residual(x, w, u))
        got += len(x)
        if got >= n:
            break
    return torch.cat(parts)


# ---------------------------------------------------------------- model directory I/O
def save_model(out_dir: Path, model: FaderNet, wavelength=None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if wavelength is not None:
        tensors["data.wavelength"] = torch.as_tensor(np.asarray(wavelength, dtype=np.float64))
    with atomic_output(Path(out_dir) / "model.safetensors") as tmp:
        save_file(tensors, str(tmp))


def read_model_dir(model_dir) -> dict:
    """config.json of a model directory; InputError when the directory is not a model."""
    d = Path(model_dir)
    path = d / "config.json"
    if not d.is_dir():
        raise InputError(f"{d}: no such model directory")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{d}: not a chemtwin model (no readable config.json)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{d}: not a chemtwin model (config.json has no format {FORMAT!r})")
    try:
        FaderConfig.from_dict(meta["config"])
        if int(meta["n_pixels"]) < 1:
            raise ValueError("n_pixels < 1")
    except InputError as exc:
        raise InputError(f"{d}: config.json is invalid ({exc})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"{d}: config.json is invalid ({exc.__class__.__name__}: {exc})") from None
    return meta




def load_model(model_dir, device="cpu") -> tuple[FaderNet, dict, np.ndarray | None]:
    """(model, config.json contents, wavelength or None) of a trained model directory."""
    meta = read_model_dir(model_dir)
    cfg = FaderConfig.from_dict(meta["config"])
    path = Path(model_dir) / "model.safetensors"
    if not path.is_file():
        raise InputError(f"{model_dir}: not a chemtwin model (no model.safetensors; training never reached a checkpoint)")
    model = FaderNet(cfg, int(meta["n_pixels"]))
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error type for truncated/garbled files
        raise InputError(f"{model_dir}: model.safetensors is unreadable ({describe_error(exc)})") from None
    wavelength = tensors.pop("data.wavelength", None)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise InputError(f"{model_dir}: model.safetensors does not match config.json ({describe_error(exc)})") from None
    return model.to(device).eval(), meta, None if wavelength is None else wavelength.numpy()


def _save_checkpoint(path: Path, model, opts: dict, shuffle_state, state: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"state": state, "optim": {}}
    for name, opt in opts.items():
        sd = opt.state_dict()
        scalars = {}
        for idx, st in sd["state"].items():
            for key, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"{name}.{idx}.{key}"] = val.detach().cpu().contiguous()
                else:
                    scalars[f"{idx}.{key}"] = val
        meta["optim"][name] = {"param_groups": sd["param_groups"], "scalars": scalars}
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.shuffle"] = shuffle_state
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={"chemtwin": json.dumps(meta)})


def _load_checkpoint(path: Path, model, opts: dict, device) -> tuple[torch.Tensor, dict]:
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["chemtwin"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # truncated or garbled file, or no chemtwin metadata
        raise InputError(f"{path}: unreadable checkpoint ({describe_error(exc)})") from None
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as exc:  # e.g. resumed on data with another number of pixels
        raise InputError(f"{path}: the checkpoint does not fit this data and model ({describe_error(exc)})") from None
    for name, opt in opts.items():
        m = meta["optim"][name]
        state: dict = {}
        for key, val in tensors.items():
            if key.startswith(name + "."):
                idx, sub = key[len(name) + 1 :].split(".", 1)
                state.setdefault(int(idx), {})[sub] = val.to(device) if sub != "step" else val
        for key, val in m["scalars"].items():
            idx, sub = key.split(".", 1)
            state.setdefault(int(idx), {})[sub] = val
        opt.load_state_dict({"state": state, "param_groups": m["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return tensors["rng.shuffle"], meta["state"]


def _append_history(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        fh.flush()
        os.fsync(fh.fileno())


def read_history(model_dir) -> list[dict]:
    path = Path(model_dir) / "history.csv"
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()} for r in csv.DictReader(fh)]


def _truncate_history(path: Path, step: int) -> None:
    """Drop rows written after the checkpoint (the process died between the two)."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(float(r["step"])) <= step]
    with atomic_output(path) as tmp:
        _write_rows(tmp, rows)


def _write_rows(path, rows) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda: no CUDA device is available", "device")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


# ---------------------------------------------------------------------- the loop
def train(source, out_dir, cfg: FaderConfig, val_source=None, resume=False, overwrite=False, progress=True) -> dict:
    """Train (or, with ``resume``, continue training) a model into ``out_dir``; returns the
    last validation metrics.  ``source``/``val_source``: ``SpectraDataset`` or ``ArraySource``."""
    from tqdm.auto import tqdm

    t0 = time.monotonic()
    out = Path(out_dir)
    ckpt_path, hist_path = out / "checkpoint.safetensors", out / "history.csv"
    ranks, device = Ranks.setup(pick_device(cfg.device))  # several under torchrun (tagging/distributed.py)
    progress = progress and ranks.main
    if resume:
        if not ckpt_path.is_file():
            raise InputError(f"{out}: nothing to resume (no checkpoint.safetensors)")
        read_model_dir(out)
    else:
        if out.exists() and not out.is_dir():
            raise InputError(f"{out} exists and is not a directory")
        if out.exists() and any(out.iterdir()):
            if not overwrite:
                raise InputError(f"{out} is not empty; pass overwrite=True to replace it or resume=True to continue", "overwrite", "resume")
            if not (out / "config.json").exists():
                raise InputError(f"{out} is not empty and holds no chemtwin model; refusing to overwrite it")
        if not out.parent.is_dir():
            raise InputError(f"output folder {out.parent} does not exist")
    ranks.barrier()  # every rank has looked at MODEL_DIR before rank 0 writes to it
    if source.n_stars == 0:
        raise InputError(f"{source.path}: the dataset holds no spectra")

    # ---- data: split by group, validate, statistics
    columns = label_columns(source, cfg.condition, "condition label")
    val_cols = label_columns(val_source, cfg.condition, "condition label") if val_source is not None else None
    if val_source is None:
        val_mask = split_by_group(source.group, cfg.val_fraction, cfg.seed)
    else:
        val_mask = np.zeros(source.n_stars, bool)
        if val_source.n_pixels != source.n_pixels:
            raise InputError(f"{val_source.path}: {val_source.n_pixels} pixels, but the training data has {source.n_pixels}")
    u_all = source.labels()[:, columns]
    u_fit = u_all[~val_mask & np.isfinite(u_all).all(1)]
    if not len(u_fit):
        raise InputError(f"{source.path}: no training rows with finite {','.join(cfg.condition)}")
    u_range = (u_fit.min(0), np.where(u_fit.max(0) > u_fit.min(0), u_fit.max(0), u_fit.min(0) + 1))
    sc = scan(source, columns, ~val_mask, u_range, poly_exponents(len(columns), cfg.baseline_degree), progress)
    train_rows = np.flatnonzero(sc.usable & ~val_mask)
    skipped = int((~sc.usable).sum())
    if val_source is not None:
        vsc = scan(val_source, val_cols, progress=progress)
        val_rows, vsrc, vcols = np.flatnonzero(vsc.usable), val_source, val_cols
        skipped_val = int((~vsc.usable).sum())
    else:
        val_rows, vsrc, vcols, skipped_val = np.flatnonzero(sc.usable & val_mask), source, columns, 0
    if skipped or skipped_val:
        log.warning("skipped %d rows whose ivar is all zero", skipped + skipped_val)
    if train_rows.size < 2:
        raise InputError(f"{source.path}: only {train_rows.size} usable training rows")
    u_train = sc.u[train_rows]
    bytes_needed = train_rows.size * source.n_pixels * 4 * (1 if sc.uniform else 2)
    in_memory = isinstance(source, ArraySource) or bytes_needed <= cfg.max_memory_gb * 2**30
    log.info("training rows %d, validation rows %d, %s (%.2f GB)", train_rows.size, val_rows.size,
             "in memory" if in_memory else "streamed from disk", bytes_needed / 2**30)
    loader = Loader(source, train_rows, columns, sc.uniform, in_memory)
    ev = EvalSet(vsrc, val_rows, vcols, cfg.eval_max_stars, cfg.seed) if val_rows.size and ranks.main else None

    # ---- the data are fine: (re)create the model folder (rank 0 alone writes it)
    if not resume and ranks.main:
        for name in MODEL_FILES:
            (out / name).unlink(missing_ok=True)
        out.mkdir(exist_ok=True)

    # ---- model and optimisers
    torch.manual_seed(cfg.seed)
    model = FaderNet(cfg, source.n_pixels)
    model.set_statistics(*u_range, sc.coef, sc.resid_std, cfg.standardize, cfg.normalize_loss)
    if cfg.pca_init and not resume:
        model.init_from_pca(_residual_sample(loader, model, cfg.seed))
    model.to(device).train()
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    ae_params = [p for name, p in model.named_parameters() if not name.startswith("adversary.")]
    opts = {
        "opt_ae": opt_cls(ae_params, lr=cfg.lr, weight_decay=cfg.weight_decay),
        "opt_adv": opt_cls(model.adversary.parameters(), lr=cfg.lr * cfg.adversary_lr_factor, weight_decay=cfg.weight_decay),
    }
    bins = model.u_bins(torch.from_numpy(u_train).to(device))
    adv_chance = float(torch.bincount(bins).max()) / len(bins)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    st = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "elapsed": 0.0, "sums": [0.0, 0.0, 0.0, 0.0, 0]}
    if resume:
        shuffle_state, st = _load_checkpoint(ckpt_path, model, opts, device)
        gen.set_state(shuffle_state)
        if ranks.main:
            _truncate_history(hist_path, st["step"])
        log.info("resuming at epoch %d, step %d", st["epoch"], st["step"])
    ae, adversary = ranks.wrap(model)  # DDP modules under torchrun, the model's own otherwise
    ranks.reseed(cfg.seed, st["step"])
    meta = {
        "format": FORMAT, "format_version": 1, "chemtwin_version": __version__, "config": cfg.to_dict(),
        "n_pixels": source.n_pixels, "status": "training",
        "data": {"train": str(source.path), "val_data": None if val_source is None else str(val_source.path),
                 "n_train": int(train_rows.size),
                 "n_val": int(val_rows.size), "skipped_rows": skipped + skipped_val, "in_memory": in_memory,
                 "uniform_weights": sc.uniform, "adv_chance": adv_chance, "processes": ranks.world},
    }
    if ranks.main:
        write_json(out / "config.json", meta)

    spe = loader.steps(cfg.batch_size)
    total = cfg.epochs * spe
    elapsed0, last_eval_cost = st["elapsed"], 0.0
    elapsed = lambda: elapsed0 + time.monotonic() - t0  # noqa: E731

    def progress_now():
        p = st["step"] / total
        return min(1.0, max(p, elapsed() / cfg.time_limit) if cfg.time_limit else p)

    def finish_epoch(complete: bool, epoch_start_state, interrupted: bool = False):
        nonlocal last_eval_cost
        t = time.monotonic()
        n = max(st["sums"][4], 1)
        sums = st["sums"][:4] if interrupted else ranks.mean(st["sums"][:4])  # no collective after Ctrl-C
        row = {"epoch": st["epoch"] + st["batch_in_epoch"] / spe, "step": st["step"], "lr": lr,
               "lambda": lam, "train_loss": sums[0] / n, "train_recon": sums[1] / n,
               "train_adv_ce": sums[2] / n, "train_adv_acc": sums[3] / n, "adv_chance": adv_chance}
        if ev is not None:
            row.update(evaluate(model, ev, device))
        if complete:
            st["epoch"], st["batch_in_epoch"], st["sums"] = st["epoch"] + 1, 0, [0.0, 0.0, 0.0, 0.0, 0]
            row["epoch"] = st["epoch"]
        row["time_s"] = st["elapsed"] = elapsed()
        if ranks.main:
            _append_history(hist_path, row)
            _save_checkpoint(ckpt_path, model, opts, gen.get_state() if complete else epoch_start_state, st)
            save_model(out, model, source.wavelength)
        last_eval_cost = time.monotonic() - t
        return row

    # The bar counts percent of the run (steps or time limit, whichever is further on), so that a
    # time-boxed run shows a true ETA instead of the steps of epochs it will never reach.
    bar = tqdm(total=100, disable=not progress, desc=cfg.model, unit="%", dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.0f}/100% [{elapsed}<{remaining}{postfix}]")

    def show_progress():
        bar.update(round(100 * progress_now(), 1) - bar.n)

    lr, lam, row, stopped = cfg.lr, 0.0, {}, False
    try:
        while st["epoch"] < cfg.epochs and not stopped:
            epoch_start_state = gen.get_state()
            for x, w, u in loader.epoch(gen, cfg.batch_size, skip=st["batch_in_epoch"]):
                over = bool(cfg.time_limit) and elapsed() + 1.5 * last_eval_cost >= cfg.time_limit
                p, over = ranks.agree(progress_now(), over)  # rank 0's clock decides for every rank
                if over:
                    stopped = True
                    break
                if len(x) < ranks.world:  # a last batch too short to give every rank a row
                    continue
                lr, lam = cfg.lr * cfg.lr_factor(p), cfg.lambda_at(p, st["step"])
                for name, opt in opts.items():
                    base = cfg.lr if name == "opt_ae" else cfg.lr * cfg.adversary_lr_factor
                    for group in opt.param_groups:
                        group["lr"] = base * cfg.lr_factor(p)
                n_global = len(x)
                x, w, u = ranks.shard(x, w, u)  # this rank's rows of the global batch
                share = ranks.loss_weight(len(x), n_global)  # 1 in one process
                x, u = x.to(device, non_blocking=True), u.to(device)
                w = None if w is None else w.to(device)
                u_bin = model.u_bins(u)
                z, x_hat = ae(x, w, u)
                # 1) adversary step on the current latents
                ce_a, acc = adversary_loss(adversary, z.detach(), u_bin)
                opts["opt_adv"].zero_grad(set_to_none=True)
                (ce_a * share).backward()
                opts["opt_adv"].step()
                # 2) autoencoder step against the updated adversary (its own module: no gradient sync)
                rec = recon_loss(x_hat, x, w)
                loss = model.loss_scale * rec
                if lam > 0:
                    loss = loss - lam * adversary_loss(model.adversary, z, u_bin)[0]
                opts["opt_ae"].zero_grad(set_to_none=True)
                (loss * share).backward()
                opts["opt_ae"].step()
                st["step"] += 1
                st["batch_in_epoch"] += 1
                s = st["sums"]
                for k, v in enumerate((loss.item(), rec.item(), ce_a.item(), acc.item())):
                    s[k] += v * share  # averaged over ranks at the epoch's end: the global batch's mean
                s[4] += 1
                if st["step"] % 10 == 0:
                    show_progress()
                    bar.set_postfix(step=st["step"], rec=f"{s[1] / s[4]:.3g}", adv_ce=f"{s[2] / s[4]:.3g}",
                                    adv_acc=f"{s[3] / s[4]:.2f}", lam=f"{lam:.2g}", refresh=False)
            else:
                row = finish_epoch(True, epoch_start_state)
                show_progress()
                bar.set_postfix(rec=f"{row['train_recon']:.3g}", val_rank0=f"{row.get('val_rank0', float('nan')):.3f}",
                                adv_acc=f"{row['train_adv_acc']:.2f}", lam=f"{lam:.2g}")
                continue
            if st["batch_in_epoch"]:  # stopped inside an epoch: checkpoint where we are
                row = finish_epoch(False, epoch_start_state)
    except KeyboardInterrupt:
        if st["sums"][4]:
            finish_epoch(False, epoch_start_state, interrupted=True)
        raise
    finally:
        bar.close()
    meta["status"] = "finished" if st["epoch"] >= cfg.epochs else "stopped at the time limit"
    meta["final"] = {k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    meta["final"].update(epoch=st["epoch"], step=st["step"], time_s=elapsed())
    if ranks.main:
        write_json(out / "config.json", meta)
    ranks.barrier()  # MODEL_DIR is complete when train() returns, on every rank
    return meta["final"]
