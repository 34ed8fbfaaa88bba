"""A latent file as tags (``chemtwin evaluate --latents``): rank-only evaluation of latents
computed elsewhere (``chemtwin embed`` output, or a folder of latent shards).  The twin groups
come from the file, or from the dataset when one is given: through the file's ``row`` array
when it has one, else row by row (the lengths must then agree)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from chemtwin.core.files import json_safe
from chemtwin.core.ranks import require_twins
from chemtwin.data.dataset import dataset_info
from chemtwin.errors import InputError
from chemtwin.methods.base import Fitted, Inputs, Method, Tags
from chemtwin.search.latents import open_latents


@dataclass(frozen=True)
class LatentFileTags(Method):
    name: ClassVar[str] = "latents"
    label: ClassVar[str] = "latent file"
    needs: ClassVar[dict] = {"latents": "the latent file to rank"}

    def fit(self, inputs: Inputs, target=None) -> Fitted:
        if inputs.latents is None:
            raise InputError("give the latent file (latents=...)", "latents")
        with open_latents(inputs.latents) as lf:
            z = lf.read()  # chemtwin embed leaves unusable stars out (its "row" column): NaN here is damage
            group, rows, attrs = lf.group, lf.rows, json_safe(lf.attrs)
            path = os.path.abspath(str(lf.path))
        info = {"path": attrs.get("model"), "class": "latents", "latents": path,
                **{k: attrs[k] for k in ("condition", "latent_dim", "model_kind") if k in attrs}}

        def tag(ds, evaluated: bool = True) -> Tags:
            if ds is None:
                if group is None:
                    raise InputError(f"{inputs.latents}: no 'group' array (give the dataset too, or embed a dataset "
                                     "with groups)")
                require_twins(group, inputs.latents)
                return Tags(z, group=group, dataset={"path": attrs.get("data"), "n_stars": int(len(z)), "attrs": {}})
            ds_group = np.asarray(ds.group, np.int64)
            if rows is not None:
                if rows.shape != (len(z),) or (rows.size and (rows.min() < 0 or rows.max() >= ds.n_stars)):
                    raise InputError(f"{inputs.latents}: its 'row' array does not index the {ds.n_stars} stars of "
                                     f"{ds.path}")
                ds_group = ds_group[rows]
            elif ds.n_stars != len(z):
                raise InputError(f"{inputs.latents} has {len(z)} latents but {ds.path} has {ds.n_stars} stars")
            if group is not None and not np.array_equal(group, ds_group):
                raise InputError(f"the groups in {inputs.latents} disagree with those of {ds.path}")
            require_twins(ds_group, inputs.latents)
            return Tags(z, group=ds_group, dataset=dataset_info(ds))

        return Fitted(info, tag)
