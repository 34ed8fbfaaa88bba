"""``chemtwin bench``: the whole benchmark, from generated data to ``report.md``.

    chemtwin bench -o OUT_DIR [--quick] [--protocol survey|paper] [--snr inf,100,50,30] ...

Generates twin sets at every SNR (the paper protocol adds an "observed-like" mismatch set),
trains the fader and the cae baseline at each, evaluates every method on the same validation stars and
writes ``OUT_DIR/report.md``, ``OUT_DIR/results.json`` and ``OUT_DIR/figures/``.  Run the
same command again to finish an interrupted run: finished steps are skipped.
"""

from __future__ import annotations

import math

import torch

from chemtwin.cli.arguments import add_output, positive_int, seed, thread_count
from chemtwin.errors import InputError
from chemtwin.data.label_errors import LabelErrors
from chemtwin.evaluation.bench import PROTOCOLS, BenchConfig, bench_methods, on_request_methods, run_bench


def _snrs(text: str) -> tuple:
    try:
        return tuple(math.inf if s.strip().lower() == "inf" else float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise InputError(f"--snr takes comma-separated numbers or inf, got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="the whole benchmark: generate, train, evaluate every method, write a report",
        description="Generate twin sets at several SNRs, train the fader and the cae baseline at each, evaluate "
                    "every method (fader, cae, Cramer-Rao oracle, polynomial residuals, raw spectra, The Cannon, "
                    "The Payne, and fader, cae and polyres with the twin metric) on the same validation stars, and write report.md, results.json and figures. "
                    "Defaults are the paper's sizes (25,000/12,500 pairs; hours on a CPU); --quick runs a small "
                    "version in minutes. Rerun the same command to finish an interrupted run.")
    add_output(p, "OUT_DIR", "folder for data, models, results and the report", positional=True)
    p.add_argument("--quick", action="store_true",
                   help="small sets (1,000/300 pairs), 15 s of training per model: minutes on 2 CPU cores")
    p.add_argument("--n-train-pairs", type=positive_int, default=None, help="training twin pairs per scenario (default 25000)")
    p.add_argument("--n-val-pairs", type=positive_int, default=None, help="validation twin pairs per scenario (default 12500)")
    p.add_argument("--protocol", default="survey", metavar="|".join(PROTOCOLS),
                   help="survey (default): TEFF/LOGG with survey errors, The Payne with another code's emulator and "
                        "The Cannon on that pipeline's labels, at every SNR; paper: exact labels and the matched "
                        "model, plus one mismatch scenario")
    defaults = LabelErrors()
    p.add_argument("--teff-error", type=float, default=None, metavar="K",
                   help=f"survey protocol: random TEFF error, 1 sigma (default {defaults.teff_random:g} K)")
    p.add_argument("--logg-error", type=float, default=None, metavar="DEX",
                   help=f"survey protocol: random LOGG error, 1 sigma (default {defaults.logg_random:g} dex)")
    p.add_argument("--teff-systematic", type=float, default=None, metavar="K",
                   help=f"survey protocol: TEFF error per dex of FE_H (default {defaults.teff_per_feh:g} K)")
    p.add_argument("--logg-systematic", type=float, default=None, metavar="DEX",
                   help=f"survey protocol: LOGG error per dex of FE_H (default {defaults.logg_per_feh:g} dex)")
    p.add_argument("--snr", default=None, help="comma-separated SNRs to run (default inf,100,50,30)")
    p.add_argument("--mismatch-snr", default=None,
                   help="paper protocol: SNR of the observed-like scenario made with perturbed atomic data (default "
                        "100; 'none' to leave it out)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods (default all: {','.join(bench_methods())}; also, only when "
                        f"named: {','.join(on_request_methods())})")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="training time per model and scenario (default 1800; quick 15)")
    p.add_argument("--preset", choices=("fast", "paper"), default=None, help="model preset (default fast)")
    p.add_argument("--latent-dim", type=positive_int, default=None, help="latent dimension (default 20)")
    p.add_argument("--metric", default=None, help="latent distance: l1 (default), l2 or cosine")
    p.add_argument("--seed", type=seed, default=None, help="random seed (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="where to train (default auto)")
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over when OUT_DIR holds a run with other settings (its data and models are deleted)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    given = {"n_train_pairs": args.n_train_pairs, "n_val_pairs": args.n_val_pairs, "time_limit": args.time_limit,
             "preset": args.preset, "latent_dim": args.latent_dim, "metric": args.metric, "seed": args.seed,
             "device": args.device}
    given = {k: v for k, v in given.items() if v is not None}
    errors = {"teff_random": args.teff_error, "logg_random": args.logg_error, "teff_per_feh": args.teff_systematic,
              "logg_per_feh": args.logg_systematic}
    errors = {k: v for k, v in errors.items() if v is not None}
    protocol = args.protocol.strip().lower()
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown --protocol {args.protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if protocol == "paper" and errors:
        raise InputError("--teff-error, --logg-error and the systematics are the survey protocol's; the paper "
                         "protocol gives exact labels")
    if protocol == "survey" and args.mismatch_snr is not None:
        raise InputError("--mismatch-snr is the paper protocol's: the survey protocol gives the model-based methods "
                         "the other code at every SNR")
    given.update(protocol=protocol, label_errors=LabelErrors(**errors))
    if args.snr is not None:
        given["snrs"] = _snrs(args.snr)
    if args.mismatch_snr is not None:  # "none" (no mismatch scenario) is kept as None
        given["mismatch_snr"] = None if args.mismatch_snr.strip().lower() == "none" else _snrs(args.mismatch_snr)[0]
    if args.methods is not None:
        given["methods"] = tuple(m.strip().lower() for m in args.methods.split(",") if m.strip())
    if args.latent_dim is not None and args.latent_dim < 1:
        raise InputError(f"--latent-dim must be at least 1, got {args.latent_dim}")
    cfg = BenchConfig.quick_config(**given) if args.quick else BenchConfig(**given)
    results = run_bench(args.out, cfg, overwrite=args.overwrite, progress=args.progress)
    print(f"report: {args.out}/report.md ({len(results['rows'])} rows, "
          f"{results['wall_s_this_run'] / 60:.1f} min)")
    return 0
