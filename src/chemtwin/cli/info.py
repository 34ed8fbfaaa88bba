"""``chemtwin info FILE``: summary of a dataset file."""

from __future__ import annotations

import numpy as np

from chemtwin.data.dataset import open_dataset


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="summarize a dataset file", description="Print counts, label ranges, SNR and grid of a chemtwin dataset.")
    p.add_argument("file", help="chemtwin dataset (.h5)")
    p.set_defaults(func=run)


def run(args) -> int:
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
