"""Cycle-StarNet (O'Briain, Ting, Fabbro et al. 2021, ApJ 906, 130): the network, its losses,
and the adapted emulator (docs/cyclestarnet.md).

Two autoencoders meet in one shared latent ``z_sh``: the synthetic one (spectra emulated by a
Payne emulator at known labels) and the observed one, whose encoder also gives a small split
latent ``z_sp`` for what only the observed domain has (instrument, data reduction).  Mapping
synthetic -> observed is ``decode_obs(encode_syn(x), z_sp)``; observed -> synthetic is
``decode_syn(encode_obs(x)[0])``.  The losses of one step (``losses``): reconstruction in each
domain, the two cycles (syn -> obs -> syn, obs -> syn -> obs) and, after the warm-up, one
least-squares GAN per domain so that mapped spectra look like the target domain.

Stabilisers (the method is known to be hard to make converge): the observed encoder and decoder
are the synthetic ones **plus** correction networks whose last layers start at zero, so the
two domains start identical and training learns only the gap; reconstruction-only warm-up
epochs; spectral normalisation and a smaller learning rate for the discriminators; gradient
clipping; LSGAN losses (bounded gradients).  The training loop (``cyclestarnet_train``) watches
the losses and stops on divergence.

:class:`CycleEmulator` is a :class:`PayneEmulator` whose spectrum is emulator -> synthetic encoder
-> observed decoder, so The Payne's fitter (``tagging.payne_fit``) fits observed stars with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from chemtwin.errors import InputError
from chemtwin.spectral_models.payne import PayneEmulator

FIT_MODES = ("full", "residual")


@dataclass(frozen=True)
class CycleConfig:
    """Every knob of Cycle-StarNet (the network, the losses, the optimisation, the run)."""

    latent: int = 24            # shared latent z_sh
    split: int = 3              # observed-only split latent z_sp
    hidden: int = 192           # neurons of the autoencoders' hidden layers
    disc_hidden: int = 64       # neurons of the discriminators' hidden layers
    correction_hidden: int = 96  # neurons of the observed domain's correction networks
    w_rec: float = 1.0
    w_cycle: float = 1.0
    w_adv: float = 0.05         # generator weight of the GAN terms (0: no GAN)
    lr: float = 1e-3
    lr_disc: float = 2e-4
    batch_size: int = 64
    epochs: int = 40
    warmup_epochs: int = 4      # reconstruction and cycle only, before the GAN terms come in
    clip: float = 1.0           # gradient-norm clipping of every update
    spectral_norm: bool = True  # on the discriminators' layers
    diverge_factor: float = 20.0  # stop when an epoch's observed loss exceeds this times its best
    time_limit: float | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("latent", "split", "hidden", "disc_hidden", "correction_hidden", "batch_size", "epochs"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)}", name)
        for name in ("w_rec", "w_cycle", "w_adv", "clip"):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}", name)
        for name in ("lr", "lr_disc"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}", name)
        if self.warmup_epochs < 0 or not self.diverge_factor > 1:
            raise InputError("warmup_epochs must be >= 0 and diverge_factor above 1")
        if self.time_limit is not None and not self.time_limit > 0:
            raise InputError(f"time_limit must be positive, got {self.time_limit}", "time_limit")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CycleConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown Cycle-StarNet setting {sorted(unknown)[0]}")
        return cls(**d)


def mlp(sizes, spectral: bool = False, zero_last: bool = False) -> nn.Sequential:
    layers = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        if zero_last and k == len(sizes) - 2:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        layers += [nn.utils.parametrizations.spectral_norm(lin) if spectral else lin, nn.LeakyReLU(0.2)]
    return nn.Sequential(*layers[:-1])


class CycleStarNet(nn.Module):
    """The two autoencoders and the two discriminators; spectra in flux units (B, P)."""

    def __init__(self, cfg: CycleConfig, n_pixels: int):
        super().__init__()
        self.cfg, self.n_pixels = cfg, n_pixels
        h, zs, zp = cfg.hidden, cfg.latent, cfg.split
        self.register_buffer("center", torch.ones(n_pixels))   # mean synthetic spectrum
        self.register_buffer("scale", torch.ones(n_pixels))    # per-pixel spread (>= 0.01)
        self.register_buffer("split_mean", torch.zeros(zp))    # mean z_sp of the observed stars
        self.enc_syn = mlp([n_pixels, h, h, zs])
        self.dec_syn = mlp([zs, h, h, n_pixels])
        self.enc_obs = mlp([n_pixels, cfg.correction_hidden, zs + zp], zero_last=True)   # correction + z_sp
        self.dec_obs = mlp([zs + zp, cfg.correction_hidden, n_pixels], zero_last=True)   # correction
        self.disc_syn = mlp([n_pixels, cfg.disc_hidden, cfg.disc_hidden, 1], spectral=cfg.spectral_norm)
        self.disc_obs = mlp([n_pixels, cfg.disc_hidden, cfg.disc_hidden, 1], spectral=cfg.spectral_norm)

    def standardize(self, x, w=None):
        s = (x - self.center) / self.scale
        return s if w is None else torch.where(w > 0, s, torch.zeros_like(s))

    def encode_syn(self, x):
        return self.enc_syn(self.standardize(x))

    def encode_obs(self, x, w=None):
        """(z_sh, z_sp) of observed spectra; pixels of weight 0 are read as the mean spectrum."""
        s = self.standardize(x, w)
        out = self.enc_obs(s)
        return self.enc_syn(s) + out[..., : self.cfg.latent], out[..., self.cfg.latent :]

    def decode_syn(self, z):
        return self.center + self.scale * self.dec_syn(z)

    def decode_obs(self, z, z_sp=None):
        if z_sp is None:
            z_sp = self.split_mean.expand(*z.shape[:-1], -1)
        return self.decode_syn(z) + self.scale * self.dec_obs(torch.cat([z, z_sp], -1))

    def syn_to_obs(self, x, z_sp=None):
        return self.decode_obs(self.encode_syn(x), z_sp)

    def obs_to_syn(self, x, w=None):
        return self.decode_syn(self.encode_obs(x, w)[0])

    def autoencoder_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("disc_")]

    def disc_parameters(self):
        return [p for name, p in self.named_parameters() if name.startswith("disc_")]


def _err(a, b, scale, w=None):
    """Mean squared difference in units of the pixels' spread (weighted by w when given)."""
    r = ((a - b) / scale) ** 2
    return r.mean() if w is None else (w * r).sum() / w.sum().clamp_min(1e-12)


