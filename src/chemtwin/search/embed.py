"""Embedding a dataset with a trained model into a latent file (``chemtwin embed``).

``embed_to_file`` streams the dataset in batches into one latent file; ``embed_sharded``
writes a folder of latent shards + manifest, one Dask task (``embed_shard``) per shard.
Shards start on whole batches, so every batch, and every latent, is the one-process path's
bit for bit.  Rows whose ivar is all zero have no latent: they are left out, and ``star_id``
is then written (the dataset's, or the row number) so that every latent keeps its star's name.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from chemtwin.core.files import file_sha256
from chemtwin.data.dataset import label_columns, open_dataset
from chemtwin.data.shard_folder import MANIFEST
from chemtwin.data.shards import run_shards, shard_ranges
from chemtwin.errors import InputError
from chemtwin.search.latents import LatentWriter, write_latents
from chemtwin.tagging.estimator import ChemTwin

log = logging.getLogger(__name__)


def model_attrs(ct: ChemTwin, model_dir) -> dict:
    """The latent file's attributes that name the model."""
    return {"model": os.path.abspath(str(model_dir)), "condition": ",".join(ct.condition),
            "latent_dim": ct.config.net.latent_dim, "model_kind": ct.config.model}


def embed_to_file(ct: ChemTwin, ds, out, attrs: dict, *, batch_size: int = 1024, files=None, overwrite: bool = False,
                  progress: bool = True) -> int:
    """Embed dataset ``ds`` in batches into the latent file ``out``; ``files``: the source file of
    each row.  Returns the number of latents written."""
    n = ds.n_stars
    rows_out = []
    with LatentWriter(out, ct.config.net.latent_dim, n, overwrite) as w:
        with tqdm(total=n, desc="embedding", unit="star", disable=not progress) as bar:
            for start, z, ok in ct.iter_embed(ds, batch_size):
                w.append(z[ok])
                rows_out.append(start + np.flatnonzero(ok))
                bar.update(len(ok))
        if w.n_rows == 0:
            raise InputError(f"{ds.path}: no row has a usable spectrum (every ivar is 0); nothing written")
        rows = np.concatenate(rows_out) if rows_out else np.zeros(0, np.int64)
        star_id = ds.star_id
        if star_id is None and w.n_rows < n:
            star_id = np.arange(n).astype(str)
        w.finish(row=rows, labels=ds.labels()[rows], label_names=ds.label_names, group=ds.group[rows],
                 star_id=None if star_id is None else star_id[rows], files=None if files is None else files[rows],
                 attrs=attrs)
    if w.n_rows < n:
        log.warning("skipped %d rows whose ivar is all zero (no latent)", n - w.n_rows)
    log.info("wrote %d latents (d=%d) to %s", w.n_rows, ct.config.net.latent_dim, out)
    return w.n_rows


def embed_sharded(ct: ChemTwin, model_dir, data, out, *, batch_size: int, shard_size: int, device: str = "cpu",
                  client=None, overwrite: bool = False, progress: bool = True) -> dict:
    """Latent shards + manifest in the folder ``out`` with the model ``ct`` loaded from ``model_dir``
    (the workers load it again), one task per ``shard_size`` rows (rounded up to whole batches) on
    the Dask ``client`` (in this process when None).  Returns the manifest."""
    data, model = os.path.abspath(str(data)), os.path.abspath(str(model_dir))
    with open_dataset(data) as ds:
        label_columns(ds, ct.condition, "condition label")  # fail here, not on every worker
        n = ds.n_stars
    stamp = Path(data) / MANIFEST if os.path.isdir(data) else Path(data)
    rows_per_shard = -(-max(shard_size, 1) // batch_size) * batch_size
    attrs = {**model_attrs(ct, model), "data": data}
    plan = {"command": "embed", "model": model, "model_sha256": file_sha256(Path(model) / "model.safetensors"),
            "data": data, "data_size": stamp.stat().st_size, "data_mtime_ns": stamp.stat().st_mtime_ns,
            "batch_size": batch_size, "rows_per_shard": rows_per_shard, "device": device}
    specs = [{"model": model, "data": data, "rows": r, "batch_size": batch_size, "device": device, "attrs": attrs}
             for r in shard_ranges(n, rows_per_shard)]
    manifest, records = run_shards(out, "latents", plan, specs, embed_shard, client,
                                   header={"dim": ct.config.net.latent_dim}, overwrite=overwrite, progress=progress,
                                   desc="embed")
    skipped = sum(r["skipped"] for r in records)
    if skipped:
        log.warning("skipped %d rows whose ivar is all zero (no latent)", skipped)
    if manifest is None:
        raise InputError(f"{data}: no row has a usable spectrum; nothing written")
    log.info("wrote %d latents (d=%d) to %s: %d shards + %s", manifest["n_rows"], ct.config.net.latent_dim, out,
             len(manifest["shards"]), MANIFEST)
    return manifest


_models: dict = {}


def embed_shard(spec: dict, path: str) -> dict:
    """Dask task: latents of rows ``spec["rows"]`` of the dataset into the latent file ``path``."""
    key = (spec["model"], spec["device"])
    if key not in _models:  # loaded once per worker process
        _models.clear()
        _models[key] = ChemTwin.load(spec["model"], device=spec["device"])
    ct = _models[key]
    a, b = spec["rows"]
    with open_dataset(spec["data"]) as ds:
        part = ds.rows(a, b)
        found = [(start, z[ok], np.flatnonzero(ok)) for start, z, ok in ct.iter_embed(part, spec["batch_size"])]
        local = np.concatenate([start + i for start, _, i in found])
        if not local.size:
            return {"rows": 0, "skipped": b - a}
        z = np.concatenate([z for _, z, _ in found])
        star_id = part.star_id
        star_id = (star_id[local] if star_id is not None else (a + local).astype(str))
        write_latents(path, z, part.group[local], star_id, part.labels()[local], part.label_names, spec["attrs"],
                      overwrite=True, row=a + local)
    return {"rows": len(z), "skipped": (b - a) - len(z)}
