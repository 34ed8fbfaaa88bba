"""Which "other code" is a plausible survey pipeline? The Payne with an emulator of each candidate
fits the same spectra of the default synthesizer (the calibrated line list, the bench's "sky").

    python benchmarks/pipeline_codes.py --out OUT.json [--work DIR] [--stars 200] [--snr 100]

Candidates: the matched code (the sky's own line list: the paper protocol's Payne), the same list
with perturbed atomic data (``generate --mismatch``: log gf off by 0.1 dex per line, 10 % of the
lines missing; the survey protocol's pipeline) and the drawn line list (lines in other places).
Each emulator learns ``--train-stars`` noiseless spectra of its code for ``--time-limit`` seconds,
with the bench's quick settings by default.  Reported per code: the fraction of fits that
converged and that ended on the edge of the label box, the median reduced chi^2 and the
abundance and TEFF RMSE against the truth.  A real pipeline's reduced chi^2 is of order a few
(ASPCAP DR17); a code whose fits mostly end on the box's edge is another sky, not another code.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import machine

CODES = {"matched": {}, "perturbed": {"mismatch": True}, "drawn": {"linelist": "drawn"}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="pipeline_codes.json")
    parser.add_argument("--work", default=None, help="folder for the datasets (default: a temporary one)")
    parser.add_argument("--stars", type=int, default=200, help="sky spectra fitted (default 200)")
    parser.add_argument("--snr", type=float, default=100.0)
    parser.add_argument("--train-stars", type=int, default=2000)
    parser.add_argument("--time-limit", type=float, default=20.0, help="emulator training seconds (default 20)")
    args = parser.parse_args()

    from chemtwin.data.dataset import open_dataset
    from chemtwin.data.generate import generate_dataset
    from chemtwin.methods.label_fit import chemical_columns, independent_labels
    from chemtwin.tagging.payne_fit import PayneFitter
    from chemtwin.tagging.payne_train import train_emulator

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        sky = work / "sky.h5"
        if not sky.exists():
            generate_dataset(sky, (args.stars + 1) // 2, snr=args.snr, seed=1, progress=False)
        results = {"machine": machine(), "settings": vars(args), "codes": {}}
        for code, options in CODES.items():
            grid = work / f"{code}.h5"
            if not grid.exists():
                generate_dataset(grid, (args.train_stars + 1) // 2, seed=2, progress=False, **options)
            with open_dataset(grid) as ds:
                names = independent_labels(ds.label_names, ds.labels())
            emulator, report = train_emulator(grid, labels=names, epochs=None, time_limit=args.time_limit, seed=0,
                                              max_stars=args.train_stars, progress=False)
            with open_dataset(sky) as ds:
                batch = ds.read(0, args.stars)
                fit = PayneFitter(emulator, wavelength=ds.wavelength, threads=2, seed=0).fit(batch.flux, batch.ivar)
                truth = ds.true_labels(emulator.label_names)[: args.stars]
            err = fit.labels - truth
            chem = chemical_columns(emulator.label_names)
            results["codes"][code] = {
                "emulator_val_median_abs_error": report.val_median_abs_error,
                "converged": float(fit.converged.mean()), "at_edge": float(fit.at_edge.mean()),
                "median_reduced_chi2": float(np.nanmedian(fit.reduced_chi2)),
                "abundance_rmse": float(np.sqrt(np.nanmean(err[:, chem] ** 2))),
                "teff_rmse": float(np.sqrt(np.nanmean(err[:, emulator.label_names.index("TEFF")] ** 2))),
            }
            print(code, json.dumps(results["codes"][code]), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
