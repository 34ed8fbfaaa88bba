"""``chemtwin info FILE``: summary of a dataset file, or a validated folder of shards."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from chemtwin.cli.arguments import add_output, wants_progress
from chemtwin.core.files import atomic_output, prepare_output
from chemtwin.data.dataset import open_dataset
from chemtwin.data.shard_folder import MANIFEST


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="summarize a dataset file or validate a folder of shards",
                              description="Print counts, label ranges, SNR and grid of a chemtwin dataset. For a folder of "
                                          "shards, first check its manifest: every shard present, its sha256 checksum, "
                                          "row count and pixel grid (exit code 2 naming the first bad shard).")
    p.add_argument("file", help="chemtwin dataset (.h5, or a folder with manifest.json; also a folder of latent shards)")
    add_output(p, "TXT", "write the summary to this file instead of the terminal", required=False)
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o/--out file")
    p.set_defaults(func=run)


def _shards(folder: Path, quiet: bool) -> bool:
    """Validate a shard folder; print a latent folder's summary (True: nothing more to say)."""
    kind = "dataset"
    try:
        kind = json.loads((folder / MANIFEST).read_text()).get("kind", kind)
    except (OSError, ValueError, AttributeError, RecursionError):
        pass  # open_dataset names the problem
    if kind == "latents":
        from chemtwin.search.latents import ShardedLatents

        with ShardedLatents(folder) as lf:
            lf.validate(progress=not quiet)
            print(f"latents     {folder}: {lf.n_stars} x {lf.dim}, {len(lf.shard_names)} shards, checksums verified")
        return True
    with open_dataset(folder) as ds:
        ds.validate(progress=not quiet)
        print(f"shards      {len(ds.shard_names)} ({MANIFEST} valid, checksums verified)")
    return False


def run(args) -> int:
    if args.out is None:
        return _summary(args)
    prepare_output(args.out, args.overwrite, inputs=(args.file,))
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = _summary(args)
    with atomic_output(args.out, args.overwrite) as tmp:
        tmp.write_text(text.getvalue())
    return code


def _summary(args) -> int:
    if Path(args.file).is_dir() and _shards(Path(args.file), not wants_progress(args)):
        return 0
    with open_dataset(args.file) as ds:
        group = ds.group
        known = group[group >= 0]
        sizes = np.bincount(np.unique(known, return_inverse=True)[1]) if known.size else np.array([], int)
        print(f"file        {ds.path}")
        print(f"stars       {ds.n_stars}")
        print(f"pixels      {ds.n_pixels}  (grid: {ds.attrs.get('grid', 'unknown')})")
        wl = ds.wavelength
        if wl.size:
            print(f"wavelength  {wl[0]:.2f} - {wl[-1]:.2f} A")
        print(f"snr         {ds.attrs.get('snr', 'unknown')}")
        print(f"groups      {sizes.size} (sizes {sizes.min() if sizes.size else 0}-{sizes.max() if sizes.size else 0}); {int((group < 0).sum())} stars without a group")
        for key in ("generator", "seed", "chemtwin_version"):
            if key in ds.attrs:
                print(f"{key:<11} {ds.attrs[key]}")
        if ds.n_stars:
            labels = ds.labels()
            print("labels      name       min        max        mean")
            for k, name in enumerate(ds.label_names):
                col = labels[:, k]
                print(f"            {name:<9} {np.nanmin(col):<10.4g} {np.nanmax(col):<10.4g} {np.nanmean(col):.4g}")
    return 0
