"""The disentangling model (docs/science.md section 2, docs/model.md).

A conditional encoder E(x, u) -> z, a conditional decoder D(z, u) -> x_hat and an
adversary A(z) -> logits over the joint bin of the conditioned labels u.  Losses:

    L_AE = weighted MSE(D(E(x, u), u), x) - lambda * CE(A(E(x, u)), u_bin)   (E, D)
    L_A  = CE(A(E(x, u)), u_bin)                                             (A)

updated alternately, one step each (see ``training.py``).  ``model="cae"`` is the same
network with lambda = 0 (the paper's baseline).  The network is built from a ``NetConfig``
(``fader_config.py``: the network, optimiser and run parts of ``FaderConfig``).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chemtwin.tagging.fader_config import ACTIVATION_NAMES, NetConfig

# in the order of fader_config.ACTIVATION_NAMES (the names a config may give)
ACTIVATIONS = dict(zip(ACTIVATION_NAMES, (nn.SiLU, nn.SELU, lambda: nn.LeakyReLU(0.01), nn.ReLU)))


def _mlp(sizes, act: str) -> nn.Sequential:
    layers = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers)


class CondMLP(nn.Module):
    """MLP conditioned on u: u is concatenated to the input (``concat``) and, with ``film``,
    each hidden activation h becomes h * (1 + gamma(u)) + beta(u) (FiLM; starts as identity),
    which lets the network scale its features by functions of u."""

    def __init__(self, sizes: tuple, n_cond: int, act: str, concat: bool = True, film: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.cond = nn.Linear(n_cond, sizes[1], bias=False) if concat else None
        self.film = nn.ModuleList(_mlp((n_cond, 64, 2 * h), act) for h in sizes[1:-1]) if film else None
        for f in self.film or ():
            nn.init.zeros_(f[-1].weight)
            nn.init.zeros_(f[-1].bias)
        self.act = ACTIVATIONS[act]()

    def forward(self, x, u):
        h = self.layers[0](x)
        if self.cond is not None:
            h = h + self.cond(u)
        for i, layer in enumerate(self.layers[1:]):
            h = self.act(h)
            if self.film is not None:
                gamma, beta = self.film[i](u).chunk(2, dim=1)
                h = h * (1 + gamma) + beta
            h = layer(h)
        return h


class Adversary(nn.Module):
    """A(z) -> logits over the joint bin of the k conditioned labels (n_cat**k classes).

    ``square``: the input is [z, z*z], so a latent whose spread (not only its mean) changes
    with u is as plain to the adversary as a shift.  ``factorized``: the joint logit of bins
    (b_1..b_k) is sum_k a_k(z)[b_k] + j(z)[b]: per-label heads (which learn fast: 10 classes,
    not 100) plus a joint head (starts at 0) for what the labels do together.  The loss is
    the cross-entropy of these joint logits either way.
    """

    def __init__(self, latent_dim: int, hidden: tuple, n_cat: int, k: int, act: str, square=False, factorized=False,
                 dropout: float = 0.0):
        super().__init__()
        self.square, self.n_cat, self.k = square, n_cat, k
        n_out = n_cat**k + (k * n_cat if factorized else 0)
        self.net = _mlp((latent_dim * (2 if square else 1),) + tuple(hidden) + (n_out,), act)
        self.dropout = dropout
        self.factorized = factorized
        if factorized:
            with torch.no_grad():
                self.net[-1].weight[: n_cat**k].zero_()
                self.net[-1].bias[: n_cat**k].zero_()
            # joint index b = sum_k b_k n_cat**k -> the bin of label k in class b
            b = torch.arange(n_cat**k)
            self.register_buffer("label_bin", torch.stack([(b // n_cat**i) % n_cat + i * n_cat for i in range(k)]),
                                 persistent=False)

    def forward(self, z):
        h = torch.cat([z, z * z], dim=1) if self.square else z
        for layer in self.net:
            h = layer(h)
            if self.dropout and not isinstance(layer, nn.Linear):  # after each hidden activation
                h = F.dropout(h, self.dropout, self.training)
        out = h
        if not self.factorized:
            return out
        joint, per_label = out[:, : self.n_cat**self.k], out[:, self.n_cat**self.k :]
        return joint + per_label[:, self.label_bin].sum(dim=1)


def poly_exponents(k: int, degree: int) -> np.ndarray:
    """Exponents (F, k) of every monomial of total degree <= ``degree`` in k variables."""
    exps = [e for e in itertools.product(range(degree + 1), repeat=k) if sum(e) <= degree]
    return np.array(sorted(exps, key=lambda e: (sum(e), [-x for x in e])), dtype=np.int64).reshape(-1, k)


def poly_features(s, exponents):
    """Monomials (N, F) of scaled labels ``s`` (N, k); NumPy or torch."""
    if isinstance(s, torch.Tensor):
        e = torch.as_tensor(exponents, device=s.device)
        return torch.prod(s[:, None, :] ** e[None], dim=2)
    return np.prod(np.asarray(s)[:, None, :] ** exponents[None], axis=2)


class FaderNet(nn.Module):
    """Encoder, decoder, adversary and the fixed preprocessing (buffers saved with the weights).

    The spectrum is modelled around a baseline b(u): per pixel, a polynomial of degree
    ``baseline_degree`` in the scaled conditioned labels, least-squares fitted to the
    training set (degree 0 = the mean spectrum).  The encoder sees (x - b(u)) / scale and
    the decoder returns b(u) + scale * MLP(z, u), so the networks only model what the
    labels u do not explain in that simple way; the loss is still on x itself.  With
    ``encoder_u_gain`` = D the encoder adds sum_m m(u) G_m Q r over the monomials m of the scaled
    u of degree 1..D (Q: 3d components started at the principal components, G_m at 0): the
    chemistry's imprint on r changes with TEFF/LOGG, so the weights that read it must too.

    Buffers: ``u_lo``/``u_hi`` (k,) training range of the conditioned labels (u is scaled
    to [-0.5, 0.5] over it); ``bin_edges`` (k, n_cat + 1) equal-width adversary bins over
    the same range; ``poly_coef`` (F, P) the baseline; ``scale`` (P,) the per-pixel std of
    the training residual (floored at its median; 1 without ``standardize``);
    ``loss_scale`` () the factor of the reconstruction term in L_AE (1 / mean residual
    variance with ``normalize_loss``, else 1), which makes lambda dimensionless.
    """

    def __init__(self, cfg: NetConfig, n_pixels: int):
        super().__init__()
        k, d = len(cfg.condition), cfg.latent_dim
        self.n_cat, self.n_pixels, self.condition = cfg.n_cat, n_pixels, tuple(cfg.condition)
        self.exponents = poly_exponents(k, cfg.baseline_degree)
        self.encoder = CondMLP((n_pixels,) + cfg.encoder_hidden + (d,), k, cfg.activation, cfg.encoder_direct_u, cfg.film)
        self.decoder = CondMLP((d,) + cfg.decoder_hidden + (n_pixels,), k, cfg.activation, True, cfg.film)
        self.latent_dim = d
        self.enc_skip = nn.Linear(n_pixels, d, bias=False) if cfg.linear_skip and cfg.encoder_hidden else None
        self.dec_skip = nn.Linear(d, n_pixels, bias=False) if cfg.linear_skip else None
        # the gain reads the residual through a few more principal components than z keeps (3 d)
        # and starts at 0: a P x (d k) matrix would start its Adam steps as noise on every pixel
        self.gain_exponents = poly_exponents(k, cfg.encoder_u_gain)[1:]  # the monomials of u the weights follow
        self.enc_gain = nn.Sequential(nn.Linear(n_pixels, 3 * d, bias=False),
                                      nn.Linear(3 * d, d * len(self.gain_exponents), bias=False)) \
            if cfg.encoder_u_gain else None
        for layer in (self.enc_skip, self.dec_skip, None if self.enc_gain is None else self.enc_gain[1]):
            if layer is not None:
                nn.init.zeros_(layer.weight)
        self.latent_norm = nn.BatchNorm1d(d, affine=False, momentum=0.01) if cfg.latent_norm else None
        self.adversary = Adversary(d, cfg.adversary_hidden, cfg.n_cat, k, cfg.activation, cfg.adversary_square,
                                   cfg.adversary_factorized, cfg.adversary_dropout)
        with torch.no_grad():  # start the decoder at the baseline
            self.decoder.layers[-1].weight.mul_(0.1)
            self.decoder.layers[-1].bias.zero_()
        for name, size in (("u_lo", (k,)), ("u_hi", (k,)), ("bin_edges", (k, cfg.n_cat + 1)),
                           ("poly_coef", (len(self.exponents), n_pixels)), ("scale", (n_pixels,)), ("loss_scale", ())):
            self.register_buffer(name, torch.zeros(size))
        self.poly_coef[0] = 1.0
        self.scale.fill_(1.0)
        self.u_hi.fill_(1.0)
        self.loss_scale.fill_(1.0)

    def set_statistics(self, u_lo, u_hi, coef, resid_std, standardize: bool, normalize_loss: bool) -> None:
        """Fix the preprocessing from training-set statistics (NumPy arrays, see ``fit_baseline``)."""
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
        self.u_lo.copy_(t(u_lo))
        self.u_hi.copy_(t(u_hi))
        lo, hi = np.asarray(u_lo, np.float64), np.asarray(u_hi, np.float64)
        self.bin_edges.copy_(t(np.linspace(lo, hi, self.n_cat + 1).T))
        self.poly_coef.copy_(t(coef))
        std = np.asarray(resid_std, dtype=np.float64)
        if standardize:
            floor = np.median(std[std > 0]) if (std > 0).any() else 1.0
            self.scale.copy_(t(np.sqrt(std**2 + floor**2)))
        if normalize_loss:
            var = float(np.mean(std**2))
            self.loss_scale.fill_(1.0 / var if var > 0 else 1.0)

    def scale_u(self, u):
        return (u - self.u_lo) / (self.u_hi - self.u_lo) - 0.5

    def baseline(self, u):
        return poly_features(self.scale_u(u), self.exponents) @ self.poly_coef

    def u_bins(self, u):
        """Joint bin index sum_k b_k * n_cat**k of the conditioned labels (clipped to the range)."""
        b = torch.stack([torch.bucketize(u[:, k].contiguous(), self.bin_edges[k, 1:-1], right=True)
                         for k in range(u.shape[1])], dim=1)
        return (b * self.n_cat ** torch.arange(u.shape[1], device=u.device)).sum(dim=1)

    def residual(self, x, w, u):
        """The encoder's input: (x - b(u)) / scale, 0 at masked pixels (w = 0)."""
        r = (x - self.baseline(u)) / self.scale
        return r if w is None else torch.where(w > 0, r, 0.0)

    def encode(self, x, w, u):
        """z from flux x (N, P), pixel weights w (N, P or None; 0 = masked) and raw labels u (N, k)."""
        r = self.residual(x, w, u)
        s = self.scale_u(u)
        z = self.encoder(r, s)
        if self.enc_skip is not None:
            z = z + self.enc_skip(r)
        if self.enc_gain is not None:
            m = poly_features(s, self.gain_exponents)
            z = z + torch.einsum("nmd,nm->nd", self.enc_gain(r).view(len(r), m.shape[1], -1), m)
        return z if self.latent_norm is None else self.latent_norm(z)

    @torch.no_grad()
    def init_from_pca(self, r) -> None:
        """Aim the encoder's first layer and the decoder's last layer at the leading principal
        components of training residuals ``r`` (N, P): a head start, both stay trainable."""
        first, last = self.encoder.layers[0], self.decoder.layers[-1]
        wanted = max(first.out_features, self.latent_dim if self.dec_skip is not None else last.in_features,
                     0 if self.enc_gain is None else self.enc_gain[0].out_features)
        q = min(wanted, *r.shape)
        _, s, v = torch.svd_lowrank(r, q=q, niter=3)
        sd = (s / math.sqrt(len(r))).clamp_min(1e-12)
        k = min(first.out_features, q)
        first.weight[:k] = (v[:, :k] / sd[:k]).T
        first.bias[:k] = 0
        if self.enc_gain is not None:
            k = min(self.enc_gain[0].out_features, q)
            self.enc_gain[0].weight[:k] = (v[:, :k] / sd[:k]).T
        if self.dec_skip is None:
            k = min(last.in_features, q)
            last.weight[:, :k] = 0.1 * v[:, :k] * sd[:k]
            return
        # linear paths = whitened PCA (the linear autoencoder); the MLPs start as corrections
        k = min(self.latent_dim, q)
        self.dec_skip.weight.zero_()
        self.dec_skip.weight[:, :k] = v[:, :k] * sd[:k]
        if self.enc_skip is not None:
            self.enc_skip.weight.zero_()
            self.enc_skip.weight[:k] = (v[:, :k] / sd[:k]).T
            self.encoder.layers[-1].weight.zero_()
            self.encoder.layers[-1].bias.zero_()

    def decode(self, z, u):
        out = self.decoder(z, self.scale_u(u))
        if self.dec_skip is not None:
            out = out + self.dec_skip(z)
        return self.baseline(u) + self.scale * out


