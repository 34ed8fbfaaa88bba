"""``chemtwin starnet train`` and ``chemtwin starnet predict``: the StarNet label regressor.

    chemtwin starnet train DATA.h5 --labels TEFF,LOGG,FE_H,MG_FE --out DIR [--snr 100] [--epochs 30]
    chemtwin starnet train DATA.h5 --labels ... --out DIR --resume --epochs 60   # continue, longer
    chemtwin starnet predict DIR DATA.h5 --out LABELS.h5

The model folder and its training: chemtwin.tagging.starnet_training (docs/starnet.md); the
labels file: chemtwin.tagging.labels_file (docs/baselines.md).
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np

from chemtwin.cli.arguments import (
    CommaList,
    name_list,
    non_negative_float,
    positive_float,
    positive_int,
    seed,
    thread_count,
    wants_progress,
)
from chemtwin.data.augment import CHIP_NAMES
from chemtwin.data.broadening import MACRO_KINDS
from chemtwin.errors import InputError

log = logging.getLogger(__name__)

# flags of `starnet train` that set StarNetConfig fields (None: the config's default)
CONFIG_FLAGS = ("filters", "kernel", "pool", "hidden", "lr", "weight_decay", "batch_size", "epochs", "time_limit",
                "val_fraction", "seed", "device")
RESUMABLE = {"epochs", "time_limit", "device"}
# augmentation flags, as `chemtwin augment` names them -> Augmenter fields
AUGMENT_FLAGS = {"rv_max": "rv_max", "vsini_max": "vsini_max", "vmacro_max": "vmacro_max", "macro": "macro_kind",
                 "telluric": "telluric", "bad_pixel_frac": "bad_pixel_frac", "persistence": "persistence",
                 "persistence_chip": "persistence_chip"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "starnet", help="StarNet: a convolutional network that regresses labels from spectra",
        description="StarNet (Fabbro et al. 2018): a 1-D CNN trained on labelled (e.g. synthetic, augmented) spectra "
                    "that predicts labels and their uncertainties for other spectra. docs/starnet.md.",
    )
    sub = p.add_subparsers(dest="starnet_command", metavar="SUBCOMMAND")

    t = sub.add_parser(
        "train", help="train a StarNet on the spectra and labels of a dataset",
        description="Train a StarNet: two channels per pixel (flux, standardised, and the ivar > 0 mask), two "
                    "convolutions, max-pooling, a dense head giving a mean and a variance per label (beta-NLL). "
                    "Augmentations (as in `chemtwin augment`) are drawn afresh for every batch. Writes DIR/config.json, "
                    "model.safetensors, checkpoint.safetensors and history.csv; --resume continues from the last "
                    "checkpoint (also after kill -9).",
    )
    t.add_argument("data", help="training dataset (.h5) with the spectra and their labels")
    t.add_argument("--labels", action=CommaList, required=True, metavar="A,B,...",
                   help="labels to regress, comma-separated (e.g. TEFF,LOGG,FE_H,MG_FE)")
    t.add_argument("--out", required=True, metavar="DIR", help="model folder to write")
    t.add_argument("--epochs", type=positive_int, default=None, help="epochs in all (default 30)")
    t.add_argument("--time-limit", type=positive_float, default=None, metavar="SECONDS",
                   help="stop cleanly after this much training time in all, counted across --resume")
    t.add_argument("--batch-size", type=positive_int, default=None, help="batch size (default 32)")
    t.add_argument("--lr", type=positive_float, default=None, help="Adam's learning rate (default 7e-4)")
    t.add_argument("--weight-decay", type=non_negative_float, default=None, help="Adam's weight decay (default 0)")
    t.add_argument("--filters", action=CommaList, item=positive_int, default=None, metavar="N,N",
                   help="filters of the convolutions (default 4,16)")
    t.add_argument("--kernel", type=positive_int, default=None, help="convolution width in pixels (default 8)")
    t.add_argument("--pool", type=positive_int, default=None, help="max-pool width (default 4)")
    t.add_argument("--hidden", action=CommaList, item=positive_int, default=None, metavar="N,N",
                   help="dense layers (default 256,128)")
    t.add_argument("--raw-flux", action="store_true", help="feed flux - 1 as the paper did (default: flux "
                   "standardised per pixel by the training set's mean and std)")
    t.add_argument("--val-fraction", type=non_negative_float, default=None,
                   help="fraction of the twin groups held out for the per-epoch validation (default 0.1)")
    t.add_argument("--seed", type=seed, default=None, help="random seed (default 0)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="where to train (default auto)")
    t.add_argument("--threads", type=thread_count, default=None, help="CPU threads for torch (default: torch's choice)")
    t.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.safetensors "
                   "(only --epochs, --time-limit, --device and --threads may change)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing StarNet model in DIR")
    g = t.add_argument_group("augmentation of every training batch (chemtwin.data.augment; off by default)")
    g.add_argument("--snr", metavar="S|LO:HI", help="add noise to reach SNR S per pixel, or log-uniform in [LO, HI]")
    g.add_argument("--rv-max", type=non_negative_float, default=0.0, metavar="KMS", help="Doppler shift in [-KMS, KMS]")
    g.add_argument("--vsini-max", type=non_negative_float, default=0.0, metavar="KMS", help="rotation, vsini in [0, KMS]")
    g.add_argument("--vmacro-max", type=non_negative_float, default=0.0, metavar="KMS", help="extra macroturbulence in [0, KMS]")
    g.add_argument("--macro", default="gaussian", choices=MACRO_KINDS, help="macroturbulence profile (default gaussian)")
    g.add_argument("--telluric", action="store_true", help="mask the telluric windows at a random observed RV")
    g.add_argument("--bad-pixel-frac", type=non_negative_float, default=0.0, metavar="F", help="fraction of pixels masked")
    g.add_argument("--persistence", type=non_negative_float, default=0.0, metavar="A", help="persistence amplitude in [0, A]")
    g.add_argument("--persistence-chip", default="green", choices=CHIP_NAMES, help="chip with persistence (default green)")
    t.set_defaults(func=run_train)

    f = sub.add_parser(
        "predict", help="predict the labels of every spectrum of a dataset with a StarNet",
        description="Predict labels and their 1-sigma errors (the network's variance head) for every spectrum of a "
                    "dataset and write a labels file (docs/baselines.md). Stars without a measured pixel get NaN "
                    "and converged = False.",
    )
    f.add_argument("model", metavar="DIR", help="StarNet model folder written by `chemtwin starnet train`")
    f.add_argument("data", help="dataset (.h5) with the spectra, on the model's pixels")
    f.add_argument("--out", required=True, metavar="LABELS.h5", help="labels file to write (.h5)")
    f.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    f.add_argument("--threads", type=thread_count, default=None, help="CPU threads for torch (default: torch's choice)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    f.set_defaults(func=run_predict)
    p.set_defaults(func=lambda args: _missing_subcommand(p))


def _missing_subcommand(parser) -> int:
    parser.print_help(sys.stderr)
    return 2


def augmentation(args) -> dict | None:
    """The Augmenter fields the flags ask for (None: no augmentation)."""
    from chemtwin.cli.augment import parse_snr

    given = {field: getattr(args, flag) for flag, field in AUGMENT_FLAGS.items()}
    snr = parse_snr(args.snr)
    on = {k: v for k, v in given.items() if v and k not in ("macro_kind", "persistence_chip")}
    if snr is None and not on:
        return None
    config = {**on, "snr": None if snr is None else (list(snr) if isinstance(snr, tuple) else snr)}
    if given["vmacro_max"]:
        config["macro_kind"] = given["macro_kind"]
    if given["persistence"]:
        config["persistence_chip"] = given["persistence_chip"]
    return config


def run_train(args) -> int:
    import torch

    from chemtwin.data.dataset import open_dataset
    from chemtwin.tagging.starnet import StarNetConfig
    from chemtwin.tagging.starnet_training import Arrays, read_starnet_dir, train

    if args.threads:
        torch.set_num_threads(args.threads)
    given = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    given["labels"] = tuple(name_list(args.labels))
    if args.raw_flux:
        given["standardize_flux"] = False
    augment = augmentation(args)
    if augment is not None:
        given["augment"] = augment
    if args.resume:
        saved = StarNetConfig.from_dict(read_starnet_dir(args.out)["config"]).to_dict()
        asked = StarNetConfig.from_dict({**saved, **given}).to_dict()
        ignored = sorted(k for k in asked if k not in RESUMABLE and asked[k] != saved[k])
        if ignored:
            log.warning("--resume keeps the model's settings; ignoring %s", ", ".join(ignored))
        cfg = StarNetConfig.from_dict({**saved, **{k: v for k, v in given.items() if k in RESUMABLE}})
    else:
        cfg = StarNetConfig(**given)
    t0 = time.monotonic()
    with open_dataset(args.data) as ds:
        data = Arrays.from_dataset(ds, cfg.labels)
    final = train(data, args.out, cfg, resume=args.resume, overwrite=args.overwrite, progress=wants_progress(args))
    log.info("StarNet in %s after %.0f s, epoch %s: validation RMSE %.4g (standardised labels)", args.out,
             time.monotonic() - t0, final.get("epoch", "?"), final.get("val_rmse", float("nan")))
    return 0


def run_predict(args) -> int:
    import torch

    from chemtwin.core.files import prepare_output
    from chemtwin.data.dataset import open_dataset
    from chemtwin.tagging.labels_file import write_labels
    from chemtwin.tagging.starnet_training import load_model, predict_dataset
    from chemtwin.tagging.training import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    out = prepare_output(args.out, args.overwrite, inputs=(args.model, args.data))
    model, meta, wavelength = load_model(args.model, pick_device(args.device))
    names = list(meta["config"]["labels"])
    with open_dataset(args.data) as ds:
        if wavelength is not None and ds.wavelength.size == wavelength.size and not np.allclose(
                ds.wavelength, wavelength, rtol=1e-7, atol=0):
            raise InputError(f"{ds.path}: the spectra's wavelength grid differs from the StarNet model's")
        t0 = time.perf_counter()
        labels, sigma = predict_dataset(model, ds, progress=wants_progress(args))
        seconds = time.perf_counter() - t0
        group, star_id, data_path = ds.group, ds.star_id, str(ds.path)
    n = len(labels)
    measured = np.isfinite(labels).all(1)
    covariance = np.einsum("nl,lm->nlm", sigma**2, np.eye(len(names)))
    attrs = {"method": "starnet", "model": str(args.model), "data": data_path, "rows": f"0:{n}", "fit_seconds": seconds}
    path = write_labels(out, names, labels, sigma, covariance, group=group, star_id=star_id, attrs=attrs,
                        columns={"converged": measured}, overwrite=args.overwrite)
    print(f"wrote {path}: {n} stars, {len(names)} labels ({' '.join(names)})")
    if n:
        print(f"{seconds:.2f} s ({n / seconds if seconds > 0 else float('nan'):.0f} spectra/s); "
              f"{int(measured.sum())}/{n} stars measured")
    return 0
