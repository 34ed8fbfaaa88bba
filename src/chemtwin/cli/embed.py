"""``chemtwin embed MODEL_DIR DATA.h5 --out LATENTS.h5``: the latent of every star.

Writes ``z`` float32 (N, d), ``row`` (the dataset row of each latent) and, when the
dataset has them, ``group``, ``labels`` (+ ``names``) and ``star_id`` (the layout
``chemtwin.search.latents`` reads).  Rows whose ivar is all zero have no latent: they are
left out with a warning, and ``star_id`` is then written (the dataset's, or the row
number) so that every latent keeps its star's name.
"""

from __future__ import annotations

import logging
import os

import h5py
import numpy as np

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="compute the latent of every star of a dataset",
                              description="Encode every spectrum of DATA.h5 with a trained model into LATENTS.h5, "
                                          "reading the dataset in batches.")
    p.add_argument("model", metavar="MODEL_DIR", help="trained model folder (`chemtwin train --out`)")
    p.add_argument("data", help="dataset (.h5) to embed; must hold the model's condition labels")
    p.add_argument("--out", required=True, metavar="LATENTS.h5", help="latent file to write")
    p.add_argument("--batch-size", type=int, default=1024, help="spectra per batch (default 1024)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where to run the encoder (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing LATENTS.h5")
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm.auto import tqdm

    from chemtwin.data.dataset import open_dataset, prepare_output, temporary_path
    from chemtwin.errors import InputError
    from chemtwin.tagging.estimator import ChemTwin

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {args.batch_size}")
    ct = ChemTwin.load(args.model, device=args.device)
    out = prepare_output(args.out, args.overwrite)
    quiet = logging.getLogger().level > logging.INFO
    with open_dataset(args.data) as ds:
        tmp = temporary_path(out)
        d, n = ct.config.latent_dim, ds.n_stars
        try:
            with h5py.File(tmp, "w") as f:
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
                f.create_dataset("group", data=ds.group[rows])
                labels = ds.labels()[rows]
                f.create_dataset("labels", data=labels).attrs["names"] = np.array(ds.label_names, dtype=h5py.string_dtype())
                star_id = ds.star_id
                if star_id is None and kept < n:
                    star_id = np.arange(n).astype(str)
                if star_id is not None:
                    f.create_dataset("star_id", data=np.asarray(star_id[rows], dtype=object), dtype=h5py.string_dtype())
                f.attrs.update({"model": os.path.abspath(args.model), "data": os.path.abspath(args.data),
                                "condition": ",".join(ct.condition), "latent_dim": d, "model_kind": ct.config.model})
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if kept < n:
        log.warning("skipped %d rows whose ivar is all zero (no latent)", n - kept)
    log.info("wrote %d latents (d=%d) to %s", kept, d, out)
    return 0
