"""Cycle-StarNet as methods (docs/cyclestarnet.md): two rows, both from a trained folder
(``chemtwin cyclestarnet train``), neither run by the bench unless asked (it trains no such model).

* ``cyclestarnet-payne``: The Payne's fit (``methods.payne.PayneLabels``, every option of it) with
  the adapted emulator (``tagging.cyclestarnet.CycleEmulator``) in place of the plain one.
  Defaults (the best of the measured variants, docs/cyclestarnet.md): ``mode="residual"`` and
  ``free_split=True`` (z_sp fitted with the labels, inside the box of the evaluated stars' own
  encoded z_sp).
* ``cyclestarnet``: the shared latent z_sh of the observed encoder, ranked directly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from chemtwin.methods.base import Fitted, Inputs, Method, Tags
from chemtwin.methods.payne import PayneLabels
from chemtwin.tagging import cyclestarnet_train
from chemtwin.errors import InputError
from chemtwin.tagging.cyclestarnet import FIT_MODES


@dataclass(frozen=True)
class CycleStarNetPayne(PayneLabels):
    name: ClassVar[str] = "cyclestarnet-payne"
    label: ClassVar[str] = "The Payne through Cycle-StarNet"
    needs: ClassVar[dict] = {"model": "a Cycle-StarNet folder (chemtwin cyclestarnet train)"}
    uses: ClassVar[frozenset] = frozenset({"calibration", "train"})
    model_kind: ClassVar[str] = "cyclestarnet"
    mode: str = "residual"
    free_split: bool = True
    split_stars: int = 5000        # evaluated stars encoded to find the z_sp box

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in FIT_MODES:
            raise InputError(f"mode must be one of {', '.join(FIT_MODES)}, not {self.mode!r}", "mode")

    def fit(self, inputs: Inputs, target=None) -> Fitted:
        if inputs.model is None:
            raise InputError("give the Cycle-StarNet folder (model=...)", "model")
        net, _, adapted, _ = cyclestarnet_train.load(inputs.model, self.mode)
        box = None
        if self.free_split:
            if target is None:
                raise InputError("fitting z_sp needs the stars to tag (their z_sp box); pass free_split=False",
                                 "free_split")
            b = target.read(0, min(target.n_stars, self.split_stars))
            box = cyclestarnet_train.split_box_of(net, b.flux, b.ivar)
            _, _, adapted, _ = cyclestarnet_train.load(inputs.model, self.mode, split_box=box)
        fitted = PayneLabels.fit(self, dataclasses.replace(inputs, emulator=adapted), target)
        fitted.info.update(path=os.path.abspath(str(inputs.model)), mode=self.mode, free_split=self.free_split,
                           **{"class": "CycleEmulator"})
        return fitted


@dataclass(frozen=True)
class CycleStarNetLatent(Method):
    name: ClassVar[str] = "cyclestarnet"
    label: ClassVar[str] = "Cycle-StarNet z_sh"
    needs: ClassVar[dict] = {"model": "a Cycle-StarNet folder (chemtwin cyclestarnet train)"}
    model_kind: ClassVar[str] = "cyclestarnet"

    def fit(self, inputs: Inputs, target=None) -> Fitted:
        net, _, _, meta = cyclestarnet_train.load(inputs.model)
        if target is not None and target.n_pixels != net.n_pixels:
            raise InputError(f"{target.path}: spectra have {target.n_pixels} pixels, the model {net.n_pixels}")
        info = {"path": os.path.abspath(str(inputs.model)), "class": "CycleStarNet", "latent_dim": net.cfg.latent}

        def tag(ds, evaluated: bool = True) -> Tags:
            parts = [cyclestarnet_train.shared_latents(net, b.flux, b.ivar) for b in ds.iter_batches(1024)]
            return Tags(np.concatenate(parts))

        return Fitted(info, tag)
