"""Embedding a dataset with a trained model into a latent file (``chemtwin embed``).

``embed_to_file`` streams the dataset in batches into one latent file; ``embed_sharded``
writes a folder of latent shards + manifest, one Dask task (``embed_shard``) per shard.
Shards start on whole batches, so every batch, and every latent, is the one-process path's
bit for bit.  Rows whose ivar is all zero have no latent: they are left out, and ``star_id``
is then written (the dataset's, or the row number) so that every latent keeps its star's name.

Every latent is checked against what the model learned (``chemtwin.tagging.depth``): the
columns ``flags``, ``latent_distance`` and ``recon_chi2`` are written, and one warning line
counts the stars out of the model's depth.  Their latents are kept.
"""

from __future__ import annotations

import json
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
from chemtwin.tagging.depth import FLAG_BITS, DepthCheck, flag_counts, summary
from chemtwin.tagging.estimator import ChemTwin
from chemtwin.tagging.model_folder import read_reference

log = logging.getLogger(__name__)


def model_attrs(ct: ChemTwin, model_dir) -> dict:
    """The latent file's attributes that name the model."""
    return {"model": os.path.abspath(str(model_dir)), "condition": ",".join(ct.condition),
            "latent_dim": ct.config.net.latent_dim, "model_kind": ct.config.model}


def depth_check(ct: ChemTwin, model_dir=None) -> DepthCheck:
    """The out-of-depth check of a loaded model (label range only when its folder has no reference)."""
    return DepthCheck(ct.net_, read_reference(ct.meta, model_dir or ct.meta.get("model", "model")))


def iter_checked(ct: ChemTwin, ds, batch_size: int, check: DepthCheck):
    """Yield ``(rows, z, depth)`` per batch of ``ds``: the usable rows, their latents and the
    out-of-depth columns (``DepthCheck``)."""
    columns = label_columns(ds, ct.condition, "condition label")
    for start, z, ok in ct.iter_embed(ds, batch_size):
        sel = np.flatnonzero(ok)
        z = z[sel]
        if sel.size:
            b = ds.read(start, start + len(ok))  # the spectra once more, for the reconstruction
            depth = check(z, np.asarray(b.flux)[sel], np.asarray(b.ivar)[sel], np.asarray(b.labels)[sel][:, columns])
        else:
            depth = check(z, None, None, np.zeros((0, len(columns))))
        yield start + sel, z, depth


def depth_attrs(check: DepthCheck, flags: np.ndarray) -> dict:
    """The latent file's attributes that say how the flags were set, and how many."""
    return {"flag_bits": json.dumps(FLAG_BITS),
            "depth": json.dumps({"reference": "model folder" if check.complete else
                                 "none (model folder without one: label range only)",
                                 **check.thresholds(), **flag_counts(flags)})}


def warn_depth(check: DepthCheck, counts: dict, condition, model_dir) -> None:
    """The one warning line of out-of-depth counts (and the note for a folder without a reference)."""
    if not check.complete:
        log.warning("%s: the model folder has no out-of-depth reference (trained before chemtwin recorded one): "
                    "only the %s range was checked; latent_distance and recon_chi2 are NaN", model_dir,
                    "/".join(condition))
    line = summary(counts, check, condition)
    if line:
        log.warning("%s", line)


def embed_to_file(ct: ChemTwin, ds, out, attrs: dict, *, batch_size: int = 1024, files=None, extra=None,
                  overwrite: bool = False, progress: bool = True) -> int:
    """Embed dataset ``ds`` in batches into the latent file ``out``; ``files``: the source file of
    each row; ``extra``: more per-row text columns ({"telescope": ..., "field": ...}).  Writes the
    out-of-depth columns and the astropy table too.  Returns the number of latents written."""
    n = ds.n_stars
    rows_out, parts = [], {"flags": [], "latent_distance": [], "recon_chi2": []}
    check = depth_check(ct, attrs.get("model"))
    with LatentWriter(out, ct.config.net.latent_dim, n, overwrite) as w:
        with tqdm(total=n, desc="embedding", unit="star", disable=not progress) as bar:
            for rows, z, depth in iter_checked(ct, ds, batch_size, check):
                w.append(z)
                rows_out.append(rows)
                for key in parts:
                    parts[key].append(depth[key])
                bar.update(min(batch_size, n - bar.n))
        if w.n_rows == 0:
            raise InputError(f"{ds.path}: no row has a usable spectrum (every ivar is 0); nothing written")
        rows = np.concatenate(rows_out) if rows_out else np.zeros(0, np.int64)
        star_id = ds.star_id
        if star_id is None and w.n_rows < n:
            star_id = np.arange(n).astype(str)
        arrays = {key: np.concatenate(v) for key, v in parts.items()}
        arrays.update({key: np.asarray(v)[rows] for key, v in (extra or {}).items()})
        w.finish(row=rows, labels=ds.labels()[rows], label_names=ds.label_names, group=ds.group[rows],
                 star_id=None if star_id is None else star_id[rows], files=None if files is None else files[rows],
                 attrs={**attrs, **depth_attrs(check, arrays["flags"])}, arrays=arrays, table=True)
    if w.n_rows < n:
        log.warning("skipped %d rows whose ivar is all zero (no latent)", n - w.n_rows)
    warn_depth(check, flag_counts(arrays["flags"]), ct.condition, attrs.get("model"))
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
    counts = flag_counts(np.zeros(0, np.int16))
    for r in records:
        for key, value in (r.get("depth") or {}).items():
            counts[key] += value
    warn_depth(depth_check(ct, model), counts, ct.condition, model)
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
    check = depth_check(ct, spec["model"])
    with open_dataset(spec["data"]) as ds:
        part = ds.rows(a, b)
        found = list(iter_checked(ct, part, spec["batch_size"], check))
        local = np.concatenate([rows for rows, _, _ in found])
        if not local.size:
            return {"rows": 0, "skipped": b - a, "depth": {}}
        z = np.concatenate([z for _, z, _ in found])
        arrays = {key: np.concatenate([d[key] for _, _, d in found]) for key in found[0][2]}
        star_id = part.star_id
        star_id = (star_id[local] if star_id is not None else (a + local).astype(str))
        write_latents(path, z, part.group[local], star_id, part.labels()[local], part.label_names,
                      {**spec["attrs"], **depth_attrs(check, arrays["flags"])}, overwrite=True, row=a + local,
                      arrays=arrays, table=True)
    return {"rows": len(z), "skipped": (b - a) - len(z), "depth": flag_counts(arrays["flags"])}
