"""``chemtwin whiten LATENTS.h5 --train TRAIN_LATENTS.h5 --out WHITE.h5``: latents in the twin metric.

The twin metric (``chemtwin.search.twin_metric``) is learned from TRAIN_LATENTS.h5's twin
groups (e.g. ``chemtwin embed`` of the training set, or of open-cluster members) and
applied to every star of LATENTS.h5 (a file or a folder of shards), streamed in chunks.
The output is a latent file like any other: ``chemtwin index/search/cluster`` and
``chemtwin evaluate --latents`` use it as it is; rank and search it with ``--metric l2``
(the Mahalanobis distance of the twin scatter).  Whiten query latents with the same
TRAIN_LATENTS.h5.
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

from chemtwin.cli.arguments import positive_int, wants_progress
from chemtwin.core.files import prepare_output
from chemtwin.errors import InputError
from chemtwin.search.latents import DEFAULT_CHUNK_ROWS, DEPTH_COLUMNS, LatentWriter, open_latents
from chemtwin.search.twin_metric import TwinMetric

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "whiten", help="put latents in the twin metric learned from stars of known twin groups",
        description="Learn the twin metric (whitening of the scatter between twins) from TRAIN_LATENTS.h5's twin "
                    "groups and write LATENTS.h5's latents in it. Search, cluster and rank the output with "
                    "--metric l2.")
    p.add_argument("latents", help="latent file or folder of latent shards to transform")
    p.add_argument("--train", required=True, metavar="TRAIN_LATENTS.h5",
                   help="latents with twin groups (`group`) to learn the metric from")
    p.add_argument("--out", required=True, metavar="OUT.h5", help="whitened latent file to write")
    p.add_argument("--chunk-rows", type=positive_int, default=DEFAULT_CHUNK_ROWS, help="latents per read (default 65536)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.h5")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.chunk_rows < 1:
        raise InputError(f"--chunk-rows must be positive, got {args.chunk_rows}")
    out = prepare_output(args.out, args.overwrite, inputs=(args.latents, args.train))
    with open_latents(args.train) as tr:
        if tr.group is None:
            raise InputError(f"{args.train}: no 'group' array: the twin metric is learned from known twin groups")
        metric = TwinMetric().fit(tr.read(), tr.group)
    with open_latents(args.latents) as lf:
        if lf.n_stars == 0:
            raise InputError(f"{args.latents}: holds no latents")
        if lf.dim != len(metric.centre_):
            raise InputError(f"{args.latents}: {lf.dim}-dimensional latents, {args.train}: {len(metric.centre_)}")
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
                            "twin_metric_train": str(args.train), "twin_metric_groups": metric.n_groups_},
                     table=True)
    log.info("%d latents in the twin metric of %d training groups -> %s (search and rank them with --metric l2)",
             lf.n_stars, metric.n_groups_, out)
    return 0
