"""``chemtwin embed MODEL_DIR DATA.h5|FILES... --out LATENTS.h5``: the latent of every star.

Writes the latent file of ``chemtwin.search.latents`` (``z``, ``row``, and when the dataset
has them ``group``, ``labels`` and ``star_id``) through ``chemtwin.search.embed``.  Rows
whose ivar is all zero have no latent: they are left out with a warning, and ``star_id`` is
then written (the dataset's, or the row number) so that every latent keeps its star's name.

Given APOGEE spectrum files (apStar / aspcapStar / apVisit, globs, ``--file-list``)
instead of a dataset, they are ingested on the fly by ``chemtwin ingest``'s own code
(``ingest_files``: same reading, rest frame, continuum normalization, grid, per-file
skipping) into a temporary dataset next to the output, which is embedded and removed.
The condition labels come from ``--catalog`` or else from each file's header
(``chemtwin.data.apogee.header_labels``).  ``row`` is then the spectrum's position among
the usable files, and ``file`` names each latent's source file, ``telescope`` and ``field``
the TELESCOP and FIELD keywords of its header.  Exit code 1 when some files were skipped
(listed on stderr), 2 when none could be used (nothing written).

Every latent is checked against the model's out-of-depth reference (``flags``,
``latent_distance``, ``recon_chi2``; one warning line with the counts).  ``--format fits|ecsv``
(or an ``--out`` ending in .fits / .ecsv) writes the same stars as a FITS binary table or ECSV
for TOPCAT and ``astropy.table.Table.read`` instead of the HDF5 latent file (which holds that
table too); chemtwin's own commands (index, cluster, whiten) read the HDF5 file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import h5py
import numpy as np

from chemtwin.cli.arguments import add_cluster_options, positive_int, progress_bars, wants_cluster
from chemtwin.cli.ingest import (
    add_spectrum_options,
    check_spectrum_options,
    expand_inputs,
    ingest_files,
    report_errors,
)
from chemtwin.core.files import open_fits, prepare_output, scratch_path
from chemtwin.core.grids import GRID_NAMES, get_grid, identify_grid
from chemtwin.data.allstar import read_catalog
from chemtwin.data.apogee import header_labels
from chemtwin.data.dataset import open_dataset
from chemtwin.data.shards import dask_client
from chemtwin.errors import InputError
from chemtwin.search.embed import embed_sharded, embed_to_file, model_attrs
from chemtwin.search.latents import LatentFile
from chemtwin.search.tables import FORMATS, output_format, write_table
from chemtwin.tagging.estimator import ChemTwin

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="compute the latent of every star of a dataset or of APOGEE spectrum files",
                              description="Encode every spectrum of DATA.h5 with a trained model into LATENTS.h5, "
                                          "reading the dataset in batches. Given APOGEE spectrum files (apStar, "
                                          "aspcapStar, apVisit; globs) instead, ingest them on the fly exactly as "
                                          "`chemtwin ingest` does; unusable files are listed and skipped (exit code 1, "
                                          "2 if none was usable).")
    p.add_argument("model", metavar="MODEL_DIR", help="trained model folder (`chemtwin train --out`)")
    p.add_argument("inputs", nargs="*", metavar="DATA.h5|FILE",
                   help="one dataset (.h5) holding the model's condition labels, or APOGEE spectrum files / quoted glob patterns")
    p.add_argument("--out", required=True, metavar="LATENTS.h5", help="latent file to write (.fits / .ecsv: a table)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="hdf5 (the latent file chemtwin reads back; default), fits (binary table) or ecsv; "
                        "default: from the --out suffix")
    p.add_argument("--catalog", metavar="CAT.fits",
                   help="spectrum files: allStar-style table giving the condition labels by APOGEE_ID (default: each "
                        "file's header: TEFF/LOGG/FE_H, else the RV pipeline's RV_TEFF... (apStar) or RVTEFF... (apVisit))")
    add_spectrum_options(p, grid_default=None, grid_help="spectrum files: wavelength grid (default: the model's)")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="spectra per batch (default 1024)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where to run the encoder (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing LATENTS.h5")
    add_cluster_options(p, "stars (rounded up to whole batches)", 65536)
    p.set_defaults(func=run)


def _progress() -> bool:
    return progress_bars(logging.getLogger().level > logging.INFO)


def run(args) -> int:
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {args.batch_size}")
    fmt = output_format(args.out, args.format)
    if fmt != "hdf5":
        if wants_cluster(args):
            raise InputError(f"--workers/--scheduler write a folder of HDF5 latent shards, not {fmt}; embed into a "
                             f"single file for a {fmt} table")
        out = prepare_output(args.out, args.overwrite, inputs=(*args.inputs, *filter(None, (args.catalog, args.file_list))))
        latents, overwrite = scratch_path(out, "latents"), args.overwrite
        try:
            args.out, args.overwrite = latents, True
            code = _embed(args)
            with LatentFile(latents) as lf:
                write_table(lf.table(), out, fmt, overwrite=overwrite)
        finally:
            latents.unlink(missing_ok=True)
        log.info("wrote the latent table (%s) to %s", fmt, out)
        return code
    return _embed(args)


def _embed(args) -> int:
    """The HDF5 latent file (or folder of shards) at ``args.out``."""
    ct = ChemTwin.load(args.model, device=args.device)
    if wants_cluster(args):
        if len(args.inputs) != 1 or args.file_list or not _is_hdf5(args.inputs[0]):
            raise InputError("--workers/--scheduler embed one dataset; turn spectrum files into one first "
                             "(`chemtwin ingest --workers N`)")
        with dask_client(args.workers, args.scheduler, args.connect_timeout) as client:
            embed_sharded(ct, args.model, args.inputs[0], args.out, batch_size=args.batch_size,
                          shard_size=args.shard_size, device=args.device, client=client, overwrite=args.overwrite,
                          progress=_progress())
        return 0
    sources = (*args.inputs, *filter(None, (args.catalog, args.file_list)))
    out = prepare_output(args.out, args.overwrite, inputs=sources)
    if len(args.inputs) == 1 and not args.file_list and _is_hdf5(args.inputs[0]):
        with open_dataset(args.inputs[0]) as ds:
            embed_to_file(ct, ds, out, {**model_attrs(ct, args.model), "data": os.path.abspath(args.inputs[0])},
                          batch_size=args.batch_size, overwrite=args.overwrite, progress=_progress())
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
    """Spectrum files -> ``ingest_files`` into a temporary dataset -> ``embed_to_file``."""
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
    n_pixels = ct.n_features_in_
    grid = args.grid or (identify_grid(ct.wavelength) if ct.wavelength is not None else None)
    if grid is None or get_grid(grid).n_pixels != n_pixels:
        same_size = [g for g in GRID_NAMES if get_grid(g).n_pixels == n_pixels]
        hint = (f"pass --grid {same_size[0]} if it was trained on that grid" if same_size and args.grid is None
                else f"spectrum files need a model trained on an APOGEE grid ({', '.join(GRID_NAMES)})")
        raise InputError(f"{args.model}: the model was trained on {n_pixels} pixels"
                         f"{'' if args.grid is None else f', not the {args.grid} grid'}; {hint}")
    args.grid = grid
    files = expand_inputs(args.inputs, args.file_list)
    spectra = scratch_path(out, "spectra")
    try:
        result = ingest_files(files, spectra, names, labels_of, args,
                              {"catalog": os.path.basename(args.catalog) if args.catalog else "headers"},
                              progress=_progress())
        report_errors("embed", result, len(files))
        with open_dataset(spectra) as ds:
            embed_to_file(ct, ds, out, {**model_attrs(ct, args.model), "data": f"{len(files)} spectrum file(s)",
                                        "grid": grid, "labels_from": args.catalog or "headers"},
                          batch_size=args.batch_size, files=np.asarray(result.files, dtype=object),
                          extra=_telescope_field(result.files), overwrite=True, progress=_progress())
    finally:
        spectra.unlink(missing_ok=True)
    return 1 if result.errors else 0


def _telescope_field(files) -> dict:
    """TELESCOPE and FIELD of each spectrum file from its primary header (TELESCOP, FIELD; "" when
    absent): apStar files name their field, apVisit files their telescope."""
    out = {"telescope": [], "field": []}
    for path in files:
        try:
            with open_fits(path) as hdus:
                header = hdus[0].header
                values = [header.get("TELESCOP", header.get("TELESCOPE", "")), header.get("FIELD", "")]
        except InputError:
            values = ["", ""]
        for key, value in zip(out, values):
            out[key].append(str(value).strip())
    return {key: np.asarray(v, dtype=str) for key, v in out.items() if any(v)}
