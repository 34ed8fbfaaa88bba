"""Training an MLP-format Payne emulator (labels -> spectrum) on a chemtwin dataset.

Adam on mini-batches; the loss is the ivar-weighted squared error per unmasked pixel
(``loss="ivar"``) or the plain mean squared error (``loss="mse"``, for noiseless spectra:
ivar inf).  ``loss="auto"`` takes "mse" when the dataset holds noiseless pixels and
"ivar" otherwise.  A random ``val_fraction`` of the stars is held out; the weights with
the lowest validation loss are kept.  The learning rate follows a cosine from ``lr`` to
``lr / 100`` over the run (epochs or time limit, whichever ends first).

The labels are scaled with x_min / x_max = the range of the whole dataset, so every
star of it lies inside the emulator's box.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from chemtwin.data.dataset import open_dataset
from chemtwin.data.spectra import check_spectra
from chemtwin.errors import InputError
from chemtwin.spectral_models.payne import PayneEmulator

log = logging.getLogger(__name__)

LOSSES = ("auto", "ivar", "mse")


@dataclass
class TrainReport:
    """What a training run did and how well the kept weights reproduce held-out spectra."""

    label_names: list[str]
    n_train: int
    n_val: int
    loss: str
    epochs: int
    steps: int
    seconds: float
    best_epoch: int
    val_loss: float
    val_median_abs_error: float  # median |emulated - true| over held-out unmasked pixels
    val_rmse: float
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def _choose_labels(ds, labels: list[str] | None, values: np.ndarray) -> tuple[list[str], np.ndarray]:
    if labels is not None:
        columns = ds.label_columns(labels)
        chosen = values[:, columns]
        spread = np.ptp(chosen, axis=0) if len(chosen) else np.zeros(len(labels))
        for name, width in zip(labels, spread):
            if not width > 0:
                raise InputError(f"{ds.path}: label {name} is constant; an emulator cannot learn it (leave it out of labels)", "labels")
        return list(labels), chosen
    spread = np.ptp(values, axis=0)
    keep = [k for k in range(values.shape[1]) if spread[k] > 0]
    dropped = [ds.label_names[k] for k in range(values.shape[1]) if k not in keep]
    if dropped:
        log.warning("labels %s are constant in %s: left out of the emulator", ", ".join(dropped), ds.path)
    if not keep:
        raise InputError(f"{ds.path}: every label is constant; nothing to emulate")
    return [ds.label_names[k] for k in keep], values[:, keep]


def train_emulator(
    data_path: str | os.PathLike,
    *,
    labels: list[str] | None = None,
    hidden: int = 300,
    epochs: int | None = 100,
    time_limit: float | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    val_fraction: float = 0.1,
    loss: str = "auto",
    seed: int = 0,
    max_stars: int | None = None,
    max_memory_gb: float = 8.0,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[PayneEmulator, TrainReport]:
    """Train an MLP-format emulator on (up to ``max_stars`` of) a dataset's spectra.

    The spectra are held in memory (on ``device``); the emulator comes back on the CPU.
    """
    if loss not in LOSSES:
        raise InputError(f"loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    if hidden < 1 or batch_size < 1:
        raise InputError("hidden and batch_size must be positive")
    if epochs is None and time_limit is None:
        raise InputError("give a number of epochs or a time limit")
    if (epochs is not None and epochs < 1) or (time_limit is not None and not time_limit > 0):
        raise InputError("epochs and time limit must be positive")
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction must be in [0, 1), not {val_fraction}")
    if not lr > 0:
        raise InputError(f"learning rate must be positive, not {lr}")
    rng = np.random.default_rng(seed)
    with open_dataset(data_path) as ds:
        n = ds.n_stars if max_stars is None else min(int(max_stars), ds.n_stars)
        if n < 2:
            raise InputError(f"{ds.path}: need at least 2 spectra to train an emulator, found {n}")
        need_gb = n * ds.n_pixels * 8 / 1e9
        if need_gb > max_memory_gb:
            raise InputError(
                f"{ds.path}: {n} spectra need {need_gb:.1f} GB in memory (limit {max_memory_gb:g} GB); train on fewer (max_stars)", "max_stars"
            )
        all_labels = ds.labels()[:n].astype(np.float64)
        label_names, values = _choose_labels(ds, labels, all_labels)
        bad = ~np.isfinite(values)
        if bad.any():
            row, k = (int(i) for i in np.argwhere(bad)[0])
            raise InputError(f"{ds.path}: label {label_names[k]} of row {row} is not finite")
        flux = np.empty((n, ds.n_pixels), dtype=np.float32)
        weight = np.empty((n, ds.n_pixels), dtype=np.float32)
        noiseless = False
        for batch in ds.iter_batches(4096, 0, n):
            f, iv = batch.flux, batch.ivar.astype(np.float64)
            check_spectra(f, iv, batch.start, str(ds.path))
            good = iv > 0
            noiseless |= bool(np.isposinf(iv[good]).any())
            flux[batch.start : batch.stop] = np.where(good, f, 0.0)
            weight[batch.start : batch.stop] = np.where(good, np.minimum(iv, np.finfo(np.float32).max), 0.0)
        wavelength = ds.wavelength
        source = str(ds.path)
    if loss == "auto":
        loss = "mse" if noiseless else "ivar"
    if loss == "mse":
        weight = (weight > 0).astype(np.float32)
    elif noiseless:
        raise InputError(f"{source}: noiseless pixels (ivar inf) cannot be ivar-weighted; use loss 'mse'")
    if not (weight > 0).any():
        raise InputError(f"{source}: every pixel is masked")

    x_min, x_max = values.min(0), values.max(0)
    scaled = ((values - x_min) / (x_max - x_min) - 0.5).astype(np.float32)
    order = rng.permutation(n)
    n_val = int(round(val_fraction * n)) if val_fraction > 0 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 else 0), n - 1)
    val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val:])

    w_train = weight[train_rows]
    mean_flux = (flux[train_rows] * (w_train > 0)).sum(0) / np.maximum((w_train > 0).sum(0), 1)
    emulator = PayneEmulator.mlp(
        x_min, x_max, flux.shape[1], label_names, hidden=hidden, wavelength=wavelength,
        seed=int(rng.integers(2**31)), output_bias=np.where((w_train > 0).any(0), mean_flux, 1.0),
    )
    del w_train
    device = torch.device(device)
    emulator.to(device)
    for p in emulator.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(emulator.parameters(), lr=lr)
    t_flux, t_weight, t_scaled = (torch.from_numpy(a).to(device) for a in (flux, weight, scaled))
    del flux, weight

    def batch_loss(rows: np.ndarray) -> torch.Tensor:
        idx = torch.from_numpy(rows).to(device)
        r = emulator.forward_scaled(t_scaled[idx]) - t_flux[idx]
        w = t_weight[idx]
        return (w * r * r).sum() / (w > 0).sum().clamp_min(1)

    @torch.no_grad()
    def evaluate(rows: np.ndarray) -> tuple[float, float, float]:
        if rows.size == 0:
            return float("nan"), float("nan"), float("nan")
        total, count, sq, absolute = 0.0, 0, 0.0, []
        for a in range(0, rows.size, 1024):
            idx = torch.from_numpy(rows[a : a + 1024]).to(device)
            r = emulator.forward_scaled(t_scaled[idx]) - t_flux[idx]
            w = t_weight[idx]
            good = w > 0
            total += float((w * r * r).sum())
            count += int(good.sum())
            sq += float((r[good] ** 2).sum())
            absolute.append(r[good].abs().cpu())
        median = float(torch.cat(absolute).median()) if absolute else float("nan")
        return total / max(count, 1), median, math.sqrt(sq / max(count, 1))

    steps_per_epoch = math.ceil(train_rows.size / batch_size)
    max_epochs = epochs if epochs is not None else 10**9
    history: list[dict] = []
    best = (float("inf"), -1, None)
    t0 = time.perf_counter()
    steps = 0
    epoch = 0
    bar = tqdm(total=epochs, desc="payne train", unit="epoch", disable=not progress, leave=False)
    try:
        while epoch < max_epochs:
            elapsed = time.perf_counter() - t0
            if time_limit is not None and elapsed >= time_limit:
                break
            perm = train_rows[rng.permutation(train_rows.size)]
            emulator.train()
            running = 0.0
            for k in range(steps_per_epoch):
                done = max(
                    (epoch + k / steps_per_epoch) / epochs if epochs is not None else 0.0,
                    (time.perf_counter() - t0) / time_limit if time_limit is not None else 0.0,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))
                value = batch_loss(perm[k * batch_size : (k + 1) * batch_size])
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                running += float(value.detach())
                steps += 1
                if time_limit is not None and time.perf_counter() - t0 >= time_limit:
                    break
            epoch += 1
            emulator.eval()
            val_loss = evaluate(val_rows)[0] if val_rows.size else running / max(k + 1, 1)
            history.append({"epoch": epoch, "train_loss": running / max(k + 1, 1), "val_loss": val_loss,
                            "seconds": time.perf_counter() - t0})
            if val_loss < best[0]:
                best = (val_loss, epoch, {k2: v.detach().clone() for k2, v in emulator.state_dict().items()})
            bar.update(1)
            bar.set_postfix(train=f"{history[-1]['train_loss']:.3g}", val=f"{val_loss:.3g}")
    finally:
        bar.close()
    if best[2] is not None:
        emulator.load_state_dict(best[2])
    for p in emulator.parameters():
        p.requires_grad_(False)
    emulator.eval()
    val_loss, val_median, val_rmse = evaluate(val_rows if val_rows.size else train_rows)
    emulator.to("cpu")
    report = TrainReport(
        label_names=label_names, n_train=int(train_rows.size), n_val=int(val_rows.size), loss=loss, epochs=epoch,
        steps=steps, seconds=time.perf_counter() - t0, best_epoch=best[1], val_loss=val_loss,
        val_median_abs_error=val_median, val_rmse=val_rmse, history=history,
    )
    emulator.source = f"trained on {source}"
    return emulator, report
