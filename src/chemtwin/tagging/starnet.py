"""StarNet (Fabbro et al. 2018, MNRAS 475, 2978): a 1-D convolutional network that regresses
stellar labels from a spectrum, with a heteroscedastic Gaussian head for its uncertainty.

The network, after the paper's set-up (docs/starnet.md says what differs and why)::

    input (2, P): [(flux - mean) / std where ivar > 0 else 0,  1 where ivar > 0 else 0]
    conv(4 filters, kernel 8) ReLU -> conv(16, 8) ReLU -> max-pool 4   (no padding)
    dense 256 ReLU -> dense 128 ReLU -> (mean, log variance) per label, standardised

**ivar-aware input.**  A masked pixel (``ivar = 0``; its flux may be NaN, 0 or anything) enters
as 0 (the training set's mean flux at that pixel) with a 0 in the mask channel: the masked flux
value never reaches the network, and the mask channel tells a masked pixel from a measured
one.  The per-pixel mean and std of the measured training flux are buffers of the network
(``standardize_flux=False``: the paper's raw ``flux - 1``).
**Labels** are standardised by the training set's mean and std (buffers of the network, saved
with its weights).  **Uncertainty**: the head gives a mean and a log variance per label,
trained with the beta-NLL of Seitzer et al. (2022, beta 0.5: the Gaussian NLL times the
detached variance to the power beta, which keeps the mean learning where the NLL alone
would give up on hard stars); the reported error is sqrt(variance) in label units (the
aleatoric error on the training domain; it cannot know the error of a domain shift).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chemtwin.data.augment import Augmenter
from chemtwin.errors import InputError

LOG_VAR_RANGE = (-16.0, 8.0)  # in standardised units: sigma from 3e-4 to 55 std
FLUX_STD_FLOOR = 0.005        # continuum units: half the noise of an SNR-100 pixel
BETA = 0.5                    # beta-NLL's exponent (0: the Gaussian NLL, 1: an MSE-like gradient)
AUGMENT_FIELDS = tuple(f.name for f in fields(Augmenter))


@dataclass
class StarNetConfig:
    """Every knob of a StarNet and its training (``config`` of the model folder's config.json)."""

    labels: tuple = ()                  # label names to regress (required)
    filters: tuple = (4, 16)            # conv layers' filters (Fabbro et al.: 4, 16)
    kernel: int = 8                     # conv kernel width in pixels
    pool: int = 4                       # max-pool width after the convolutions
    hidden: tuple = (256, 128)          # dense layers
    standardize_flux: bool = True       # input (flux - mean) / std per pixel (False: flux - 1, as Fabbro et al.)
    lr: float = 7e-4                    # Adam (Fabbro et al.: 0.0007)
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 30
    time_limit: float | None = None     # seconds of training in all (across resumes)
    val_fraction: float = 0.1           # of the twin groups, held out for the per-epoch validation
    seed: int = 0
    device: str = "auto"
    augment: dict | None = None         # Augmenter fields, applied to every training batch

    def __post_init__(self):
        self.labels = tuple(str(n) for n in ([self.labels] if isinstance(self.labels, str) else self.labels))
        self.filters = tuple(int(f) for f in self.filters)
        self.hidden = tuple(int(h) for h in self.hidden)
        checks = {
            "labels": len(self.labels) > 0 and len(set(self.labels)) == len(self.labels),
            "filters": len(self.filters) > 0 and min(self.filters) >= 1, "kernel": self.kernel >= 1,
            "pool": self.pool >= 1, "hidden": min(self.hidden, default=1) >= 1, "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0, "batch_size": self.batch_size >= 1, "epochs": self.epochs >= 1,
            "time_limit": self.time_limit is None or self.time_limit > 0,
            "val_fraction": 0 <= self.val_fraction < 1, "device": self.device in ("auto", "cpu", "cuda"),
        }
        for key, ok in checks.items():
            if not ok:
                raise InputError(f"invalid {key}: {getattr(self, key)!r}", key)
        if self.augment:
            unknown = sorted(set(self.augment) - set(AUGMENT_FIELDS))
            if unknown:
                raise InputError(f"unknown augmentation option(s) {', '.join(unknown)}", "augment")
            self.augmenter()  # validates

    def augmenter(self) -> Augmenter | None:
        if not self.augment:
            return None
        given = dict(self.augment)
        if isinstance(given.get("snr"), list):
            given["snr"] = tuple(given["snr"]) if len(given["snr"]) == 2 else given["snr"]
        return Augmenter(**given)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**d, "labels": list(self.labels), "filters": list(self.filters), "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, d: dict) -> StarNetConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if values.get("time_limit") in ("inf", "nan"):
            values["time_limit"] = None
        return cls(**values)


def encode(flux, ivar, center=None, scale=None) -> torch.Tensor:
    """The network's input (B, 2, P) float32 from a batch (numpy or torch): the flux channel is
    ``(flux - center) / scale`` on measured pixels (default ``flux - 1``) and 0 on masked ones,
    the mask channel 1 / 0."""
    flux, ivar = torch.as_tensor(flux), torch.as_tensor(ivar)
    good = ivar > 0
    x = flux.to(torch.float32) - (1.0 if center is None else center)
    if scale is not None:
        x = x / scale
    x = torch.where(good, x, torch.zeros((), dtype=torch.float32))
    return torch.stack([x, good.to(torch.float32)], dim=1)


def flux_statistics(flux, ivar) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and std of the measured training flux (1 and 1 where no star measures it);
    the std at least ``FLUX_STD_FLOOR``, so that a pixel that hardly varies in noiseless training
    spectra (the continuum) does not blow the noise of observed ones up by orders of magnitude."""
    flux, good = np.asarray(flux, np.float64), np.asarray(ivar) > 0
    n = good.sum(0)
    mean = np.where(good, flux, 0.0).sum(0) / np.maximum(n, 1)
    var = np.where(good, (flux - mean) ** 2, 0.0).sum(0) / np.maximum(n - 1, 1)
    std = np.maximum(np.sqrt(var), FLUX_STD_FLOOR)
    return np.where(n > 0, mean, 1.0), np.where(n > 1, std, 1.0)


class StarNetModel(nn.Module):
    """The network of the module docstring; ``forward`` gives (mean, log variance), standardised;
    ``predict`` gives them in label units (mean, sigma)."""

    def __init__(self, cfg: StarNetConfig, n_pixels: int):
        super().__init__()
        self.n_labels, self.n_pixels = len(cfg.labels), int(n_pixels)
        convs, channels = [], 2
        for f in cfg.filters:
            convs += [nn.Conv1d(channels, f, cfg.kernel), nn.ReLU()]
            channels = f
        self.conv = nn.Sequential(*convs, nn.MaxPool1d(cfg.pool))
        n_flat = channels * ((self.n_pixels - len(cfg.filters) * (cfg.kernel - 1)) // cfg.pool)
        if n_flat < 1:
            raise InputError(f"{n_pixels} pixels are too few for {len(cfg.filters)} convolutions of width {cfg.kernel} "
                             f"and a pool of {cfg.pool}", "kernel")
        sizes = (n_flat, *cfg.hidden)
        self.dense = nn.Sequential(*[m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.head = nn.Linear(sizes[-1], 2 * self.n_labels)
        self.register_buffer("label_mean", torch.zeros(self.n_labels))
        self.register_buffer("label_std", torch.ones(self.n_labels))
        self.standardize_flux = bool(cfg.standardize_flux)
        self.register_buffer("flux_mean", torch.ones(self.n_pixels))
        self.register_buffer("flux_std", torch.ones(self.n_pixels))

    def set_flux_statistics(self, flux, ivar) -> None:
        if self.standardize_flux:
            mean, std = flux_statistics(flux, ivar)
            self.flux_mean.copy_(torch.as_tensor(mean))
            self.flux_std.copy_(torch.as_tensor(std))

    def encode(self, flux, ivar) -> torch.Tensor:
        """The input of a batch (numpy or torch), on the network's device."""
        device = self.flux_mean.device
        flux, ivar = torch.as_tensor(flux).to(device), torch.as_tensor(ivar).to(device)
        return encode(flux, ivar, self.flux_mean, self.flux_std) if self.standardize_flux else encode(flux, ivar)

    def set_label_statistics(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.float64)
        std = labels.std(0)
        self.label_mean.copy_(torch.as_tensor(labels.mean(0)))
        self.label_std.copy_(torch.as_tensor(np.where(std > 0, std, 1.0)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.dense(self.conv(x).flatten(1))
        mean, log_var = self.head(h).chunk(2, dim=1)
        return mean, log_var.clamp(*LOG_VAR_RANGE)

    def standardise(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels - self.label_mean) / self.label_std

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self(x)
        return self.label_mean + mean * self.label_std, torch.exp(0.5 * log_var) * self.label_std


def loss_fn(mean: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """beta-NLL of standardised targets, averaged over stars and labels."""
    var = torch.exp(log_var)
    nll = 0.5 * (log_var + (target - mean) ** 2 / var)
    return (nll * var.detach() ** BETA).mean() if BETA else nll.mean()


def mse(mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(mean, target)
