"""``chemtwin embed MODEL_DIR DATA.h5|FILES... --out LATENTS.h5``: the latent of every star.

Writes ``z`` float32 (N, d), ``row`` (the dataset row of each latent) and, when the
dataset has them, ``group``, ``labels`` (+ ``names``) and ``star_id`` (the layout
``chemtwin.search.latents`` reads).  Rows whose ivar is all zero have no latent: they are
left out with a warning, and ``star_id`` is then written (the dataset's, or the row
number) so that every latent keeps its star's name.

Given APOGEE spectrum files (apStar / aspcapStar / apVisit, globs, ``--file-list``)
instead of a dataset, they are ingested on the fly by ``chemtwin ingest``'s own code
(``ingest_files``: same reading, rest frame, continuum normalization, grid, per-file
skipping) into a temporary dataset next to the output, which is embedded and removed.
The condition labels come from ``--catalog`` or else from each file's header
(``chemtwin.data.apogee.header_labels``).  ``row`` is then the spectrum's position among
the usable files, and ``file`` names each latent's source file.  Exit code 1 when some
files were skipped (listed on stderr), 2 when none could be used (nothing written).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from chemtwin.cli.arguments import add_cluster_options
    from chemtwin.cli.ingest import add_spectrum_options

    p = subparsers.add_parser("embed", help="compute the latent of every star of a dataset or of APOGEE spectrum files",
                              description="Encode every spectrum of DATA.h5 with a trained model into LATENTS.h5, "
                                          "reading the dataset in batches. Given APOGEE spectrum files (apStar, "
                                          "aspcapStar, apVisit; globs) instead, ingest them on the fly exactly as "
                                          "`chemtwin ingest` does; unusable files are listed and skipped (exit code 1, "
                                          "2 if none was usable).")
    p.add_argument("model", metavar="MODEL_DIR", help="trained model folder (`chemtwin train --out`)")
    p.add_argument("inputs", nargs="*", metavar="DATA.h5|FILE",
                   help="one dataset (.h5) holding the model's condition labels, or APOGEE spectrum files / quoted glob patterns")
    p.add_argument("--out", required=True, metavar="LATENTS.h5", help="latent file to write")
    p.add_argument("--catalog", metavar="CAT.fits",
                   help="spectrum files: allStar-style table giving the condition labels by APOGEE_ID (default: each "
                        "file's header: TEFF/LOGG/FE_H, else the RV pipeline's RV_TEFF... (apStar) or RVTEFF... (apVisit))")
    add_spectrum_options(p, grid_default=None, grid_help="spectrum files: wavelength grid (default: the model's)")
    p.add_argument("--batch-size", type=int, default=1024, help="spectra per batch (default 1024)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where to run the encoder (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing LATENTS.h5")
    add_cluster_options(p, "stars (rounded up to whole batches)", 65536)
    p.set_defaults(func=run)


def run(args) -> int:
    from chemtwin.cli.arguments import wants_cluster
    from chemtwin.core.files import prepare_output
    from chemtwin.data.dataset import open_dataset
    from chemtwin.errors import InputError
    from chemtwin.tagging.estimator import ChemTwin

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {args.batch_size}")
    ct = ChemTwin.load(args.model, device=args.device)
    if wants_cluster(args):
        if len(args.inputs) != 1 or args.file_list or not _is_hdf5(args.inputs[0]):
            raise InputError("--workers/--scheduler embed one dataset; turn spectrum files into one first "
                             "(`chemtwin ingest --workers N`)")
        return _embed_sharded(ct, args)
    out = prepare_output(args.out, args.overwrite)
    if len(args.inputs) == 1 and not args.file_list and _is_hdf5(args.inputs[0]):
        with open_dataset(args.inputs[0]) as ds:
            _write_latents(ct, ds, out, args, {"data": os.path.abspath(args.inputs[0])})
        return 0
    if not args.inputs and not args.file_list:
        raise InputError("nothing to embed: give a dataset (.h5) or spectrum files")
    if any(_is_hdf5(p) for p in args.inputs):
        raise InputError("give one dataset (.h5) or spectrum files (FITS), not several datasets or a mix")
    return _embed_files(ct, out, args)


def _is_hdf5(path: str) -> bool:
    if os.path.isdir(path):  # a sharded dataset (open_dataset says so when it is not one)
        return True
    return Path(path).suffix.lower() in (".h5", ".hdf5") or (os.path.isfile(path) and h5py.is_hdf5(path))


def _embed_files(ct, out: Path, args) -> int:
    """Spectrum files -> ``ingest_files`` into a temporary dataset -> ``_write_latents``."""
    from chemtwin.cli.ingest import check_spectrum_options, expand_inputs, ingest_files, report_errors
    from chemtwin.core.grids import GRID_NAMES, get_grid, identify_grid
    from chemtwin.data.apogee import header_labels, read_catalog
    from chemtwin.data.dataset import open_dataset
    from chemtwin.errors import InputError

    check_spectrum_options(args)
    condition = list(ct.condition)
    if args.catalog:
        catalog = read_catalog(args.catalog)
        missing = [c for c in condition if c not in catalog.label_names]
        if missing:
            raise InputError(f"catalogue {args.catalog}: has no column(s) {', '.join(missing)}; "
                             f"the model is conditioned on {','.join(condition)}")
        columns = [catalog.label_names.index(c) for c in condition]
        names = catalog.label_names

        def labels_of(spectrum):
            values = catalog.lookup(spectrum.apogee_id, keep_flagged=args.keep_flagged)
            for name, value in zip(condition, values[columns]):
                if not np.isfinite(value):
                    raise InputError(f"APOGEE_ID {spectrum.apogee_id!r} has no {name} in catalogue {args.catalog}")
            return values
    else:
        names = condition
        log.warning("no --catalog: %s taken from the file headers (for apStar/apVisit files the RV pipeline's "
                    "template fit, RV_TEFF.../RVTEFF..., not ASPCAP labels)", ",".join(condition))

        def labels_of(spectrum):
            return header_labels(spectrum, condition)
    n_pixels = ct.model.n_pixels
    grid = args.grid or (identify_grid(ct.wavelength) if ct.wavelength is not None else None)
    if grid is None or get_grid(grid).n_pixels != n_pixels:
        same_size = [g for g in GRID_NAMES if get_grid(g).n_pixels == n_pixels]
        hint = (f"pass --grid {same_size[0]} if it was trained on that grid" if same_size and args.grid is None
                else f"spectrum files need a model trained on an APOGEE grid ({', '.join(GRID_NAMES)})")
        raise InputError(f"{args.model}: the model was trained on {n_pixels} pixels"
                         f"{'' if args.grid is None else f', not the {args.grid} grid'}; {hint}")
    args.grid = grid
    files = expand_inputs(args.inputs, args.file_list)
    spectra = out.with_name(f".{out.name}.spectra-{os.getpid()}.h5")
    try:
        result = ingest_files(files, spectra, names, labels_of, args,
                              {"catalog": os.path.basename(args.catalog) if args.catalog else "headers"},
                              progress=logging.getLogger().level <= logging.INFO)
        report_errors("embed", result.errors, len(files))
        if result.n_rows == 0:
            raise InputError(f"no usable spectrum among {len(files)} file(s); nothing written")
        with open_dataset(spectra) as ds:
            _write_latents(ct, ds, out, args, {"data": f"{len(files)} spectrum file(s)", "grid": grid,
                                               "labels_from": args.catalog or "headers"},
                           files=np.asarray(result.files, dtype=object))
    finally:
        spectra.unlink(missing_ok=True)
    return 1 if result.errors else 0


def _write_latents(ct, ds, out: Path, args, attrs: dict, files=None) -> None:
    """Embed dataset ``ds`` in batches into ``out`` (atomically); ``files``: source file per row."""
    from tqdm.auto import tqdm

    from chemtwin.core.files import atomic_output
    from chemtwin.data.dataset import write_star_columns

    quiet = logging.getLogger().level > logging.INFO
    d, n = ct.config.net.latent_dim, ds.n_stars
    with atomic_output(out) as tmp, h5py.File(tmp, "w") as f:
        z_out = f.create_dataset("z", shape=(0, d), maxshape=(None, d), dtype="f4", chunks=(min(max(n, 1), 65536), d))
        rows_out, kept = [], 0
        with tqdm(total=n, desc="embedding", unit="star", disable=quiet) as bar:
            for start, z, ok in ct.iter_embed(ds, args.batch_size):
                z = z[ok]
                z_out.resize(kept + len(z), axis=0)
                z_out[kept:] = z
                kept += len(z)
                rows_out.append(start + np.flatnonzero(ok))
                bar.update(len(ok))
        rows = np.concatenate(rows_out) if rows_out else np.zeros(0, np.int64)
        f.create_dataset("row", data=rows.astype(np.int64))
        labels = ds.labels()[rows]
        f.create_dataset("labels", data=labels).attrs["names"] = np.array(ds.label_names, dtype=h5py.string_dtype())
        star_id = ds.star_id
        if star_id is None and kept < n:
            star_id = np.arange(n).astype(str)
        write_star_columns(f, ds.group[rows], None if star_id is None else star_id[rows])
        if files is not None:
            f.create_dataset("file", data=files[rows], dtype=h5py.string_dtype())
        f.attrs.update({"model": os.path.abspath(args.model), "condition": ",".join(ct.condition), "latent_dim": d,
                        "model_kind": ct.config.model, **attrs})
    if kept < n:
        log.warning("skipped %d rows whose ivar is all zero (no latent)", n - kept)
    log.info("wrote %d latents (d=%d) to %s", kept, d, out)


# ---------------------------------------------------------------- sharded (Dask)
def _embed_sharded(ct, args) -> int:
    """Latent shards + manifest in the folder ``--out``, one Dask task per ``--shard-size``
    rows.  Shards start on whole batches, so every batch, and every latent, is the one-process
    path's bit for bit.  Every shard names its stars (the dataset's star_id, else the row)."""
    from chemtwin.core.files import file_sha256
    from chemtwin.data.dataset import MANIFEST, label_columns, open_dataset
    from chemtwin.data.shards import dask_client, run_shards, shard_ranges

    data, model = os.path.abspath(args.inputs[0]), os.path.abspath(args.model)
    with open_dataset(data) as ds:
        label_columns(ds, ct.condition, "condition label")  # fail here, not on every worker
        n = ds.n_stars
    stamp = Path(data) / MANIFEST if os.path.isdir(data) else Path(data)
    rows_per_shard = -(-max(args.shard_size, 1) // args.batch_size) * args.batch_size
    attrs = {"model": model, "data": data, "condition": ",".join(ct.condition), "latent_dim": ct.config.net.latent_dim,
             "model_kind": ct.config.model}
    plan = {"command": "embed", "model": model, "model_sha256": file_sha256(Path(model) / "model.safetensors"),
            "data": data, "data_size": stamp.stat().st_size, "data_mtime_ns": stamp.stat().st_mtime_ns,
            "batch_size": args.batch_size, "rows_per_shard": rows_per_shard, "device": args.device}
    specs = [{"model": model, "data": data, "rows": r, "batch_size": args.batch_size, "device": args.device, "attrs": attrs}
             for r in shard_ranges(n, rows_per_shard)]
    with dask_client(args.workers, args.scheduler, args.connect_timeout) as client:
        manifest, records = run_shards(args.out, "latents", plan, specs, embed_shard, client,
                                       header={"dim": ct.config.net.latent_dim}, overwrite=args.overwrite,
                                       progress=logging.getLogger().level <= logging.INFO, desc="embed")
    skipped = sum(r["skipped"] for r in records)
    if skipped:
        log.warning("skipped %d rows whose ivar is all zero (no latent)", skipped)
    if manifest is None:
        from chemtwin.errors import InputError

        raise InputError(f"{data}: no row has a usable spectrum; nothing written")
    log.info("wrote %d latents (d=%d) to %s: %d shards + %s", manifest["n_rows"], ct.config.net.latent_dim, args.out,
             len(manifest["shards"]), MANIFEST)
    return 0


_models: dict = {}


def embed_shard(spec: dict, path: str) -> dict:
    """Dask task: latents of rows ``spec["rows"]`` of the dataset into the latent file ``path``."""
    from chemtwin.data.dataset import open_dataset
    from chemtwin.search.latents import write_latents
    from chemtwin.tagging.estimator import ChemTwin

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