def fit_baseline(A: np.ndarray, b: np.ndarray, sxx: np.ndarray, count: np.ndarray):
    """Per-pixel weighted least squares from accumulated normal equations.

    A (P, F, F) = sum_n w phi phi^T, b (P, F) = sum_n w x phi, sxx (P,) = sum_n w x^2,
    count (P,) = sum_n w.  Returns (coef (F, P), residual std (P,)).  A tiny ridge keeps
    poorly covered pixels solvable; pixels never observed get the continuum (1).
    """
    F_ = A.shape[1]
    ridge = 1e-9 * np.trace(A, axis1=1, axis2=2)[:, None, None] / F_ + 1e-12
    beta = np.linalg.solve(A + ridge * np.eye(F_), b[..., None])[..., 0]
    beta[count <= 0] = 0.0
    beta[count <= 0, 0] = 1.0
    rss = sxx - 2 * (beta * b).sum(1) + np.einsum("pf,pfg,pg->p", beta, A, beta)
    var = np.clip(rss, 0, None) / np.maximum(count, 1e-12)
    return beta.T, np.sqrt(var)


def recon_loss(x_hat, x, w=None):
    """Mean over stars of sum_p w (x_hat - x)^2 / sum_p w (plain MSE when w is None)."""
    if w is None:
        return (x_hat - x).pow(2).mean()
    w = w.to(x.dtype)
    return ((w * (x_hat - torch.nan_to_num(x)).pow(2)).sum(1) / w.sum(1).clamp_min(1e-12)).mean()


def adversary_loss(adversary: nn.Module, z, u_bin):
    """(cross-entropy, accuracy) of the adversary (``model.adversary`` or its DDP wrapper) on latents z."""
    logits = adversary(z)
    return F.cross_entropy(logits, u_bin), (logits.argmax(1) == u_bin).float().mean()
