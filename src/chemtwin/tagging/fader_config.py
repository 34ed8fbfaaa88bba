"""The fader's settings in three parts: the network (``NetConfig``), how it is optimised
(``OptimConfig``) and the run (``RunConfig``), under ``FaderConfig`` with the model kind and
the preset.

``FaderConfig(**fields)`` takes every field flat (``ChemTwin(latent_dim=20, lr=1e-4)``, the
CLI), and ``to_dict()`` gives them flat, in one fixed order: ``config.json`` of a model folder
keeps the flat layout it always had, so model folders written before the split load as they
are.  ``None`` = take it from the preset (``PRESETS``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from chemtwin.errors import InputError

MODEL_KINDS = ("fader", "cae")  # cae: the fader's network with lambda = 0 (the paper's baseline)
ACTIVATION_NAMES = ("silu", "selu", "leaky_relu", "relu")

# Architecture / optimiser knobs each preset fills in when the caller leaves them None.
PRESETS = {
    # CPU-friendly (docs/model.md): the input is the residual from a per-pixel polynomial
    # baseline in u; a linear encoder with weights quadratic in u, started at the residual's
    # whitened principal components; a FiLM decoder with a linear path; a small,
    # regularised, fast adversary; AdamW + cosine.
    "fast": dict(
        baseline_degree=4, standardize=True, normalize_loss=True, pca_init=True,
        encoder_hidden=(), encoder_direct_u=False, encoder_u_gain=2, latent_norm=True,
        decoder_hidden=(256, 256), film=True, linear_skip=True, activation="silu",
        adversary_hidden=(64, 64), adversary_square=True, adversary_factorized=True, adversary_dropout=0.3,
        optimizer="adamw", lr=3e-4, adversary_lr_factor=5.0, weight_decay=1e-5, schedule="cosine",
        batch_size=64, lambda_adv=1e-2, lambda_warmup_frac=0.3, epochs=200,
    ),
    # The published model: MLP encoder [x; u] 2048-512-128-z, decoder [z; u] 512-2048-8192-P,
    # SELU, Adam at lr 1e-5, a small constant lambda (1e-5), raw flux.  (The adversary's
    # size and the batch size are not published; ours.)
    "paper": dict(
        baseline_degree=0, standardize=False, normalize_loss=False, pca_init=False,
        encoder_hidden=(2048, 512, 128), encoder_direct_u=True, encoder_u_gain=0, latent_norm=False,
        decoder_hidden=(512, 2048, 8192), film=False, linear_skip=False, activation="selu",
        adversary_hidden=(512, 512), adversary_square=False, adversary_factorized=False, adversary_dropout=0.0,
        optimizer="adam", lr=1e-5, adversary_lr_factor=1.0, weight_decay=0.0, schedule="constant",
        batch_size=128, lambda_adv=1e-5, lambda_warmup_frac=0.0, epochs=100,
    ),
}


def _invalid(checks: dict, part) -> None:
    for key, ok in checks.items():
        if not ok:
            raise InputError(f"invalid {key}: {getattr(part, key)!r}", key)


@dataclass
class NetConfig:
    """The network and its fixed preprocessing: everything ``model.safetensors`` depends on."""

    condition: tuple = ("TEFF", "LOGG")       # conditioned (non-chemical) labels u
    latent_dim: int = 20
    n_cat: int = 10                           # adversary bins per conditioned label
    encoder_hidden: tuple | None = None
    decoder_hidden: tuple | None = None
    adversary_hidden: tuple | None = None
    activation: str | None = None
    baseline_degree: int | None = None        # per-pixel polynomial in u subtracted from x (0 = the mean spectrum)
    encoder_direct_u: bool | None = None      # u also enters the encoder's first layer directly
    encoder_u_gain: int | None = None         # degree in u of the linear encoder's weights: z = W0 r + sum_m m(u) G_m Q r
                                              # over the monomials m of degree 1..this (0: fixed weights; a bool
                                              # from an older config.json: True = 1)
    film: bool | None = None                  # FiLM conditioning of every hidden layer on u
    linear_skip: bool | None = None           # linear encoder/decoder paths beside the MLPs (PCA-initialised)
    latent_norm: bool | None = None           # batch-normalise z (no affine): unit variance per dimension
    adversary_factorized: bool | None = None  # joint logits = per-label heads + a joint head
    adversary_dropout: float | None = None    # dropout after each hidden layer of the adversary
    adversary_square: bool | None = None      # the adversary also sees z*z (sees u-dependent scale)
    standardize: bool | None = None           # divide the input residual by its per-pixel std
    normalize_loss: bool | None = None        # divide the reconstruction term by the mean residual variance

    def __post_init__(self):
        self.condition = tuple(str(c) for c in ([self.condition] if isinstance(self.condition, str) else self.condition))
        for key in ("encoder_hidden", "decoder_hidden", "adversary_hidden"):
            setattr(self, key, tuple(int(h) for h in getattr(self, key)))
        if int(self.latent_dim) < 1:
            raise InputError(f"latent dimension must be at least 1, got {self.latent_dim}", "latent_dim")
        if not self.condition or len(set(self.condition)) != len(self.condition):
            raise InputError(f"condition labels must be distinct and not empty, got {','.join(self.condition) or 'none'}",
                             "condition")
        self.encoder_u_gain = int(self.encoder_u_gain)
        _invalid({"n_cat": self.n_cat >= 2, "activation": self.activation in ACTIVATION_NAMES,
                  "encoder_u_gain": 0 <= self.encoder_u_gain <= 3}, self)


@dataclass
class OptimConfig:
    """How the network learns: initialisation, optimisers, schedules, the adversary's weight."""

    pca_init: bool | None = None              # start the P-sized layers at the residuals' principal components
    lambda_adv: float | None = None           # final lambda
    lambda_warmup_frac: float | None = None   # linear warm-up from 0 over this fraction of training
    lambda_warmup_steps: int | None = None    # ... or over this many steps (overrides the fraction)
    optimizer: str | None = None              # "adamw" | "adam"
    lr: float | None = None
    adversary_lr_factor: float | None = None  # the adversary's learning rate is lr times this
    weight_decay: float | None = None
    schedule: str | None = None               # "cosine" (linear warm-up, cosine decay) | "constant"
    lr_warmup_frac: float = 0.03
    min_lr_frac: float = 0.02                 # cosine decays to lr * min_lr_frac
    batch_size: int | None = None

    def __post_init__(self):
        _invalid({"batch_size": self.batch_size >= 1, "lr": self.lr > 0, "lambda_adv": self.lambda_adv >= 0,
                  "optimizer": self.optimizer in ("adam", "adamw"), "schedule": self.schedule in ("cosine", "constant")},
                 self)

    def lambda_at(self, progress: float, step: int) -> float:
        """lambda after ``step`` steps at training ``progress`` in [0, 1]: linear warm-up, then constant."""
        if self.lambda_warmup_steps:
            ramp = step / self.lambda_warmup_steps
        else:
            ramp = progress / self.lambda_warmup_frac if self.lambda_warmup_frac > 0 else 1.0
        return self.lambda_adv * min(1.0, ramp)

    def lr_factor(self, progress: float) -> float:
        """Multiplier of the learning rate at training ``progress`` in [0, 1]."""
        if self.schedule == "constant":
            return 1.0
        if progress < self.lr_warmup_frac:
            return (progress + 1e-3) / (self.lr_warmup_frac + 1e-3)
        t = min(1.0, (progress - self.lr_warmup_frac) / max(1e-9, 1 - self.lr_warmup_frac))
        return self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class RunConfig:
    """The run: how long, on what, with which seed and validation."""

    epochs: int | None = None
    time_limit: float | None = None           # seconds of training in all (across resumes)
    seed: int = 0
    val_fraction: float = 0.1                 # of the groups, when no separate validation set
    eval_max_stars: int = 2000                # validation stars used for the per-epoch metrics
    max_memory_gb: float = 4.0                # train in memory below this, stream from HDF5 above
    device: str = "auto"                      # "auto" | "cpu" | "cuda"

    def __post_init__(self):
        _invalid({"epochs": self.epochs >= 1, "val_fraction": 0 <= self.val_fraction < 1,
                  "time_limit": self.time_limit is None or self.time_limit > 0,
                  "device": self.device in ("auto", "cpu", "cuda")}, self)