def losses(net: CycleStarNet, xs, xo, wo, sigma_o, adversarial: bool, gen: torch.Generator | None = None):
    """The autoencoder's losses and the discriminators' loss of one batch.

    xs (B, P) synthetic spectra, xo (B', P) observed ones with pixel weights wo (mean 1 per star,
    0 masked) and noise sigma_o (0 where masked).  Synthetic spectra mapped to the observed domain
    take the z_sp, the mask and the noise of random observed stars of the batch, so that the
    discriminator cannot tell them by their noise or masks.  Returns ({name: loss}, ae_loss, d_loss).
    """
    cfg, scale = net.cfg, net.scale
    z_s = net.encode_syn(xs)
    z_o, zp_o = net.encode_obs(xo, wo)
    rec_syn = _err(net.decode_syn(z_s), xs, scale)
    rec_obs = _err(net.decode_obs(z_o, zp_o), xo, scale, wo)
    pick = torch.randint(0, xo.shape[0], (xs.shape[0],), generator=gen)
    # syn -> obs -> syn
    fake_obs = net.decode_obs(z_s, zp_o[pick].detach())
    cyc_syn = _err(net.decode_syn(net.encode_obs(fake_obs)[0]), xs, scale)
    # obs -> syn -> obs
    fake_syn = net.decode_syn(z_o)
    cyc_obs = _err(net.decode_obs(net.encode_syn(fake_syn), zp_o), xo, scale, wo)
    out = {"rec_syn": rec_syn, "rec_obs": rec_obs, "cycle": cyc_syn + cyc_obs}
    ae = cfg.w_rec * (rec_syn + rec_obs) + cfg.w_cycle * (cyc_syn + cyc_obs)
    d_loss = None
    if adversarial and cfg.w_adv > 0:
        noise = torch.randn(fake_obs.shape, generator=gen) * sigma_o[pick]
        obs_mask = wo[pick]
        fake_obs_seen = net.standardize(fake_obs + noise, obs_mask)
        real_obs_seen = net.standardize(xo, wo)
        g = ((net.disc_obs(fake_obs_seen) - 1) ** 2).mean() + ((net.disc_syn(net.standardize(fake_syn)) - 1) ** 2).mean()
        ae = ae + cfg.w_adv * g
        d_loss = (((net.disc_obs(real_obs_seen) - 1) ** 2).mean() + (net.disc_obs(fake_obs_seen.detach()) ** 2).mean()
                  + ((net.disc_syn(net.standardize(xs)) - 1) ** 2).mean()
                  + (net.disc_syn(net.standardize(fake_syn.detach())) ** 2).mean()) / 2
        out["adv_g"], out["adv_d"] = g, d_loss
    return out, ae, d_loss


