"""``chemtwin train DATA.h5 --out MODEL_DIR``: train the fader model (or the cae baseline).

    chemtwin train train.h5 --out runs/fader --time-limit 300
    chemtwin train train.h5 --out runs/cae --model cae --val-data val.h5
    chemtwin train train.h5 --out runs/fader --resume --time-limit 600   # continue, longer
    torchrun --nproc-per-node 4 --no-python chemtwin train train.h5 --out runs/fader   # DDP, docs/distributed.md
"""

from __future__ import annotations

import logging
import os
import time

from chemtwin.cli.arguments import (
    finite_non_negative_float,
    non_negative_float,
    non_negative_int,
    seed,
    thread_count,
    wants_progress,
)
from chemtwin.errors import InputError

log = logging.getLogger(__name__)


# What the training bar shows (chemtwin.tagging.training.Trainer.run), for `chemtwin train --help`.
BAR_HELP = (
    "The progress bar (on a terminal, without -q), e.g. 'fader  42%|####  | 42/100% [01:10<01:37, step=1230, "
    "rec=0.81, adv_ce=3.9, adv_acc=0.05, lam=0.01]': the percentage is of the whole run, epochs or "
    "--time-limit, whichever is further on, so the time left is a true estimate. Every 10 steps: step = "
    "optimizer steps so far; rec = the reconstruction loss (the epoch's mean so far; falls as the model "
    "learns); adv_ce = the adversary's cross-entropy guessing the conditioned labels' bins from the latent "
    "(higher is better disentangled); adv_acc = the adversary's accuracy (near adv_chance, the share of the "
    "most common bin, when z hides TEFF and LOGG); lam = the adversarial weight lambda "
    "now (it warms up to --lambda). At the end of each epoch: val_rank0 = the share of validation stars "
    "whose twin is their nearest neighbour in the latent space (higher is better; 'nan' without a "
    "validation set). MODEL_DIR/history.csv has them per epoch as train_recon, train_adv_ce, train_adv_acc, "
    "adv_chance, lambda and val_rank0."
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the disentangling model on a dataset",
        description="Train the fader-style disentangling autoencoder (or its no-adversary baseline, --model cae) "
                    "on a chemtwin dataset. Writes MODEL_DIR/config.json, model.safetensors, checkpoint.safetensors "
                    "and history.csv; --resume continues from the last checkpoint (also after kill -9).",
        epilog=BAR_HELP,
    )
    p.add_argument("data", help="training dataset (.h5, `chemtwin generate` / `chemtwin ingest` layout)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument("--model", choices=("fader", "cae"), default=None, help="fader (default) or cae = the same network with lambda 0")
    p.add_argument("--preset", choices=("fast", "paper"), default=None,
                   help="fast (default): CPU-friendly architecture; paper: the published MLP, SELU, Adam lr 1e-5")
    p.add_argument("--condition", default=None, help="comma-separated conditioned labels (default TEFF,LOGG; e.g. TEFF,LOGG,FE_H)")
    p.add_argument("--latent-dim", type=non_negative_int, default=None, help="latent dimension (default 20)")
    p.add_argument("--epochs", type=non_negative_int, default=None, help="epochs in all (default: the preset's)")
    p.add_argument("--time-limit", type=non_negative_float, default=None, metavar="SECONDS",
                   help="stop cleanly after this much training time in all, counted across --resume; "
                        "the learning-rate and lambda schedules are stretched to fit it")
    p.add_argument("--batch-size", type=non_negative_int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--lr", type=non_negative_float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--lambda", dest="lambda_adv", type=finite_non_negative_float, default=None,
                   help="final adversarial weight lambda (default: the preset's; ignored for --model cae)")
    p.add_argument("--lambda-warmup", type=non_negative_float, default=None,
                   help="fraction of training over which lambda rises linearly from 0 (default: the preset's)")
    p.add_argument("--n-cat", type=non_negative_int, default=None, help="adversary bins per conditioned label (default 10)")
    p.add_argument("--seed", type=seed, default=None, help="random seed (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="where to train (default auto)")
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--val-fraction", type=non_negative_float, default=None,
                   help="fraction of the groups held out for validation (split by group; default 0.1)")
    p.add_argument("--val-data", default=None, help="separate validation dataset (replaces --val-fraction)")
    p.add_argument("--max-memory-gb", type=non_negative_float, default=None,
                   help="hold the training set in memory below this size, else stream it from disk (default 4)")
    p.add_argument("--resume", action="store_true", help="continue from MODEL_DIR/checkpoint.safetensors "
                   "(only --epochs, --time-limit, --device and --threads may change)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model in MODEL_DIR")
    p.set_defaults(func=run)


OPTIONS = {"model": "model", "preset": "preset", "latent_dim": "latent_dim", "epochs": "epochs",
           "time_limit": "time_limit", "batch_size": "batch_size", "lr": "lr", "lambda_adv": "lambda_adv",
           "lambda_warmup": "lambda_warmup_frac", "n_cat": "n_cat", "seed": "seed", "device": "device",
           "val_fraction": "val_fraction", "max_memory_gb": "max_memory_gb"}
RESUMABLE = {"epochs", "time_limit", "device"}


def run(args) -> int:
    from chemtwin.data.dataset import open_dataset
    from chemtwin.tagging.fader_config import FaderConfig
    from chemtwin.tagging.model_folder import read_model_dir
    from chemtwin.tagging.training import train

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    progress = wants_progress(args)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 alone reports
        logging.getLogger().setLevel(logging.WARNING)
        progress = False
    given = {OPTIONS[k]: v for k, v in vars(args).items() if k in OPTIONS and v is not None}
    if args.condition is not None:
        given["condition"] = tuple(c.strip().upper() for c in args.condition.split(",") if c.strip())
    if args.resume:
        meta = read_model_dir(args.out)
        config = meta["config"]
        if args.val_data is None and meta.get("data", {}).get("val_data"):
            args.val_data = meta["data"]["val_data"]
        ignored = sorted(k for k in given if k not in RESUMABLE and given[k] != config.get(k))
        if ignored:
            log.warning("--resume keeps the model's settings; ignoring %s", ", ".join(ignored))
        config.update({k: v for k, v in given.items() if k in RESUMABLE})
        cfg = FaderConfig.from_dict(config)
    else:
        cfg = FaderConfig(**given)
    if args.time_limit == 0:
        raise InputError("--time-limit must be positive")
    t = time.monotonic()
    with open_dataset(args.data) as ds:
        val = open_dataset(args.val_data) if args.val_data else None
        try:
            final = train(ds, args.out, cfg, val_source=val, resume=args.resume, overwrite=args.overwrite, progress=progress)
        finally:
            if val is not None:
                val.close()
    summary = ", ".join(f"{k} {final[k]:.4g}" for k in ("val_recon", "val_swap", "val_adv_acc", "val_rank0") if k in final)
    log.info("%s model in %s after %.0f s, epoch %s: %s", cfg.model, args.out, time.monotonic() - t,
             final.get("epoch", "?"), summary or "no validation set")
    return 0
