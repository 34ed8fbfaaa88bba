"""``chemtwin evaluate``: twin-retrieval metrics of a model, a baseline or a latent file.

    chemtwin evaluate MODEL_DIR DATA.h5 --json OUT.json [--plots DIR] [--metric l1|l2|cosine]
    chemtwin evaluate MODEL_DIR DATA.h5 --twin-metric --train TRAIN.h5 --json OUT.json
    chemtwin evaluate DATA.h5 --method raw --json OUT.json
    chemtwin evaluate DATA.h5 --method polyres --train TRAIN.h5 --json OUT.json
    chemtwin evaluate DATA.h5 --method oracle --json OUT.json [--jacobians FILE] [--given-labels TEFF=50,LOGG=0.07]
    chemtwin evaluate DATA.h5 --method cannon|payne --train TRAIN.h5 [--emulator EMU.npz] --json OUT.json
    chemtwin evaluate --latents LATENTS.h5 [DATA.h5] --json OUT.json
    chemtwin evaluate --latents LATENTS.h5 --members OCCAM.fits --json OUT.json   (open clusters)

``--method`` takes any registered method (``chemtwin.methods.METHODS``); what it needs
(``--train``, a model folder, ...) is its own declaration.  The JSON holds ``method``,
``metric``, ``n_stars``, ``n_pairs``, ``mse_reconstruction``, ``mse_swapped`` (null without a
decoder), ``frac_rank0``, ``frac_rank_lt_0p1pct``, ``frac_rank_lt_1pct``, ``median_rank``,
``rank_cdf``, ``model`` and ``dataset`` (path and file attributes); for a model also
``condition_r2``, the cross-validated R^2 with which regressors read each conditioned label
(TEFF, LOGG) off the latent (near 0 when disentangled); see ``chemtwin.evaluation``.  With
``--twin-metric`` (model and polyres) the tags are first whitened by the scatter between twins
of ``--train`` and ranked with L2 by default; the JSON then holds ``twin_metric``.
With ``--members TABLE`` the twin groups are the clusters of a membership table (APOGEE_ID and
``--cluster-column``, default CLUSTER as in OCCAM), stars not in it are field stars, and the
JSON adds ``membership`` and ``clusters`` (per cluster: counts, rank fractions,
``doppelganger_rate``; ``chemtwin.evaluation.membership``, docs/workflow.md).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from chemtwin.cli.arguments import label_sigmas, non_negative_int, positive_int, seed, wants_progress
from chemtwin.core.files import prepare_output, write_json
from chemtwin.core.ranks import check_metric
from chemtwin.errors import InputError
from chemtwin.evaluation.evaluate import evaluate
from chemtwin.evaluation.membership import CLUSTER_COLUMN, read_membership
from chemtwin.evaluation.metrics import plot_rank_cdf
from chemtwin.methods import METHODS, get_method
from chemtwin.methods.twin_metric import TwinMetricOn

log = logging.getLogger(__name__)

# The flag that gives each input a method may need.
INPUT_FLAGS = {"train": "--train TRAIN.h5", "model": "MODEL_DIR", "emulator": "--emulator EMU.npz",
               "latents": "--latents LATENTS.h5", "calibration": "--train TRAIN.h5"}


def _method_help() -> str:
    return "; ".join(f"{name}: {m.label}" + (f" (needs {', '.join(INPUT_FLAGS[k] for k in m.needs)})" if m.needs else "")
                     for name, m in METHODS.items())


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="doppelganger ranks and spectral errors of a model or baseline",
        usage="chemtwin evaluate MODEL_DIR DATA.h5 --json OUT.json [options]\n"
              "       chemtwin evaluate DATA.h5 --method raw|polyres|oracle|cannon|payne [--train TRAIN.h5] --json OUT.json "
              "[options]\n"
              "       chemtwin evaluate --latents LATENTS.h5 [DATA.h5] --json OUT.json [options]",
        description="Evaluate twin retrieval on a dataset with twin groups: doppelganger-rank fractions "
                    "(rank 0, < 0.1% and < 1% of N), median rank and, for a model, reconstruction and "
                    "swapped-latent MSE. Writes a JSON file.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="model folder and dataset (methods that need a model); only DATA.h5 for the others, "
                        "or (optionally) with --latents")
    p.add_argument("-o", "--out", "--json", dest="json", required=True, metavar="OUT.json", help="results file to write")
    p.add_argument("--plots", metavar="DIR", help="also write the cumulative rank distribution (rank_cdf.png) here")
    p.add_argument("--metric", default=None,
                   help="distance between tags: l1 (default), l2 or cosine; methods with whitened tags (oracle, "
                        "cannon, payne, the twin metric) default to l2 (Mahalanobis in their whitened space)")
    p.add_argument("--method", default=None,
                   help="model (default): a trained model folder; raw: the spectra themselves; "
                        "polyres: polynomial residuals + PCA, fitted on --train; oracle: true abundances plus "
                        "Cramer-Rao noise (datasets made by `chemtwin generate` only); cannon: The Cannon trained on "
                        "--train's true labels; payne: The Payne (--emulator, or one trained on --train); both rank "
                        "their abundances whitened by their errors on held-out --train stars (docs/baselines.md). "
                        "Every registered method: " + _method_help().replace("%", "%%"))
    p.add_argument("--train", metavar="TRAIN.h5",
                   help="training dataset for --method polyres, cannon and payne (labelled: for payne with --emulator "
                        "its stars only measure the fit errors used for the whitening), and for --twin-metric")
    p.add_argument("--twin-metric", action="store_true",
                   help="model and polyres: rank after whitening the tags by the scatter between the twins of "
                        "--train (a learned Mahalanobis distance; extra supervision the papers did not use; "
                        "metric defaults to l2)")
    p.add_argument("--emulator", metavar="EMU.npz",
                   help="payne: the emulator to fit with (default: train one on --train, see --time-limit)")
    p.add_argument("--train-stars", type=positive_int, default=5000, metavar="N",
                   help="cannon / payne: training stars used at most (default 5000; plus 1000 held out for the whitening)")
    p.add_argument("--time-limit", type=float, default=300.0, metavar="S",
                   help="payne without --emulator: seconds of emulator training (default 300)")
    p.add_argument("--jacobians", metavar="FILE",
                   help="oracle: HDF5 cache of the synthesizer's Fisher matrices, reused by datasets with the same "
                        "labels (e.g. one validation set at several SNRs); written if missing or stale")
    p.add_argument("--given-labels", type=label_sigmas, default=None, metavar="TEFF=0,LOGG=0",
                   help="oracle: the non-chemical labels the methods you compare with are given, with their "
                        "1-sigma errors (0: exactly; e.g. your catalogue's TEFF_ERR, LOGG_ERR); the bound then "
                        "adds that information (default: none, the bound of the spectrum alone)")
    p.add_argument("--latents", metavar="LATENTS.h5",
                   help="rank-only evaluation of a latent file (`chemtwin embed` output, with `z` and `group`)")
    p.add_argument("--members", metavar="TABLE",
                   help="membership table (FITS, CSV, ECSV; e.g. OCCAM members): APOGEE_ID and a cluster name per "
                        "star; its clusters are the twin groups, every other star is a field star; the JSON reports "
                        "each cluster's doppelganger fractions against the field")
    p.add_argument("--cluster-column", default=CLUSTER_COLUMN, metavar="NAME",
                   help=f"the cluster-name column of --members (default: {CLUSTER_COLUMN}, as in OCCAM)")
    p.add_argument("--degree", type=non_negative_int, default=4, help="polyres: polynomial degree (default 4)")
    p.add_argument("--components", type=positive_int, default=50, help="polyres: principal components kept (default 50)")
    p.add_argument("--condition", default="TEFF,LOGG",
                   help="polyres: comma-separated labels the polynomial uses (default TEFF,LOGG)")
    p.add_argument("--max-queries", type=positive_int, default=None, metavar="N",
                   help="rank only N randomly chosen query stars (each against all stars); default all")
    p.add_argument("--seed", type=seed, default=0, help="seed for --max-queries (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=1024, help="spectra per batch (default 1024)")
    p.add_argument("--device", default="cpu", help="model device: cpu (default), cuda or auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.json")
    p.set_defaults(func=run)


def _chosen_method(args):
    """The method the options ask for, with the options it takes."""
    if args.latents and args.method not in (None, "model", "latents"):
        raise InputError(f"--latents cannot be combined with --method {args.method}")
    method = get_method("latents" if args.latents else args.method or "model")
    if args.twin_metric:
        if not method.wrappable:
            others = "/".join(n for n, m in METHODS.items() if m.wrappable and "model" not in m.needs)
            raise InputError(f"--twin-metric is for a model or --method {others}")
        method = TwinMetricOn(method)
    if args.given_labels is not None and "given_labels" not in {f.name for f in dataclasses.fields(method)}:
        raise InputError("--given-labels is for --method oracle")
    condition = tuple(c.strip() for c in args.condition.split(",") if c.strip())
    return method.with_options(degree=args.degree, n_components=args.components, condition=condition,
                               max_train_stars=args.train_stars, time_limit=args.time_limit,
                               jacobian_file=args.jacobians,
                               given_labels=tuple(args.given_labels.items()) if args.given_labels else None,
                               batch_size=args.batch_size, device=args.device)


def _inputs(method, args) -> dict:
    """The inputs the positional arguments and the options give ``method``; InputError naming
    the flag of anything it needs that is missing."""
    given = {"train": args.train, "emulator": args.emulator, "latents": args.latents}
    if "model" in method.needs:
        if len(args.inputs) != 2:
            raise InputError("give MODEL_DIR and DATA.h5 (or --latents LATENTS.h5, or --method raw/polyres)")
        given["model"], data = args.inputs
        if not Path(given["model"]).is_dir():
            raise InputError(f"{given['model']}: not a model folder")
    elif "latents" in method.needs:
        if len(args.inputs) > 1:
            raise InputError("with --latents give at most one positional argument (DATA.h5)")
        data = args.inputs[0] if args.inputs else None
    else:
        if len(args.inputs) not in (1, 2):
            raise InputError(f"give DATA.h5 for --method {method.name}")
        if len(args.inputs) == 2:
            log.warning("--method %s uses no model: ignoring %s", method.name, args.inputs[0])
        data = args.inputs[-1]
    for need, why in method.needs.items():
        if given.get(need) is None:
            what = "--twin-metric" if need == "train" and isinstance(method, TwinMetricOn) else f"--method {method.name}"
            raise InputError(f"{what} needs {INPUT_FLAGS[need]} ({why})")
    used = set(method.needs) | set(method.uses)
    if given["emulator"] is not None and "emulator" not in used:
        raise InputError(f"--emulator is for --method {'/'.join(n for n, m in METHODS.items() if 'emulator' in m.uses)}")
    if given["train"] is not None and "train" not in used and "model" in method.needs:
        log.warning("a model uses --train only with --twin-metric: ignoring %s", args.train)
    return dict(data=data, **{k: v for k, v in given.items() if v is not None and k in used})


def run(args) -> int:
    method = _chosen_method(args)
    metric = check_metric(args.metric or method.default_metric)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be positive, got {args.batch_size}")
    if args.max_queries is not None and args.max_queries < 1:
        raise InputError(f"--max-queries must be positive, got {args.max_queries}")
    inputs = _inputs(method, args)
    members = read_membership(args.members, args.cluster_column) if args.members else None
    out = prepare_output(args.json, args.overwrite, inputs=[p for p in inputs.values() if p is not None])
    plots = Path(args.plots) if args.plots else None
    if plots is not None and plots.exists() and not plots.is_dir():
        raise InputError(f"--plots {plots} is not a directory")
    if plots is not None and plots.is_dir():
        prepare_output(plots / "rank_cdf.png", args.overwrite)
    progress = wants_progress(args)
    result, ranks = evaluate(method, metric=metric, max_queries=args.max_queries, return_ranks=True, seed=args.seed,
                             members=members,
                             progress=progress, **inputs)
    if args.max_queries is not None:
        result["max_queries"] = args.max_queries
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        png = plots / "rank_cdf.png"
        plot_rank_cdf([(result["method"], ranks.rank, ranks.n_stars)], png,
                      title=f"{result['method']} ({result['metric']}), N = {result['n_stars']}")
        result["plots"] = [str(png)]
    write_json(out, result)
    log.info("%s: rank 0 %.1f%%, < 0.1%% N %.1f%%, < 1%% N %.1f%%, median rank %g (%d pairs, N = %d) -> %s",
             result["method"], 100 * result["frac_rank0"], 100 * result["frac_rank_lt_0p1pct"],
             100 * result["frac_rank_lt_1pct"], result["median_rank"], result["n_pairs"], result["n_stars"], out)
    for entry in result.get("clusters", []):
        if entry["n_pairs"]:
            log.info("  %s: %d of %d members found, rank 0 %.1f%%, median rank %g, doppelganger rate %.3f",
                     entry["cluster"], entry["n_found"], entry["n_members"], 100 * entry["frac_rank0"],
                     entry["median_rank"], entry["doppelganger_rate"])
        else:
            log.info("  %s: %d of %d members found (fewer than 2: no pairs)", entry["cluster"], entry["n_found"],
                     entry["n_members"])
    return 0
