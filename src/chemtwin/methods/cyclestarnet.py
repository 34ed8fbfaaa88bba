"""Cycle-StarNet as methods (docs/cyclestarnet.md): two rows, both from a trained folder
(``chemtwin cyclestarnet train``), neither run by the bench unless asked (it trains no such model).

* ``cyclestarnet-payne``: The Payne's fit (``methods.payne.PayneLabels``, every option of it) with
  the adapted emulator (emulator -> synthetic encoder -> observed decoder) in place of the plain one.
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
    mode: str = "full"

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in FIT_MODES:
            raise InputError(f"mode must be one of {', '.join(FIT_MODES)}, not {self.mode!r}", "mode")

    def fit(self, inputs: Inputs, target=None) -> Fitted:
        if inputs.model is None:
            raise InputError("give the Cycle-StarNet folder (model=...)", "model")
        _, _, adapted, _ = cyclestarnet_train.load(inputs.model, self.mode)
        fitted = PayneLabels.fit(self, dataclasses.replace(inputs, emulator=adapted), target)
        fitted.info.update(path=os.path.abspath(str(inputs.model)), **{"class": "CycleEmulator", "mode": self.mode})
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