PARTS = {"net": NetConfig, "optim": OptimConfig, "run": RunConfig}
# config.json's flat order (the order of the fields before the split)
FIELD_ORDER = (
    "model", "preset", "condition", "latent_dim", "n_cat", "encoder_hidden", "decoder_hidden", "adversary_hidden",
    "activation", "baseline_degree", "encoder_direct_u", "encoder_u_gain", "film", "linear_skip", "latent_norm",
    "adversary_factorized", "adversary_dropout", "adversary_square", "pca_init", "standardize", "normalize_loss", "lambda_adv",
    "lambda_warmup_frac", "lambda_warmup_steps", "optimizer", "lr", "adversary_lr_factor", "weight_decay", "schedule",
    "lr_warmup_frac", "min_lr_frac", "batch_size", "epochs", "time_limit", "seed", "val_fraction", "eval_max_stars",
    "max_memory_gb", "device",
)
_PART_OF = {f.name: part for part, cls in PARTS.items() for f in fields(cls)}
# knobs added after model folders were first written: a config.json without one was trained without it
_BEFORE_IT_EXISTED = {"encoder_u_gain": 0}


class FaderConfig:
    """Every knob of the model and its training: ``model`` ("fader" | "cae": lambda forced to 0),
    ``preset`` ("fast" | "paper") and the parts ``net``, ``optim``, ``run``."""

    def __init__(self, model: str = "fader", preset: str = "fast", **values):
        unknown = sorted(set(values) - set(_PART_OF))
        if unknown:
            raise TypeError(f"FaderConfig got unknown field(s) {', '.join(unknown)}")
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}", "preset")
        if model not in MODEL_KINDS:
            raise InputError(f"unknown model {model!r}; choose {' or '.join(MODEL_KINDS)}", "model")
        self.model, self.preset = model, preset
        filled = {k: v for k, v in PRESETS[preset].items() if values.get(k) is None}
        values = {**{k: v for k, v in values.items() if v is not None}, **filled}
        if model == "cae":
            values["lambda_adv"] = 0.0
        for part, cls in PARTS.items():
            setattr(self, part, cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values}))

    def to_dict(self) -> dict:
        """Every field, flat, in ``FIELD_ORDER`` (the ``config`` of config.json)."""
        top = {"model": self.model, "preset": self.preset}
        return {k: top[k] if k in top else getattr(getattr(self, _PART_OF[k]), k) for k in FIELD_ORDER}

    @classmethod
    def from_dict(cls, d: dict) -> "FaderConfig":
        """From a flat dict (config.json); keys it does not know are ignored."""
        known = {**_BEFORE_IT_EXISTED, **{k: v for k, v in d.items() if k in _PART_OF or k in ("model", "preset")}}
        # config.json spells inf "inf" (chemtwin.core.files.json_safe), e.g. --time-limit inf
        return cls(**{k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in known.items()})

    def __eq__(self, other) -> bool:
        return isinstance(other, FaderConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"FaderConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"
