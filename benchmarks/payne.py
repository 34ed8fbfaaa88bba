"""The Payne baseline: how well an emulator learns the synthesizer, how fast and well it fits.

    python benchmarks/payne.py --out results/payne.json [--quick] [--work DIR] [--device cpu]

1. Generates noiseless synthesizer spectra with `chemtwin.data.generate` (red-giant prior,
   with star-to-star scatter in VMICRO / VMACRO so that all 21 labels vary independently):
   20,000 for training (2,000 with --quick) and 1,000 held out (300).
2. Trains an MLP-format emulator on all 21 labels (`chemtwin.tagging.payne_train`; 300
   hidden neurons; until --epochs or --time-limit).
3. Emulator accuracy: median |emulated - synthesized| over the held-out spectra's pixels,
   in units of the continuum (1).  Target: below 0.005 (0.5%).
4. Fitting (`chemtwin.tagging.payne_fit`, 2 threads): noiseless spectra emulated at
   the held-out labels are fitted with all labels free; stars/s (wall clock, and per CPU
   second) and the label errors against the targets 10 K (TEFF), 0.02 dex (LOGG), 0.01 dex
   (abundances).  Also without the restarts of suspect fits, with 4 starting points instead
   of 2, with a radial velocity, and on the held-out synthesizer spectra themselves (the
   emulator's own error then shows up in the labels).

Writes one JSON file.  Files in --work are reused when present (delete them to start over).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import machine

TARGETS = {"TEFF": 10.0, "LOGG": 0.02, "abundance": 0.01}


def generate(path: Path, n: int, seed: int) -> Path:
    from chemtwin.data.generate import generate_dataset
    from chemtwin.data.population import RedGiantPrior

    if not path.exists():
        prior = RedGiantPrior(vmicro_scatter=0.3, vmacro_scatter=1.0)
        generate_dataset(path, n_groups=n, group_size=1, snr=float("inf"), seed=seed, prior=prior, progress=True)
    return path


def label_errors(names: list[str], fitted: np.ndarray, truth: np.ndarray) -> dict:
    """Per-label median / 95th percentile / max |error| and the fraction of stars within all targets."""
    error = np.abs(fitted - truth)
    limit = np.array([TARGETS.get(n, TARGETS["abundance"]) if n in ("TEFF", "LOGG") or n.endswith(("_FE", "_H"))
                      else np.inf for n in names])
    ok = np.all(error <= limit, axis=1)
    return {
        "per_label": {n: {"median": float(np.median(error[:, k])), "p95": float(np.percentile(error[:, k], 95)),
                          "max": float(error[:, k].max()), "target": None if np.isinf(limit[k]) else float(limit[k])}
                      for k, n in enumerate(names)},
        "fraction_within_targets": float(ok.mean()),
    }


def timed_fit(emulator, flux, ivar, wavelength=None, **kwargs):
    from chemtwin.tagging.payne_fit import PayneFitter

    fitter = PayneFitter(emulator, wavelength=wavelength, threads=2, **kwargs)
    fitter.fit(flux[:16], ivar[:16])  # warm up
    wall, cpu = time.perf_counter(), time.process_time()
    result = fitter.fit(flux, ivar)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return result, {"stars": len(flux), "seconds": wall, "stars_per_s": len(flux) / wall,
                    "stars_per_cpu_s": len(flux) / cpu, "median_iterations": float(np.median(result.n_iter)),
                    "converged": float(result.converged.mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="2,000 training spectra, short training, 128 fits")
    parser.add_argument("--work", default=None, help="folder for the generated data and the emulator (default: temporary)")
    parser.add_argument("--hidden", type=int, default=300, help="neurons per hidden layer (default 300)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 2000; 400 with --quick)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="training seconds (default 10800; 300 with --quick)")
    parser.add_argument("--device", default="cpu", help="device for training the emulator (fitting runs on the CPU)")
    parser.add_argument("--fit-stars", type=int, default=None, help="stars fitted (default 512; 128 with --quick)")
    args = parser.parse_args(argv)

    from chemtwin.data.dataset import open_dataset
    from chemtwin.spectral_models.payne import PayneEmulator
    from chemtwin.tagging.payne_train import train_emulator

    n_train, n_test = (2000, 300) if args.quick else (20000, 1000)
    epochs = args.epochs or (400 if args.quick else 2000)
    time_limit = args.time_limit or (300.0 if args.quick else 10800.0)
    n_fit = args.fit_stars or (128 if args.quick else 512)
    results = {"benchmark": "payne", "quick": args.quick, "machine": machine(), "command": " ".join(sys.argv)}
    temporary = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(args.work or temporary.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        train_path = generate(work / f"payne_train_{n_train}.h5", n_train, seed=1)
        test_path = generate(work / f"payne_test_{n_test}.h5", n_test, seed=2)
        results["generate_seconds"] = time.perf_counter() - t0

        emu_path = work / f"payne_emulator_{n_train}_{args.hidden}.npz"
        if emu_path.exists():
            emulator = PayneEmulator.load(emu_path)
            results["training"] = {"reused": str(emu_path)}
        else:
            emulator, report = train_emulator(train_path, hidden=args.hidden, epochs=epochs, time_limit=time_limit,
                                              seed=0, device=args.device, progress=True)
            emulator.save(emu_path)
            results["training"] = {k: v for k, v in report.as_dict().items() if k != "history"}
            results["training"]["history_every_10th"] = report.history[::10]
        results["training"].update(n_spectra=n_train, hidden=emulator.n_hidden, labels=emulator.label_names,
                                   device=args.device)

        with open_dataset(test_path) as ds:
            test = ds.read()
            wavelength = ds.wavelength
            truth = test.labels[:, ds.label_columns(emulator.label_names)].astype(np.float64)
        # held-out labels outside the training box (rare at the prior's tails) are left out
        inside = np.all((truth >= emulator.x_min) & (truth <= emulator.x_max), axis=1)
        truth, synth_flux = truth[inside], test.flux[inside]
        emulated = emulator.predict(truth)
        error = np.abs(emulated - synth_flux)
        results["emulator_accuracy"] = {
            "held_out_spectra": int(inside.sum()),
            "median_abs_error": float(np.median(error)),
            "p90_abs_error": float(np.percentile(error, 90)),
            "p99_abs_error": float(np.percentile(error, 99)),
            "median_of_per_star_max": float(np.median(error.max(1))),
            "target_median": 0.005,
            "meets_target": bool(np.median(error) < 0.005),
        }
        print(json.dumps(results["emulator_accuracy"], indent=1), flush=True)

        rows = slice(0, min(n_fit, len(truth)))
        flux = emulated[rows]
        noiseless = np.full_like(flux, np.inf)
        fits = {}
        for name, kwargs in (("default", {}), ("no_retries", {"n_retries": 0}), ("four_starts", {"n_starts": 4})):
            result, speed = timed_fit(emulator, flux, noiseless, **kwargs)
            fits[name] = {**speed, **label_errors(emulator.label_names, result.labels, truth[rows]), "settings": kwargs}
            print(name, json.dumps({k: v for k, v in fits[name].items() if k != "per_label"}), flush=True)
        # with a radial velocity: the noiseless spectra shifted by known velocities
        from chemtwin.tagging.payne_fit.forward import SpectrumModel

        velocity = np.random.default_rng(5).uniform(-50, 50, flux.shape[0])
        shifter = SpectrumModel(emulator, wavelength, rv=True)
        with torch.no_grad():
            shifted = shifter.shift(torch.from_numpy(flux).double(), torch.from_numpy(velocity)).numpy()
        result, speed = timed_fit(emulator, shifted, noiseless, wavelength=wavelength, rv=True)
        fits["with_rv"] = {**speed, **label_errors(emulator.label_names, result.labels, truth[rows]),
                           "rv_max_abs_error_kms": float(np.abs(result.rv - velocity).max())}
        print("with_rv", json.dumps({k: v for k, v in fits["with_rv"].items() if k != "per_label"}), flush=True)
        # the synthesizer's own (noiseless) spectra: emulator error becomes label error
        result, speed = timed_fit(emulator, synth_flux[rows], noiseless)
        fits["synthesizer_spectra"] = {**speed, **label_errors(emulator.label_names, result.labels, truth[rows]),
                                       "median_reduced_chi2_unit_weights": float(np.median(result.chi2 / result.n_pixels))}
        results["fitting"] = fits
        results["fitting_targets"] = TARGETS
        results["meets_targets"] = {
            "emulator_median_abs_error_below_0.005": results["emulator_accuracy"]["meets_target"],
            "noiseless_recovery_all_within_targets": fits["default"]["fraction_within_targets"] == 1.0,
            "at_least_50_stars_per_s": fits["default"]["stars_per_s"] >= 50,
        }
    finally:
        if temporary is not None:
            temporary.cleanup()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
