"""The data side of training: where the rows come from, checked once, and served in batches.

``prepare(source, val_source, cfg)`` is all of it.  One pass over the data first validates
it (``chemtwin.data.spectra.check_spectra``: NaN flux where ivar > 0 and NaN/negative ivar
are errors naming the row; rows whose ivar is all zero are skipped and counted) and collects
the training statistics (the per-pixel polynomial baseline in the conditioned labels, the
residual scatter, the label range).  The training rows are then held in memory when they fit
in ``cfg.run.max_memory_gb`` and otherwise streamed from the HDF5 file in shuffled blocks
(``Loader``); the validation stars for the per-epoch metrics are held in memory (``EvalSet``).
A source is a dataset (``chemtwin.data.dataset``) or NumPy arrays (``ArraySource``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from chemtwin.data.dataset import Batch, label_columns
from chemtwin.data.spectra import check_spectra, pixel_weights
from chemtwin.errors import InputError
from chemtwin.tagging.fader import fit_baseline, poly_exponents, poly_features
from chemtwin.tagging.fader_config import FaderConfig

log = logging.getLogger(__name__)
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
        if not sel.any():
            continue
        w = pixel_weights(b.ivar[sel]).astype(np.float64)
        uniform &= bool((w == 1).all())
        phi = poly_features((lab[sel] - lo) / (hi - lo) - 0.5, exponents)
        wx = w * np.where(w > 0, np.nan_to_num(b.flux[sel]), 0.0)
        A += w.T @ (phi[:, :, None] * phi[:, None, :]).reshape(len(phi), -1)
        bx += wx.T @ phi
        sxx += (wx * np.nan_to_num(b.flux[sel])).sum(0)
        cnt += w.sum(0)
    if not usable.any():
        raise InputError(f"{source.path}: no star has a usable pixel (every ivar is 0); nothing to learn from")
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


@dataclass
class TrainingData:
    """What ``prepare`` found: the rows, their statistics, and the batches to train on."""

    source: object
    val_source: object
    u_range: tuple              # (lo, hi) of the conditioned labels over the training rows
    scan: Scan
    u_train: np.ndarray         # conditioned labels of the training rows
    train_rows: np.ndarray
    val_rows: np.ndarray
    n_skipped: int              # rows whose ivar is all zero, training and validation
    in_memory: bool
    loader: Loader
    eval_set: EvalSet | None

    def summary(self) -> dict:
        """The ``data`` entry of config.json (without what the trainer adds)."""
        return {"train": str(self.source.path),
                "val_data": None if self.val_source is None else str(self.val_source.path),
                "n_train": int(self.train_rows.size), "n_val": int(self.val_rows.size),
                "skipped_rows": self.n_skipped, "in_memory": self.in_memory, "uniform_weights": self.scan.uniform}


def prepare(source, val_source, cfg: FaderConfig, with_eval_set: bool = True, progress: bool = False) -> TrainingData:
    """Split by group (or take ``val_source`` as the validation set), validate every row, fit the
    baseline statistics and set up the batches; InputError for data that cannot train a model."""
    if source.n_stars == 0:
        raise InputError(f"{source.path}: the dataset holds no spectra")
    net, run = cfg.net, cfg.run
    columns = label_columns(source, net.condition, "condition label")
    val_cols = label_columns(val_source, net.condition, "condition label") if val_source is not None else None
    if val_source is None:
        val_mask = split_by_group(source.group, run.val_fraction, run.seed)
    else:
        val_mask = np.zeros(source.n_stars, bool)
        if val_source.n_pixels != source.n_pixels:
            raise InputError(f"{val_source.path}: {val_source.n_pixels} pixels, but the training data has {source.n_pixels}")
    u_all = source.labels()[:, columns]
    u_fit = u_all[~val_mask & np.isfinite(u_all).all(1)]
    if not len(u_fit):
        raise InputError(f"{source.path}: no training rows with finite {','.join(net.condition)}")
    u_range = (u_fit.min(0), np.where(u_fit.max(0) > u_fit.min(0), u_fit.max(0), u_fit.min(0) + 1))
    sc = scan(source, columns, ~val_mask, u_range, poly_exponents(len(columns), net.baseline_degree), progress)
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
    bytes_needed = train_rows.size * source.n_pixels * 4 * (1 if sc.uniform else 2)
    in_memory = isinstance(source, ArraySource) or bytes_needed <= run.max_memory_gb * 2**30
    log.info("training rows %d, validation rows %d, %s (%.2f GB)", train_rows.size, val_rows.size,
             "in memory" if in_memory else "streamed from disk", bytes_needed / 2**30)
    loader = Loader(source, train_rows, columns, sc.uniform, in_memory)
    ev = EvalSet(vsrc, val_rows, vcols, run.eval_max_stars, run.seed) if val_rows.size and with_eval_set else None
    return TrainingData(source, val_source, u_range, sc, sc.u[train_rows], train_rows, val_rows, skipped + skipped_val,
                        in_memory, loader, ev)
