"""``chemtwin cyclestarnet train|fit|embed|tsne``: Cycle-StarNet (docs/cyclestarnet.md).

    chemtwin cyclestarnet train SYN.h5 OBS.h5 --out DIR [--emulator EMU.npz] [--epochs 40] [--time-limit S] [--resume]
    chemtwin cyclestarnet fit DIR DATA.h5 --out LABELS.h5 [--mode residual|full] [--fixed-split]
    chemtwin cyclestarnet embed DIR DATA.h5 --out LATENTS.h5
    chemtwin cyclestarnet tsne SYN.h5 OBS.h5 --out FIG.png [--raw OBS_RAW.h5] [--model DIR] [--real APOGEE.h5]
"""

from __future__ import annotations

import os
import sys

import numpy as np

from chemtwin.cli.arguments import positive_float, positive_int, seed, thread_count, wants_progress
from chemtwin.core.files import prepare_output
from chemtwin.errors import InputError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cyclestarnet", help="Cycle-StarNet: adapt a Payne emulator to observed spectra, fit and embed through it",
        description="Cycle-StarNet (O'Briain et al. 2021): two autoencoders (synthetic, observed) sharing a latent, "
                    "trained with reconstruction, cycle-consistency and GAN losses on a labelled synthetic file and "
                    "an unlabelled observed one (docs/cyclestarnet.md).")
    sub = p.add_subparsers(dest="cyclestarnet_command", metavar="SUBCOMMAND")

    t = sub.add_parser("train", help="train Cycle-StarNet on a synthetic (labelled) and an observed (unlabelled) file",
                       description="Train Cycle-StarNet into a model folder: the synthetic domain is a Payne "
                                   "emulator's spectra at SYN.h5's labels, the observed domain OBS.h5's spectra (its "
                                   "labels, if any, are never read). Checkpoint every epoch; --resume continues "
                                   "(also after kill -9). history.csv logs every loss; a non-finite loss or one "
                                   "running away stops the run with the last good model.")
    t.add_argument("syn", metavar="SYN.h5", help="synthetic domain: spectra with labels")
    t.add_argument("obs", metavar="OBS.h5", help="observed domain: spectra on the same pixels, labels unused")
    t.add_argument("-o", "--out", required=True, metavar="DIR", help="model folder to write")
    t.add_argument("--emulator", default=None, metavar="EMU.npz",
                   help="Payne emulator of the synthetic domain (default: trained on SYN.h5 for --emulator-time-limit)")
    t.add_argument("--emulator-time-limit", type=positive_float, default=120.0, metavar="S",
                   help="seconds to train the emulator when none is given (default 120)")
    t.add_argument("--epochs", type=positive_int, default=40, help="passes over the observed stars (default 40)")
    t.add_argument("--time-limit", type=positive_float, default=None, metavar="S",
                   help="stop after the epoch that passes S seconds of training (counted across --resume)")
    t.add_argument("--warmup-epochs", type=int, default=4, help="epochs without the GAN terms (default 4)")
    t.add_argument("--latent", type=positive_int, default=24, help="shared latent size (default 24)")
    t.add_argument("--split", type=positive_int, default=3, help="observed-only split latent size (default 3)")
    t.add_argument("--hidden", type=positive_int, default=192, help="autoencoder hidden neurons (default 192)")
    t.add_argument("--w-adv", type=float, default=0.05, help="weight of the GAN terms (default 0.05; 0: none)")
    t.add_argument("--lr", type=positive_float, default=1e-3, help="autoencoders' learning rate (default 1e-3)")
    t.add_argument("--lr-disc", type=positive_float, default=2e-4, help="discriminators' learning rate (default 2e-4)")
    t.add_argument("--batch-size", type=positive_int, default=64, help="observed stars per step (default 64)")
    t.add_argument("--max-stars", type=positive_int, default=None, help="use the first N stars of each file")
    t.add_argument("--seed", type=seed, default=0, help="seed of initialisation and batches (default 0)")
    t.add_argument("--threads", type=thread_count, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.safetensors "
                   "(only --epochs and --time-limit may change)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    t.set_defaults(func=run_train)

    f = sub.add_parser("fit", help="fit labels of observed spectra with the adapted emulator (The Payne's fitter)",
                       description="Fit every spectrum of DATA.h5 with The Payne's fitter and the emulator adapted by "
                                   "Cycle-StarNet (emulator -> synthetic encoder -> observed decoder); writes "
                                   "the labels file of `chemtwin payne fit`.")
    f.add_argument("model", metavar="DIR", help="Cycle-StarNet folder")
    f.add_argument("data", metavar="DATA.h5", help="observed spectra to fit")
    f.add_argument("-o", "--out", required=True, metavar="LABELS.h5", help="labels file to write")
    f.add_argument("--mode", choices=("full", "residual"), default="residual",
                   help="full: emulator -> encoder -> observed decoder (the paper); residual: the emulator's spectrum "
                        "plus the learnt domain difference (default residual: measured better)")
    f.add_argument("--fixed-split", action="store_true",
                   help="hold z_sp at the observed training stars' mean (default: fit it with the labels, inside the "
                        "box of DATA.h5's own encoded z_sp)")
    f.add_argument("--threads", type=thread_count, default=None, help="batches fitted in parallel (default: up to 2)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    f.set_defaults(func=run_fit)

    e = sub.add_parser("embed", help="write the shared latent z_sh of observed spectra (a latent file)",
                       description="Encode DATA.h5 with the observed encoder; the shared latent z_sh goes to a "
                                   "latent file (docs/search.md), ready for `chemtwin index` / `evaluate --latents`.")
    e.add_argument("model", metavar="DIR", help="Cycle-StarNet folder")
    e.add_argument("data", metavar="DATA.h5", help="spectra to embed")
    e.add_argument("-o", "--out", required=True, metavar="LATENTS.h5", help="latent file to write")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    e.set_defaults(func=run_embed)

    s = sub.add_parser("tsne", help="the lecture's t-SNE check: synthetic vs observed before/after augmentation "
                                    "and after Cycle-StarNet, one figure",
                       description="t-SNE (scikit-learn) of synthetic and observed spectra in up to three panels: "
                                   "before augmentation (--raw), after augmentation (OBS.h5), after Cycle-StarNet "
                                   "(--model: both domains in the shared latent). --real adds real spectra.")
    s.add_argument("syn", metavar="SYN.h5", help="synthetic spectra")
    s.add_argument("obs", metavar="OBS.h5", help="observed-like spectra (after augmentation)")
    s.add_argument("-o", "--out", required=True, metavar="FIG.png", help="figure to write")
    s.add_argument("--raw", metavar="OBS_RAW.h5", help="the observed-like spectra before augmentation")
    s.add_argument("--model", metavar="DIR", help="Cycle-StarNet folder (third panel)")
    s.add_argument("--real", metavar="REAL.h5", help="real spectra on the same pixels (shown in every panel)")
    s.add_argument("--stars", type=positive_int, default=400, help="stars per domain (default 400)")
    s.add_argument("--seed", type=seed, default=0, help="t-SNE and sampling seed (default 0)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing figure")
    s.set_defaults(func=run_tsne)
    p.set_defaults(func=lambda args: _missing_subcommand(p))


def _missing_subcommand(parser) -> int:
    parser.print_help(sys.stderr)
    return 2


def run_train(args) -> int:
    import torch

    from chemtwin.tagging.cyclestarnet import CycleConfig
    from chemtwin.tagging.cyclestarnet_train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup_epochs < 0 or not args.w_adv >= 0:
        raise InputError("--warmup-epochs and --w-adv must be >= 0")
    cfg = CycleConfig(latent=args.latent, split=args.split, hidden=args.hidden, w_adv=args.w_adv, lr=args.lr,
                      lr_disc=args.lr_disc, batch_size=args.batch_size, epochs=args.epochs,
                      warmup_epochs=args.warmup_epochs, time_limit=args.time_limit, seed=args.seed)
    meta = train(args.syn, args.obs, args.out, cfg, emulator=args.emulator,
                 emulator_time_limit=args.emulator_time_limit, max_stars=args.max_stars, resume=args.resume,
                 overwrite=args.overwrite, progress=wants_progress(args))
    final = meta["final"]
    print(f"wrote {args.out}: {meta['status']} after {final['epoch']} epochs ({final['step']} steps, "
          f"{final['time_s']:.0f} s); {meta['data']['n_syn']} synthetic, {meta['data']['n_obs']} observed stars")
    return 0


def run_fit(args) -> int:
    from chemtwin.data.dataset import open_dataset
    from chemtwin.tagging.cyclestarnet_train import load, split_box_of
    from chemtwin.tagging.payne_fit import fit_dataset

    prepare_output(args.out, args.overwrite, inputs=(args.model, args.data))
    net, _, adapted, _ = load(args.model, args.mode)
    if not args.fixed_split:
        with open_dataset(args.data) as ds:
            if ds.n_pixels != net.n_pixels:
                raise InputError(f"{ds.path}: spectra have {ds.n_pixels} pixels, the model {net.n_pixels}")
            b = ds.read(0, min(ds.n_stars, 5000))
        _, _, adapted, _ = load(args.model, args.mode, split_box=split_box_of(net, b.flux, b.ivar))
    path, result, seconds = fit_dataset(adapted, args.data, args.out, overwrite=args.overwrite,
                                        progress=wants_progress(args),
                                        threads=args.threads or min(2, os.cpu_count() or 1))
    n = len(result.labels)
    split = "z_sp held" if args.fixed_split else "z_sp fitted"
    print(f"wrote {path}: {n} stars fitted through Cycle-StarNet ({args.mode}, {split}) in {seconds:.1f} s; converged "
          f"{int(result.converged.sum())}/{n}; median reduced chi2 "
          f"{np.nanmedian(result.reduced_chi2) if n else float('nan'):.3g}")
    return 0


def run_embed(args) -> int:
    from chemtwin.data.dataset import open_dataset
    from chemtwin.search.latents import write_latents
    from chemtwin.tagging.cyclestarnet_train import load, shared_latents

    prepare_output(args.out, args.overwrite, inputs=(args.model, args.data))
    net, _, _, _ = load(args.model)
    with open_dataset(args.data) as ds:
        if ds.n_pixels != net.n_pixels:
            raise InputError(f"{ds.path}: spectra have {ds.n_pixels} pixels, the model {net.n_pixels}")
        z = np.concatenate([shared_latents(net, b.flux, b.ivar) for b in ds.iter_batches(1024)])
        group, star_id = ds.group, ds.star_id
    write_latents(args.out, z, group=group, star_id=star_id,
                  attrs={"model": os.path.abspath(args.model), "data": os.path.abspath(args.data),
                         "model_kind": "cyclestarnet", "latent_dim": int(z.shape[1])}, overwrite=args.overwrite)
    print(f"wrote {args.out}: z_sh of {len(z)} stars ({z.shape[1]} dimensions)")
    return 0


def run_tsne(args) -> int:
    from chemtwin.evaluation.cyclestarnet_tsne import tsne_figure

    prepare_output(args.out, args.overwrite, inputs=[p for p in (args.syn, args.obs, args.raw, args.real) if p])
    path, scores = tsne_figure(args.syn, args.obs, args.out, raw=args.raw, model=args.model, real=args.real,
                       n_stars=args.stars, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {path}: " + "; ".join(f"{t}: domain accuracy {v:.2f}" for t, v in scores.items()))
    return 0
