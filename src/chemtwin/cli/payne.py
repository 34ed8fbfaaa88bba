"""``chemtwin payne train`` and ``chemtwin payne fit``: The Payne baseline.

    chemtwin payne train DATA.h5 --out EMU.npz [--labels TEFF LOGG ...] [--hidden 300]
                         [--epochs 100 | --time-limit SECONDS] [--seed 0]
    chemtwin payne fit EMU.npz DATA.h5 --out LABELS.h5 [--rv] [--label-names ...]

The emulator files use the public Payne .npz layouts (per-pixel or MLP format);
docs/baselines.md describes them and the labels file `fit` writes.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from chemtwin.cli.arguments import (
    fraction_below_one,
    CommaList,
    add_device,
    name_list,
    non_negative_int,
    positive_float,
    positive_int,
    seed,
    thread_count,
    wants_progress,
)
from chemtwin.core.files import atomic_output, prepare_output
from chemtwin.errors import InputError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "payne", help="The Payne baseline: train an emulator, fit spectra with it",
        description="The Payne (Ting et al. 2019): a neural-network emulator labels -> spectrum, "
                    "and least-squares fits of spectra with it. Emulators are .npz files in either public layout.",
    )
    sub = p.add_subparsers(dest="payne_command", metavar="SUBCOMMAND")

    t = sub.add_parser(
        "train", help="train an MLP-format emulator on a dataset",
        description="Train an MLP-format Payne emulator (2 hidden layers, leaky ReLU) on the spectra and labels "
                    "of a chemtwin dataset with Adam, keeping the weights with the lowest validation loss.",
    )
    t.add_argument("data", help="chemtwin dataset (.h5) with the training spectra")
    t.add_argument("--out", required=True, help="emulator file to write (.npz, MLP format)")
    t.add_argument("--labels", action=CommaList, default=None, metavar="A,B,...",
                   help="comma-separated labels the emulator takes (default: every label of the dataset that is not constant)")
    t.add_argument("--hidden", type=positive_int, default=300, help="neurons per hidden layer (default 300)")
    t.add_argument("--epochs", type=positive_int, default=None, help="passes over the training spectra (default 100 unless --time-limit is given)")
    t.add_argument("--time-limit", type=positive_float, default=None, help="stop after this many seconds of training")
    t.add_argument("--batch-size", type=positive_int, default=256, help="spectra per Adam step (default 256)")
    t.add_argument("--lr", type=positive_float, default=1e-3, help="initial learning rate (cosine decay to 1%%; default 1e-3)")
    t.add_argument("--val-fraction", type=fraction_below_one, default=0.1, help="fraction of stars held out for validation (default 0.1)")
    t.add_argument("--loss", choices=("auto", "ivar", "mse"), default="auto",
                   help="ivar-weighted or plain squared error; auto = mse for noiseless data (ivar inf), else ivar")
    t.add_argument("--max-stars", type=positive_int, default=None, help="train on the first N stars only")
    t.add_argument("--seed", type=seed, default=0, help="seed of the split, initialization and batch order (default 0)")
    add_device(t, "cpu", "where to train")
    t.add_argument("--threads", type=thread_count, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--json", default=None, help="also write the training report (history, validation errors) here")
    t.add_argument("--overwrite", action="store_true", help="replace existing output files")
    t.set_defaults(func=run_train)

    f = sub.add_parser(
        "fit", help="fit spectra with an emulator (labels, uncertainties, chi2)",
        description="Fit every spectrum of a dataset with a Payne emulator: Levenberg-Marquardt on all labels "
                    "(optionally the radial velocity), several starting points, ivar-weighted, masked pixels ignored.",
    )
    f.add_argument("emulator", help="Payne emulator (.npz, per-pixel or MLP format)")
    f.add_argument("data", help="chemtwin dataset (.h5) with the spectra to fit, on the emulator's pixels")
    f.add_argument("--out", required=True, help="labels file to write (.h5)")
    f.add_argument("--label-names", action=CommaList, default=None, metavar="A,B,...",
                   help="comma-separated names of the emulator's labels, in order (needed when the .npz has no label_names array)")
    f.add_argument("--rv", action="store_true", help="also fit a radial velocity (km/s) by shifting the model spectrum")
    f.add_argument("--rv-max", type=positive_float, default=200.0, help="largest |RV| searched, km/s (default 200)")
    f.add_argument("--starts", type=positive_int, default=2,
                   help="starting points per star (default 2: two linear guesses; a third is the best screened "
                        "candidate, more are random offsets from the first guess)")
    f.add_argument("--retries", type=non_negative_int, default=3,
                   help="rounds of restarts for stars whose reduced chi2 is over 10x the median (default 3; 0: none)")
    f.add_argument("--candidates", type=positive_int, default=2048,
                   help="label vectors screened to pick the starting points (default 2048)")
    f.add_argument("--max-iter", type=positive_int, default=50, help="Levenberg-Marquardt iterations per start (default 50)")
    f.add_argument("--unweighted", action="store_true", help="unit weights on unmasked pixels instead of ivar")
    f.add_argument("--hessian", choices=("auto", "exact", "shared"), default="auto",
                   help="Gauss-Newton matrix during the iterations: exact, or shared across the batch (MLP only; "
                        "auto = shared for MLP). Uncertainties always use the exact Jacobian")
    f.add_argument("--batch-size", type=positive_int, default=128, help="stars fitted together (default 128)")
    f.add_argument("--threads", type=thread_count, default=None,
                   help="batches of stars fitted in parallel, one torch thread each (default: up to 2)")
    f.add_argument("--seed", type=seed, default=0, help="seed of the screening candidates (default 0)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    f.set_defaults(func=run_fit)
    p.set_defaults(func=lambda args: _missing_subcommand(p))


def _missing_subcommand(parser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _progress(args) -> bool:
    return wants_progress(args)


def run_train(args) -> int:
    import torch

    from chemtwin.tagging.payne_train import train_emulator

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise InputError(f"device {args.device!r} is not available ({str(exc).splitlines()[0]})") from None
    prepare_output(args.out, args.overwrite, inputs=(args.data,))
    if args.json:
        prepare_output(args.json, args.overwrite, inputs=(args.data,))
    epochs = args.epochs if args.epochs is not None or args.time_limit is not None else 100
    emulator, report = train_emulator(
        args.data, labels=name_list(args.labels), hidden=args.hidden, epochs=epochs, time_limit=args.time_limit,
        batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction, loss=args.loss, seed=args.seed,
        max_stars=args.max_stars, progress=_progress(args), device=device,
    )
    path = emulator.save(args.out, overwrite=args.overwrite)
    if args.json:
        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps(report.as_dict(), indent=1))
    print(
        f"wrote {path}: MLP emulator, {len(report.label_names)} labels ({' '.join(report.label_names)}), "
        f"{emulator.n_hidden} hidden, {emulator.n_pixels} pixels"
    )
    print(
        f"trained {report.epochs} epochs ({report.steps} steps, {report.seconds:.0f} s) on {report.n_train} spectra, "
        f"loss {report.loss}; best epoch {report.best_epoch}"
    )
    print(
        f"held-out {report.n_val} spectra: median |error| {report.val_median_abs_error:.5f}, "
        f"rmse {report.val_rmse:.5f} (flux units)"
    )
    return 0


def run_fit(args) -> int:
    from chemtwin.spectral_models.payne import PayneEmulator
    from chemtwin.tagging.payne_fit import fit_dataset

    if args.rv_max > 10_000:  # no star bound to the Galaxy moves faster than ~1,000 km/s
        raise InputError(f"--rv-max {args.rv_max:g} km/s is beyond any star's radial velocity; give at most 10000")
    prepare_output(args.out, args.overwrite, inputs=(args.emulator, args.data))
    emulator = PayneEmulator.load(args.emulator, name_list(args.label_names))
    path, result, seconds = fit_dataset(
        emulator, args.data, args.out, overwrite=args.overwrite, progress=_progress(args), rv=args.rv,
        rv_max=args.rv_max, n_starts=args.starts, n_retries=args.retries, n_candidates=args.candidates, max_iter=args.max_iter,
        weighting="uniform" if args.unweighted else "ivar", hessian=args.hessian, batch_size=args.batch_size,
        threads=args.threads or min(2, os.cpu_count() or 1), seed=args.seed,
    )
    n = result.labels.shape[0]
    rate = n / seconds if seconds > 0 else float("nan")
    print(f"wrote {path}: {n} stars, {len(result.param_names)} parameters ({' '.join(result.param_names)})")
    if n:
        print(
            f"{seconds:.1f} s ({rate:.1f} stars/s); converged {int(result.converged.sum())}/{n}; "
            f"median reduced chi2 {np.nanmedian(result.reduced_chi2):.3g}; "
            f"{int(result.at_edge.sum())} stars with a label on the box edge"
        )
    return 0


# ---------------------------------------------------------------------- chemtwin generate --emulator
def add_generate_arguments(parser) -> None:
    """The options `chemtwin generate` takes to emulate spectra with a Payne emulator."""
    g = parser.add_argument_group("Payne emulator (instead of the synthesizer)")
    g.add_argument("--emulator", default=None, metavar="EMU.npz",
                   help="emulate the spectra with this Payne emulator (.npz, either public format); labels are "
                        "drawn uniformly inside its x_min/x_max box, and the file holds its labels")
    g.add_argument("--label-names", action=CommaList, default=None, metavar="A,B,...",
                   help="with --emulator: its comma-separated label names in order (needed when the .npz stores none)")
    g.add_argument("--chemical-labels", action=CommaList, default=None, metavar="A,B,...",
                   help="with --emulator: comma-separated labels the stars of a group share (default: all but TEFF, LOGG, "
                        "VMICRO, VMACRO and velocities)")
    g.add_argument("--label-range", nargs=3, action="append", default=None, metavar=("NAME", "MIN", "MAX"),
                   help="with --emulator: draw NAME uniformly in [MIN, MAX], inside the emulator's box (repeatable)")


def run_generate(args) -> int:
    """`chemtwin generate --emulator`: twin groups emulated by a Payne emulator."""
    from chemtwin.core.grids import get_grid
    from chemtwin.data.emulated import generate_emulator_dataset
    from chemtwin.data.population import RedGiantPrior
    from chemtwin.spectral_models.payne import PayneEmulator

    prior = RedGiantPrior()  # the synthesizer's defaults: --teff / --logg must not be changed
    for name, default in (("teff", prior.teff), ("logg", prior.logg)):
        if tuple(getattr(args, name)) != tuple(default):
            raise InputError(f"--{name} applies to the synthesizer; with --emulator use --label-range {name.upper()} MIN MAX")
    ranges = {}
    for name, lo, hi in args.label_range or []:
        try:
            ranges[name] = (float(lo), float(hi))
        except ValueError:
            raise InputError(f"--label-range {name}: MIN and MAX must be numbers, got {lo!r} {hi!r}") from None
    prepare_output(args.out, args.overwrite)
    emulator = PayneEmulator.load(args.emulator, name_list(args.label_names))
    wavelength = None
    if emulator.wavelength is None:
        grid = get_grid(args.grid)
        if grid.n_pixels != emulator.n_pixels:
            raise InputError(
                f"{args.emulator}: stores no wavelength and has {emulator.n_pixels} pixels, not the "
                f"{grid.n_pixels} of --grid {args.grid}"
            )
        wavelength = grid.wavelength
    generate_emulator_dataset(
        args.out, emulator, args.n_groups, args.group_size, args.snr, args.seed,
        chemical_labels=name_list(args.chemical_labels), ranges=ranges, wavelength=wavelength,
        overwrite=args.overwrite, progress=_progress(args),
    )
    print(f"wrote {args.out}: {args.n_groups * args.group_size} spectra emulated by {args.emulator}")
    return 0
