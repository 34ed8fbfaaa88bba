"""``chemtwin whiten LATENTS.h5 (--train TRAIN_LATENTS.h5 | --model MODEL_DIR --spectra DATA.h5) --out WHITE.h5``:
latents in a twin metric (``chemtwin.search.twin_metric``).

* ``--train``: the twin metric learned from TRAIN_LATENTS.h5's twin groups (e.g. ``chemtwin embed``
  of the training set, or of open-cluster members): supervised.
* ``--model --spectra``: the decoded-twin metric, learned from the model's own decoder-made twins
  of DATA.h5's stars (their spectra and TEFF/LOGG; no group is read): twin-free, what a survey
  without known twins can use.

It is applied to every star of LATENTS.h5 (a file or a folder of shards), streamed in chunks.
The output is a latent file like any other: ``chemtwin index/search/cluster`` and
``chemtwin evaluate --latents`` use it as it is; rank and search it with ``--metric l2``
(the Mahalanobis distance of the twin scatter).  Whiten query latents with the same
TRAIN_LATENTS.h5.
"""

from __future__ import annotations

import json
import logging

from tqdm.auto import tqdm

from chemtwin.cli.arguments import label_sigmas, positive_int, seed, wants_progress
from chemtwin.core.files import prepare_output
from chemtwin.data.dataset import open_dataset
from chemtwin.errors import InputError
from chemtwin.search.latents import DEFAULT_CHUNK_ROWS, DEPTH_COLUMNS, LatentWriter, open_latents
from chemtwin.search.twin_metric import DecodedTwinMetric, TwinMetric
from chemtwin.tagging.estimator import ChemTwin

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "whiten", help="put latents in a twin metric: from known twin groups, or twin-free from the model",
        description="Learn a twin metric (whitening of the scatter between twins) and write LATENTS.h5's latents in "
                    "it: from TRAIN_LATENTS.h5's twin groups (--train), or twin-free from the model's decoder-made "
                    "twins of DATA.h5's stars (--model and --spectra). Search, cluster and rank the output with "
                    "--metric l2.")
    p.add_argument("latents", help="latent file or folder of latent shards to transform")
    p.add_argument("--train", metavar="TRAIN_LATENTS.h5",
                   help="latents with twin groups (`group`) to learn the twin metric from")
    p.add_argument("--model", metavar="MODEL_DIR", help="the model that made LATENTS.h5: learn the decoded-twin "
                                                        "metric (twin-free) from it; needs --spectra")
    p.add_argument("--spectra", metavar="DATA.h5", help="dataset of stars (spectra, TEFF/LOGG) whose decoder-made "
                                                        "twins teach the decoded-twin metric")
    p.add_argument("--pairs", type=positive_int, default=5000,
                   help="decoded-twin metric: stars of DATA.h5 drawn to make twins of (default 5000)")
    p.add_argument("--seed", type=seed, default=0, help="decoded-twin metric: seed of the draws (default 0)")
    p.add_argument("--label-errors", type=label_sigmas, default=None, metavar="TEFF=50,LOGG=0.07",
                   help="decoded-twin metric: the 1-sigma errors your TEFF/LOGG carry (e.g. the catalogue's typical "
                        "TEFF_ERR, LOGG_ERR); the model's twins are then made with labels that are off by as much "
                        "(default: exact labels)")
    p.add_argument("--out", required=True, metavar="OUT.h5", help="whitened latent file to write")
    p.add_argument("--chunk-rows", type=positive_int, default=DEFAULT_CHUNK_ROWS, help="latents per read (default 65536)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.h5")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.chunk_rows < 1:
        raise InputError(f"--chunk-rows must be positive, got {args.chunk_rows}")
    if (args.train is None) == (args.model is None) or (args.model is None) != (args.spectra is None):
        raise InputError("give either --train TRAIN_LATENTS.h5 (twin groups) or --model MODEL_DIR with "
                         "--spectra DATA.h5 (twin-free)")
    out = prepare_output(args.out, args.overwrite, inputs=[p for p in (args.latents, args.train, args.spectra) if p])
    source = args.train or args.model
    metric, about = _metric(args)
    with open_latents(args.latents) as lf:
        if lf.n_stars == 0:
            raise InputError(f"{args.latents}: holds no latents")
        if lf.dim != len(metric.centre_):
            raise InputError(f"{args.latents}: {lf.dim}-dimensional latents, {source}: {len(metric.centre_)}")
        progress = wants_progress(args)
        with LatentWriter(out, lf.dim, lf.n_stars, overwrite=args.overwrite) as w:
            for _, chunk in tqdm(lf.iter_chunks(args.chunk_rows), total=-(-lf.n_stars // args.chunk_rows),
                                 desc="whiten", unit="chunk", disable=not progress, leave=False):
                w.append(metric.transform(chunk))
            depth = {name: lf.column(name) for name in DEPTH_COLUMNS}  # out-of-depth flags go along
            w.finish(group=lf.group, star_id=lf.star_id(), row=lf.rows,
                     arrays={"twin_metric/centre": metric.centre_, "twin_metric/whitening": metric.whitening_,
                             **{k: v for k, v in depth.items() if v is not None}},
                     attrs={**{k: v for k, v in lf.attrs.items() if k != "shards"},
                            **about},
                     table=True)
    log.info("%d latents in the %s -> %s (search and rank them with --metric l2)", lf.n_stars, about["twin_metric"], out)
    return 0


def _metric(args):
    """(fitted metric, file attributes saying what it is)."""
    if args.train is not None:
        with open_latents(args.train) as tr:
            if tr.group is None:
                raise InputError(f"{args.train}: no 'group' array: the twin metric is learned from known twin groups")
            metric = TwinMetric().fit(tr.read(), tr.group)
        return metric, {"twin_metric": f"twin metric of {metric.n_groups_} training groups",
                        "twin_metric_train": str(args.train), "twin_metric_groups": metric.n_groups_}
    errors = args.label_errors or {}
    model = ChemTwin.load(args.model)
    with open_dataset(args.spectra) as ds:
        metric = DecodedTwinMetric(args.pairs, args.seed, errors).fit_dataset(model, ds)
    return metric, {"twin_metric": f"decoded-twin metric of {metric.n_pairs_} stars",
                    "twin_metric_model": str(args.model), "twin_metric_spectra": str(args.spectra),
                    "twin_metric_pairs": metric.n_pairs_, "twin_metric_seed": args.seed,
                    "twin_metric_label_errors": json.dumps(metric.label_errors)}
