"""``chemtwin cluster LATENTS.h5 --out CLUSTERS.h5``: blind chemical tagging by density clustering."""

from __future__ import annotations

import time

import numpy as np

from chemtwin.cli.arguments import finite_non_negative_float, positive_fraction, positive_int
from chemtwin.core.files import prepare_output, write_json
from chemtwin.errors import InputError
from chemtwin.search.cluster import METHODS, SCALES, SKLEARN_METRIC, cluster_latents, plot_clusters, write_clusters
from chemtwin.search.cluster_metrics import clustering_metrics
from chemtwin.search.latents import open_latents
from chemtwin.search.tables import FORMATS, output_format


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cluster", help="group stars by density clustering of their latents (blind chemical tagging)",
        description="Cluster the latents of LATENTS.h5 with HDBSCAN or DBSCAN and write a cluster label per star "
                    "(-1 = noise). When the file has twin groups, report purity, completeness and the fraction "
                    "of groups recovered (definitions in docs/search.md). Latents are used as they are unless "
                    "--scale standard.",
    )
    p.add_argument("latents", help="latent file (.h5 with z (N,d), optional group, star_id)")
    p.add_argument("--out", required=True, help="output CLUSTERS.h5 (cluster, probability, star_id, group); "
                   ".fits / .ecsv: a table (APOGEE_ID, CLUSTER, PROBABILITY, GROUP)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="hdf5 (default), fits (binary table) or ecsv; default: from the --out suffix")
    p.add_argument("--method", choices=METHODS, default="ward", help="clustering algorithm (default ward)")
    p.add_argument("--threshold", type=_threshold, default="auto",
                   help="ward: merge height at which the tree is cut, in latent units, or 'auto' (default: the knee "
                        "of the sorted log merge heights, docs/search.md)")
    p.add_argument("--min-cluster-size", type=positive_int, default=5, help="smallest cluster reported (default 5)")
    p.add_argument("--min-samples", type=positive_int, default=None,
                   help="neighbours (self included) for a core point; default = --min-cluster-size")
    p.add_argument("--eps", default=None, help="dbscan: neighbourhood radius in latent units, or 'auto' "
                   "(the knee of the sorted distances to the min-samples-th neighbour)")
    p.add_argument("--selection", choices=("eom", "leaf"), default="eom",
                   help="hdbscan cluster selection: eom (default) or leaf (finer clusters; try it for many small groups)")
    p.add_argument("--metric", choices=sorted(SKLEARN_METRIC), default=None,
                   help="distance between latents (default: l2 for ward, which is defined for it; l1 otherwise)")
    p.add_argument("--scale", choices=SCALES, default="none",
                   help="none (default: the latent's own metric) or standard (unit variance per dimension)")
    p.add_argument("--min-purity", type=positive_fraction, default=0.5, help="recovered group: minimum purity of its cluster (default 0.5)")
    p.add_argument("--min-completeness", type=positive_fraction, default=0.5,
                   help="recovered group: minimum fraction of the group in that cluster (default 0.5)")
    p.add_argument("--plot", metavar="PNG", default=None, help="write a 2-D (PCA) plot coloured by cluster")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the parameters and metrics as JSON")
    p.add_argument("--threads", "--n-jobs", dest="n_jobs", type=int, default=None, help="scikit-learn parallel jobs (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def _threshold(text: str):
    return text if text == "auto" else finite_non_negative_float(text)


def run(args) -> int:
    out = prepare_output(args.out, args.overwrite, inputs=(args.latents,))
    fmt = output_format(out, args.format)
    plot = prepare_output(args.plot, args.overwrite, inputs=(args.latents,)) if args.plot else None
    json_out = prepare_output(args.json, args.overwrite, inputs=(args.latents,)) if args.json else None
    if args.method == "dbscan" and args.eps is None:
        raise InputError("--method dbscan needs --eps (a radius in latent units, or 'auto')")
    if args.method != "dbscan" and args.eps is not None:
        raise InputError("--eps applies to --method dbscan only")
    if args.method != "ward" and args.threshold != "auto":
        raise InputError("--threshold applies to --method ward only")
    with open_latents(args.latents) as lf:
        if lf.n_stars == 0:
            raise InputError(f"{args.latents}: holds no latents")
        z = lf.read()
        group = lf.group
        star_id = lf.star_id()
    t0 = time.perf_counter()
    result = cluster_latents(
        z, args.method, min_cluster_size=args.min_cluster_size, min_samples=args.min_samples, eps=args.eps,
        threshold=args.threshold, metric=args.metric, scale=args.scale, selection=args.selection, n_jobs=args.n_jobs,
    )
    seconds = time.perf_counter() - t0
    metrics = None
    if group is not None and (group >= 0).any():
        metrics = clustering_metrics(result.labels, group, args.min_purity, args.min_completeness)
    write_clusters(out, result, star_id=star_id, group=group, metrics=metrics, source=str(args.latents),
                   overwrite=args.overwrite, fmt=fmt)

    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.params.items() if v is not None)
    print(f"{len(z)} stars, {z.shape[1]}-d latents: {params}  [{seconds:.1f} s]")
    sizes = np.bincount(result.labels[result.labels >= 0]) if result.n_clusters else np.array([], int)
    size_text = f" (sizes {sizes.min()}-{sizes.max()}, median {np.median(sizes):g})" if sizes.size else ""
    print(f"clusters        {result.n_clusters}{size_text}")
    print(f"noise           {100 * result.noise_fraction:.1f}% of stars")
    if metrics:
        print(f"true groups     {metrics['n_groups']} with >= {metrics['min_group_size']} members")
        print(f"purity          {metrics['purity']:.3f}  (member-weighted; mean over clusters {metrics['mean_cluster_purity']:.3f})")
        print(f"completeness    {metrics['completeness']:.3f}  (mean over groups)")
        print(f"recovered       {metrics['n_recovered']} / {metrics['n_groups']} = {metrics['recovered_fraction']:.3f}  "
              f"(a cluster >= {metrics['min_purity']:g} pure holding >= {metrics['min_completeness']:g} of the group)")
        print(f"ARI             {metrics['ari']:.3f}")
    elif group is None:
        print("no twin groups in the file: purity/completeness not computed")
    print(f"wrote {out}")
    if plot:
        title = f"{args.method} on {args.latents}"
        if metrics:
            title += f": recovered {metrics['recovered_fraction']:.2f}, purity {metrics['purity']:.2f}"
        plot_clusters(z, result.labels, plot, group=group if metrics else None, title=title)
        print(f"wrote {plot}")
    if json_out:
        write_json(json_out, {"params": result.params, "n_clusters": result.n_clusters,
                              "noise_fraction": result.noise_fraction, "seconds": seconds, "metrics": metrics})
        print(f"wrote {json_out}")
    return 0
