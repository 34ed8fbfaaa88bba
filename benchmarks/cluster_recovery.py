"""Blind chemical tagging: how many twin groups does clustering recover, per space?

Issue 6 must-show: 500 groups x 10 stars at SNR 100, recovered-group fraction for fader
latents vs polynomial-residual space vs true abundances + Cramer-Rao noise.  This script
takes those spaces as latent files (made by the model, the baseline and the oracle) and
computes the table:

    python benchmarks/cluster_recovery.py \\
        fader=runs/snr100/fader_latents.h5 \\
        polyres=runs/snr100/polyres_pca50.h5 \\
        "oracle=runs/snr100/oracle.h5#z_whitened" \\
        --json out/cluster_recovery.json --markdown out/cluster_recovery.md

Each space is ``NAME=PATH`` or ``NAME=PATH#KEY`` (KEY = array in the file, default ``z``);
every file needs ``group`` (N,) with the true twin groups (-1 = field star).  The spaces
are clustered as they are (``--scale none``): put each in its natural metric first (the
oracle's abundances whitened by the Cramer-Rao covariance, the residuals projected on
their principal components).

For each space the script runs the clustering of ``chemtwin cluster`` (Ward, default; or
HDBSCAN, DBSCAN) over a small grid of settings and reports (a) the *default* setting
(``--default-min-cluster-size``; Ward's twin-free cut, HDBSCAN eom, DBSCAN's knee) and (b) the
best setting of the grid by recovered fraction.  (b) is tuned on the truth, so it is an
optimistic ceiling, labelled as such.  Ward's grid scales its twin-free cut by
``--threshold-factor``.  Metrics (chemtwin.search.cluster_metrics.clustering_metrics,
docs/search.md): purity, completeness, recovered fraction at purity >= 0.5 and >= 2/3
(completeness >= 0.5 in both).

    python benchmarks/cluster_recovery.py --synthetic DIR   # writes 3 demo spaces and runs on them

The issue-6 table from scratch (``--generate DIR``): a validation set of 500 groups x 10
stars at SNR 100 and a separate training set of twin pairs at SNR 100 are generated, and
four spaces are built for the same validation stars:

* ``fader``: latents of a fader trained with ``chemtwin train --time-limit`` (default 300 s;
  ``--quick`` 30 s) on the training set, embedded with ``chemtwin embed``;
* ``fader_decoded``: the same latents in the decoded-twin metric (``chemtwin whiten --model
  --spectra`` on the training set; twin-free);
* ``polyres``: polynomial residuals in TEFF, LOGG (degree 4) projected on 50 principal
  components (chemtwin.tagging.polyres), fitted on the training set;
* ``oracle``: true abundances + Cramer-Rao noise (chemtwin.tagging.oracle.draw_abundances),
  whitened by the pooled Cramer-Rao covariance.

Fairness: every space gets the same grid (and the same default row), in its own natural
coordinates.  Ward uses L2 in every space; HDBSCAN and DBSCAN the metric its doppelganger
ranks use: fader and polyres L1 (as in the paper), the oracle L2 (whitened = Mahalanobis).  No per-dimension
standardization by default (see docs/search.md: it inflates near-empty latent or PCA
dimensions and would undo the oracle's whitening; a global scale does not change HDBSCAN).
A space can carry its own metric as ``NAME=PATH#KEY@l2``.

    python benchmarks/cluster_recovery.py --generate out/cluster --json out/cluster.json --markdown out/cluster.md
    python benchmarks/cluster_recovery.py --generate /tmp/cr --quick     # ~1-1.5 min on 2 cores: 40 groups, 30 s of training
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

try:
    import chemtwin  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chemtwin.core.files import json_safe
from chemtwin.data.dataset import open_dataset
from chemtwin.errors import InputError
from chemtwin.search.cluster import cluster_latents, scale_latents
from chemtwin.search.cluster_metrics import clustering_metrics
from chemtwin.search.latents import open_latents, write_latents


def parse_space(text: str, default_metric: str = "l1") -> tuple[str, Path, str, str]:
    """NAME=PATH[#KEY][@METRIC] -> (name, path, key, metric)."""
    if "=" not in text:
        raise InputError(f"space '{text}': expected NAME=PATH or NAME=PATH#KEY")
    name, rest = text.split("=", 1)
    metric = default_metric
    head, at, tail = rest.rpartition("@")
    if at and tail in ("l1", "l2"):
        rest, metric = head, tail
    path, _, key = rest.partition("#")
    if not name or not path:
        raise InputError(f"space '{text}': expected NAME=PATH or NAME=PATH#KEY")
    return name, Path(path), key or "z", metric


def load_space(path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    with open_latents(path, key=key) as lf:
        if lf.group is None:
            raise InputError(f"{path}: no 'group' array; the true twin groups are needed to score recovery")
        return lf.read(), lf.group


def make_synthetic(folder: Path, n_groups: int = 500, group_size: int = 10, dim: int = 20, n_field: int = 0,
                   scatters=(("tight", 0.1), ("medium", 0.3), ("loose", 0.5)), seed: int = 0) -> list[str]:
    """Write demo spaces: the same group centres, more within-group scatter in each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_groups, dim))
    group = np.concatenate([np.repeat(np.arange(n_groups), group_size), -np.ones(n_field, np.int64)])
    specs = []
    for name, s in scatters:
        z = np.concatenate([np.repeat(centres, group_size, axis=0) + s * rng.standard_normal((n_groups * group_size, dim)),
                            rng.standard_normal((n_field, dim))])
        path = folder / f"{name}.h5"
        write_latents(path, z.astype(np.float32), group=group, attrs={"scatter": s}, overwrite=True)
        specs.append(f"{name}={path}")
    return specs


def build_spaces(folder: Path, args) -> tuple[list[str], dict]:
    """Generate the validation and training sets, train the fader and write the three spaces
    (fader, polyres, oracle) for the validation stars into ``folder``; returns their specs and
    a record of what was done (sizes, seeds, wall times).  Existing files are reused, so an
    interrupted run continues where it stopped (delete the folder to start over)."""
    from chemtwin.cli import main as chemtwin
    from chemtwin.core.whitening import whitening_matrix
    from chemtwin.data.generate import generate_dataset
    from chemtwin.tagging.oracle import draw_abundances, oracle_covariance
    from chemtwin.tagging.polyres import PolyResiduals

    folder.mkdir(parents=True, exist_ok=True)
    val, train = folder / "val.h5", folder / "train.h5"
    record = {"n_groups": args.groups, "group_size": args.group_size, "snr": args.snr, "train_pairs": args.train_pairs,
              "time_limit_s": args.time_limit, "seed": args.seed, "seconds": {}}

    def step(name, path, fn):
        if path.exists():
            print(f"{name}: reusing {path}", file=sys.stderr)
            return
        t0 = time.perf_counter()
        fn()
        record["seconds"][name] = round(time.perf_counter() - t0, 1)

    # distinct seeds: the training set shares no star with the validation set
    step("generate_val", val, lambda: generate_dataset(val, args.groups, args.group_size, snr=args.snr, seed=args.seed,
                                                       progress=False))
    step("generate_train", train, lambda: generate_dataset(train, args.train_pairs, 2, snr=args.snr,
                                                           seed=args.seed + 1, progress=False))
    model, fader = folder / "fader", folder / "fader_latents.h5"

    def train_and_embed():
        for argv in (["train", str(train), "--out", str(model), "--time-limit", str(args.time_limit),
                      "--seed", str(args.seed), "--overwrite"],
                     ["embed", str(model), str(val), "--out", str(fader), "--overwrite"]):
            if chemtwin(["--quiet", *argv]) != 0:
                raise InputError(f"chemtwin {argv[0]} failed")

    step("fader_train_embed", fader, train_and_embed)
    decoded = folder / "fader_decoded.h5"
    step("fader_decoded_metric", decoded, lambda: chemtwin(["--quiet", "whiten", str(fader), "--model", str(model),
                                                             "--spectra", str(train), "--out", str(decoded)]))

    polyres = folder / "polyres_pca50.h5"

    def polyres_space():
        with open_dataset(val) as ds:
            group = ds.group
        poly = PolyResiduals(degree=4, n_components=50).fit_dataset(str(train))
        write_latents(polyres, poly.transform_dataset(str(val)), group=group, attrs={"space": "polyres degree 4, 50 PCs"})

    step("polyres", polyres, polyres_space)

    oracle = folder / "oracle.h5"

    def oracle_space():
        with open_dataset(val) as ds:
            group = ds.group
            cov, labels, stats = oracle_covariance(ds, jacobian_file=folder / "val_jacobians.h5", progress=False)
        tags = draw_abundances(labels, cov, args.seed) @ whitening_matrix(cov).T
        write_latents(oracle, tags, group=group, attrs={"space": "abundances + Cramer-Rao noise, whitened"})
        record["oracle_jacobians"] = stats

    step("oracle", oracle, oracle_space)
    return [f"fader={fader}@l1", f"fader_decoded={decoded}@l2", f"polyres={polyres}@l1", f"oracle={oracle}@l2"], record


def grid(args):
    if args.method == "ward":
        for mcs, factor in itertools.product(args.min_cluster_size, args.threshold_factor):
            yield {"min_cluster_size": mcs, "threshold_factor": factor}
    elif args.method == "hdbscan":
        for mcs, sel in itertools.product(args.min_cluster_size, args.selection):
            yield {"min_cluster_size": mcs, "selection": sel}
    else:
        for mcs, factor in itertools.product(args.min_cluster_size, args.eps_factor):
            yield {"min_cluster_size": mcs, "eps_factor": factor}


def run_setting(z, group, method, setting, args, metric, auto_threshold=None):
    if method == "ward":
        res = cluster_latents(scale_latents(z, args.scale), "ward", min_cluster_size=setting["min_cluster_size"],
                              threshold=setting["threshold_factor"] * auto_threshold)
        setting = {**setting, "threshold": res.params["threshold"]}
    elif method == "hdbscan":
        res = cluster_latents(z, "hdbscan", min_cluster_size=setting["min_cluster_size"], metric=metric,
                              scale=args.scale, selection=setting["selection"])
    else:
        from chemtwin.search.cluster import auto_eps

        x = scale_latents(z, args.scale)
        eps = setting["eps_factor"] * auto_eps(x, setting["min_cluster_size"], metric)
        res = cluster_latents(x, "dbscan", min_cluster_size=setting["min_cluster_size"], eps=eps, metric=metric)
        setting = {**setting, "eps": eps}
    m = clustering_metrics(res.labels, group, min_purity=0.5, min_completeness=0.5, min_group_size=args.min_group_size)
    strict = clustering_metrics(res.labels, group, min_purity=2 / 3, min_completeness=0.5, min_group_size=args.min_group_size)
    m["recovered_fraction_p67"] = strict["recovered_fraction"]
    return setting, m


def evaluate(specs: list[str], args) -> dict:
    out = {"method": args.method, "metric": args.metric, "scale": args.scale, "spaces": []}
    for spec in specs:
        name, path, key, metric = parse_space(spec, args.metric)
        metric = "l2" if args.method == "ward" else metric  # Ward is defined for L2 only
        z, group = load_space(path, key)
        sizes = np.bincount(group[group >= 0]) if (group >= 0).any() else np.array([], int)
        entry = {"name": name, "path": str(path), "key": key, "metric": metric, "n_stars": int(len(z)),
                 "dim": int(z.shape[1]), "n_groups": int((sizes >= args.min_group_size).sum()), "runs": []}
        auto = None  # chemtwin cluster's twin-free cut, once per space; Ward's grid scales it
        if args.method == "ward":
            auto = cluster_latents(scale_latents(z, args.scale), "ward", min_cluster_size=2).params["threshold"]
        for setting in grid(args):
            t0 = time.perf_counter()
            setting, m = run_setting(z, group, args.method, setting, args, metric, auto)
            entry["runs"].append({"setting": setting, "seconds": round(time.perf_counter() - t0, 2), **m})
            print(f"{name:<12} {json.dumps(json_safe(setting)):<50} recovered {m['recovered_fraction']:.3f} "
                  f"purity {m['purity']:.3f} completeness {m['completeness']:.3f}", file=sys.stderr, flush=True)
        default = [r for r in entry["runs"] if r["setting"]["min_cluster_size"] == args.default_min_cluster_size
                   and r["setting"].get("selection", "eom") == "eom" and r["setting"].get("eps_factor", 1.0) == 1.0
                   and r["setting"].get("threshold_factor", 1.0) == 1.0]
        entry["default"] = default[0] if default else entry["runs"][0]
        entry["best"] = max(entry["runs"], key=lambda r: (np.nan_to_num(r["recovered_fraction"], nan=-1.0), r["purity"]))
        out["spaces"].append(entry)
    return out


def markdown(result: dict) -> str:
    lines = [
        f"Blind clustering ({result['method']}, scale={result['scale']}; metric per space). "
        "Recovered: some found cluster holds >= 50% of the group and is >= 50% (or >= 2/3) made of it. "
        "'best' is tuned on the truth (an optimistic ceiling).",
        "",
        "| space | metric | stars | dim | groups | setting | clusters | noise | purity | completeness | recovered (p>=0.5) | recovered (p>=2/3) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    g = result.get("generated")
    if g:
        lines[1:1] = ["", f"Data: {g['n_groups']} groups x {g['group_size']} stars at SNR {g['snr']:g} (seed {g['seed']}); "
                          f"fader trained {g['time_limit_s']:g} s on {g['train_pairs']} pairs at the same SNR; "
                          f"wall times (s): {json.dumps(g['seconds'])}."]
    for s in result["spaces"]:
        for label in ("default", "best"):
            r = s[label]
            setting = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["setting"].items())
            lines.append(
                f"| {s['name']} | {s['metric']} | {s['n_stars']} | {s['dim']} | {s['n_groups']} | {label}: {setting} | {r['n_clusters']} | "
                f"{100 * r['noise_fraction']:.1f}% | {r['purity']:.3f} | {r['completeness']:.3f} | "
                f"{r['recovered_fraction']:.3f} | {r['recovered_fraction_p67']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Recovered-group fraction of blind clustering, per latent space.")
    p.add_argument("spaces", nargs="*", help="NAME=PATH or NAME=PATH#KEY (latent file with z and group)")
    p.add_argument("--synthetic", metavar="DIR", default=None, help="write 3 demo spaces (500 groups x 10) to DIR and use them")
    p.add_argument("--generate", metavar="DIR", default=None,
                   help="issue-6 table from scratch: generate data, train a fader, build the fader / polyres / oracle "
                        "spaces in DIR (existing files there are reused) and cluster them")
    p.add_argument("--groups", type=int, default=500, help="--generate: validation groups (default 500; --quick 40)")
    p.add_argument("--group-size", type=int, default=10, help="--generate: stars per validation group (default 10)")
    p.add_argument("--snr", type=float, default=100.0, help="--generate: SNR of both sets (default 100)")
    p.add_argument("--train-pairs", type=int, default=10_000,
                   help="--generate: twin pairs in the training set (default 10000; --quick 300)")
    p.add_argument("--time-limit", type=float, default=300.0,
                   help="--generate: fader training time in seconds (default 300; --quick 30)")
    p.add_argument("--seed", type=int, default=0, help="--generate: seed of the data, training and oracle draws")
    p.add_argument("--quick", action="store_true",
                   help="--generate: 40 groups, 300 training pairs, 30 s of training (a smoke test, not the table)")
    p.add_argument("--method", choices=("ward", "hdbscan", "dbscan"), default="ward",
                   help="clustering algorithm (default ward, as chemtwin cluster)")
    p.add_argument("--metric", choices=("l1", "l2"), default="l1", help="distance (default l1)")
    p.add_argument("--scale", choices=("none", "standard"), default="none", help="per-dimension scaling (default none)")
    p.add_argument("--min-cluster-size", type=int, nargs="+", default=[3, 5, 8], help="grid of min cluster sizes (default 3 5 8)")
    p.add_argument("--selection", nargs="+", choices=("eom", "leaf"), default=["eom", "leaf"], help="hdbscan selections in the grid")
    p.add_argument("--eps-factor", type=float, nargs="+", default=[0.75, 1.0, 1.25],
                   help="dbscan: eps = this factor x the knee of the k-distance curve (grid; default 0.75 1 1.25)")
    p.add_argument("--threshold-factor", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5],
                   help="ward: cut = this factor x the twin-free knee threshold (grid; default 0.5 0.75 1 1.25 1.5)")
    p.add_argument("--default-min-cluster-size", type=int, default=5, help="the 'default' row's min cluster size (default 5)")
    p.add_argument("--min-group-size", type=int, default=2, help="true groups smaller than this are not scored (default 2)")
    p.add_argument("--json", default=None, help="write all runs to this JSON file")
    p.add_argument("--markdown", default=None, help="write the table to this Markdown file")
    args = p.parse_args(argv)
    try:
        specs = list(args.spaces)
        if args.synthetic:
            specs += make_synthetic(Path(args.synthetic))
        record = None
        if args.generate:
            if args.quick:
                args.groups, args.train_pairs, args.time_limit = 40, 300, 30.0
            built, record = build_spaces(Path(args.generate), args)
            specs += built
        if not specs:
            raise InputError("give at least one NAME=PATH space (or --synthetic DIR)")
        if args.default_min_cluster_size not in args.min_cluster_size:
            args.min_cluster_size = sorted(set(args.min_cluster_size) | {args.default_min_cluster_size})
        result = evaluate(specs, args)
        if record is not None:
            result["generated"] = record
    except InputError as exc:
        print(f"cluster_recovery: error: {exc}", file=sys.stderr)
        return 2
    table = markdown(result)
    print(table)
    if args.json:
        write_atomic(Path(args.json), json.dumps(json_safe(result), indent=2) + "\n")
    if args.markdown:
        write_atomic(Path(args.markdown), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