class CycleEmulator(PayneEmulator):
    """labels -> observed-domain spectrum: a Payne emulator adapted by a trained Cycle-StarNet.

    ``mode="full"`` (the paper): emulator -> synthetic encoder -> observed decoder.
    ``mode="residual"``: the emulator's own spectrum plus the learnt domain difference
    ``decode_obs(z) - decode_syn(z)``, which keeps the emulator's precision.  z_sp is held at the
    observed stars' mean, or, with ``split_box=(lo, hi)`` (arrays of the split size), it becomes
    extra labels ``ZSP_0``... inside that box, fitted with the others (the per-star instrument
    and reduction effects the split latent learnt).  Behaves as a Payne emulator of a format of
    its own ("cyclestarnet"), so The Payne's fitter uses its general (autodiff) derivatives.
    """

    def __init__(self, emulator: PayneEmulator, net: CycleStarNet, mode: str = "full", source: str = "cyclestarnet",
                 split_box=None):
        if mode not in FIT_MODES:
            raise InputError(f"mode must be one of {', '.join(FIT_MODES)}, not {mode!r}", "mode")
        arrays, names = emulator.arrays(), list(emulator.label_names)
        self.n_physical = len(names)
        if split_box is not None:  # the emulator's first layer ignores the extra labels (zero columns)
            lo, hi = (np.asarray(v, dtype=np.float64).reshape(-1) for v in split_box)
            if lo.size != net.cfg.split or hi.size != net.cfg.split or not np.all(hi > lo):
                raise InputError(f"split_box must be two arrays of {net.cfg.split} values with hi > lo")
            w0 = arrays["w_array_0"]
            arrays["w_array_0"] = np.concatenate([w0, np.zeros((w0.shape[0], lo.size), w0.dtype)], 1)
            arrays["x_min"], arrays["x_max"] = np.r_[arrays["x_min"], lo], np.r_[arrays["x_max"], hi]
            names += [f"ZSP_{k}" for k in range(lo.size)]
        arrays.pop("label_names", None)
        super().__init__(arrays, names, emulator.wavelength, dtype=emulator.dtype, source=source)
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.mode, self.free_split = mode, split_box is not None
        self.format = "cyclestarnet"

    def forward_scaled(self, s: torch.Tensor) -> torch.Tensor:
        x = super().forward_scaled(s)
        z = self.net.encode_syn(x)
        z_sp = None
        if self.free_split:
            n = self.n_physical
            lo = torch.as_tensor(self.x_min[n:], dtype=s.dtype)
            z_sp = (s[..., n:] + 0.5) * torch.as_tensor(self.x_max[n:] - self.x_min[n:], dtype=s.dtype) + lo
        if self.mode == "residual":
            return x + self.net.decode_obs(z, z_sp) - self.net.decode_syn(z)
        return self.net.decode_obs(z, z_sp)

    def save(self, path, overwrite: bool = False):
        raise InputError("an adapted emulator has no Payne .npz layout; keep its Cycle-StarNet folder instead")

    def __repr__(self) -> str:
        return (f"CycleEmulator(mode={self.mode}, free_split={self.free_split}, labels={self.n_labels}, "
                f"pixels={self.n_pixels}, source={self.source!r})")
