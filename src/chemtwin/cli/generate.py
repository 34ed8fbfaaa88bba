"""``chemtwin generate -o OUT.h5``: a dataset of chemical-twin groups from the embedded synthesizer."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from chemtwin.cli.arguments import (
    add_cluster_options,
    add_output,
    positive_int,
    seed,
    thread_count,
    wants_cluster,
)
from chemtwin.cli.payne import add_generate_arguments, run_generate
from chemtwin.core.files import check_free_space
from chemtwin.core.grids import GRID_NAMES
from chemtwin.data.generate import dataset_bytes, generate_dataset, generate_sharded
from chemtwin.data.population import RedGiantPrior
from chemtwin.data.shard_folder import MANIFEST
from chemtwin.data.shards import dask_client
from chemtwin.errors import InputError
from chemtwin.spectral_models.linelist import DEFAULT_LINELIST, LINELISTS

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="synthesize a dataset of chemical twins",
        description=(
            "Synthesize groups of chemical twins with the embedded physics-based synthesizer: every star "
            "in a group shares all abundances (FE_H and every X_FE); TEFF, LOGG, VMICRO and VMACRO are "
            "drawn per star. Writes the HDF5 dataset layout of docs/dataset.md."
        ),
    )
    add_output(p, "OUT.h5", "output dataset (.h5); written under a temporary name and renamed when complete",
               positional=True)
    p.add_argument("--n-groups", type=positive_int, default=1000, help="number of twin groups (default 1000)")
    p.add_argument("--group-size", type=positive_int, default=2, help="stars per group; 2 gives the paper's pairs (default 2)")
    p.add_argument("--snr", type=float, default=math.inf,
                   help="signal-to-noise per pixel: Gaussian noise of sigma 1/SNR, ivar = SNR^2 (default inf: no noise, ivar = inf)")
    p.add_argument("--grid", choices=GRID_NAMES, default="aspcap",
                   help="wavelength grid: aspcap (7,214 px, default), aspcap7514, or apstar (8,575 px)")
    p.add_argument("--teff", type=float, nargs=2, metavar=("MIN", "MAX"), default=(4000.0, 5500.0),
                   help="uniform TEFF range in K (default 4000 5500; valid 3500-6500)")
    p.add_argument("--logg", type=float, nargs=2, metavar=("MIN", "MAX"), default=(1.0, 3.5),
                   help="uniform LOGG range (default 1.0 3.5; valid 0-4.5)")
    p.add_argument("--seed", type=seed, default=0, help="random seed; the same seed gives the same file (default 0)")
    p.add_argument("--threads", type=thread_count, default=None, help="synthesis threads (default: up to 2)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--linelist", choices=tuple(LINELISTS), default=DEFAULT_LINELIST,
                   help="line list: calibrated (lines found in real APOGEE spectra, default) or drawn (lines drawn "
                        "inside the ASPCAP element windows; the bench's second code)")
    p.add_argument("--mismatch", action="store_true",
                   help="'observed-like' spectra: the synthesizer with wrong atomic data (log gf jitter of 0.1 dex "
                        "per line, 10%% of the lines removed); same labels as without it")
    p.add_argument("--mismatch-seed", type=seed, default=None, metavar="N",
                   help="seed of the perturbed line list (default 0: every --mismatch file shares one list)")
    add_cluster_options(p, "stars", 8192)
    add_generate_arguments(p)  # --emulator and its options (chemtwin.cli.payne)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.mismatch_seed is not None and not args.mismatch:
        raise InputError("--mismatch-seed needs --mismatch")
    if args.emulator and args.linelist != DEFAULT_LINELIST:
        raise InputError("--linelist chooses the embedded synthesizer's line list; it cannot be used with --emulator")
    if args.mismatch and args.emulator:
        raise InputError("--mismatch perturbs the embedded synthesizer's line list; it cannot be used with --emulator")
    if args.emulator:
        if wants_cluster(args):
            raise InputError("--workers/--scheduler run the embedded synthesizer; not with --emulator")
        return run_generate(args)
    prior = RedGiantPrior(teff=tuple(args.teff), logg=tuple(args.logg))
    start = time.perf_counter()
    settings = dict(n_groups=args.n_groups, group_size=args.group_size, snr=args.snr, seed=args.seed, grid=args.grid,
                    prior=prior, overwrite=args.overwrite, progress=args.progress, linelist=args.linelist,
                    mismatch=args.mismatch if args.mismatch_seed is None else args.mismatch_seed)
    if wants_cluster(args):
        n_stars = args.n_groups * args.group_size  # refused before a cluster starts, not after
        check_free_space(Path(args.out) / MANIFEST, dataset_bytes(n_stars, args.grid), f"{n_stars} spectra")
        with dask_client(args.workers, args.scheduler, args.connect_timeout) as client:
            manifest = generate_sharded(args.out, client=client, shard_stars=args.shard_size, threads=args.threads or 1,
                                        **settings)
        log.info("%d shards + %s", len(manifest["shards"]), MANIFEST)
    else:
        generate_dataset(args.out, threads=args.threads, **settings)
    n = args.n_groups * args.group_size
    elapsed = time.perf_counter() - start
    log.info("wrote %d spectra to %s in %.1f s (%.0f spectra/s)", n, args.out, elapsed, n / elapsed)
    return 0
