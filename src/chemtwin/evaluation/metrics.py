"""Twin-retrieval metrics (docs/science.md section 3) and one-call evaluations per method.

Rank metrics, over the doppelganger ranks of ``chemtwin.core.ranks`` (one rank per
ordered twin pair; for a pairs-only set, one per star), with ``N`` = number of stars
ranked (every star with a tag, group -1 included):

* ``frac_rank0``           fraction with rank 0 ("0% doppelgangers")
* ``frac_rank_lt_0p1pct``  fraction with rank < 0.001 N (rank < 25 for N = 25,000)
* ``frac_rank_lt_1pct``    fraction with rank < 0.01 N (rank < 250)
* ``median_rank``          median of the ranks
* ``rank_cdf``             fraction with rank <= r, at r = 0, 1, 2, 5, 10, 20, 50, ...

When some group has more than two members, ``nearest_mate`` repeats these with each
query star ranked against its closest group-mate.

Spectral errors of a model with the ChemTwin API (``condition``, ``transform(flux, ivar,
cond)``, ``swap(z, cond)``; ``reconstruct = swap(transform(x, u), u)``), streamed over the
dataset in batches; squared errors are averaged over the star's unmasked pixels (ivar >
0), then over stars:

* ``mse_reconstruction``   (D(E(x_i, u_i), u_i) - x_i)^2
* ``mse_swapped``          (D(E(x_i, u_i), u_j) - x_j)^2 over every ordered twin pair (i, j)

Stars whose ivar is all zero (or whose tag is NaN) are left out of everything, with a
warning; ``n_stars`` counts the stars that were ranked.

With ``twin_metric`` (model and polyres; opt-in) the tags are ranked after
:class:`chemtwin.search.twin_metric.TwinMetric`, learned on a training set's twin groups;
results then carry ``twin_metric``.

One function per method returns the JSON-ready dict that ``chemtwin evaluate`` writes:
:func:`evaluate_model`, :func:`evaluate_raw`, :func:`evaluate_polyres`,
:func:`evaluate_latent_file`; :func:`evaluate_tags` for any tag array.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from chemtwin.core.files import json_safe
from chemtwin.core.ranks import METRICS, RankResult, check_metric, doppelganger_ranks, group_sizes, twin_pairs
from chemtwin.core.whitening import whitening_matrix
from chemtwin.data.dataset import dataset_info
from chemtwin.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "METRICS", "twin_pairs", "group_sizes", "rank_fractions", "rank_cdf", "rank_summary", "evaluate_tags",
    "spectral_errors", "evaluate_model", "evaluate_raw", "evaluate_polyres", "evaluate_latent_file",
    "dataset_info", "json_safe", "whitening_matrix", "condition_leakage",
]

RESULT_KEYS = ("method", "metric", "n_stars", "n_pairs", "mse_reconstruction", "mse_swapped", "frac_rank0",
               "frac_rank_lt_0p1pct", "frac_rank_lt_1pct", "median_rank")


# ---------------------------------------------------------------------- rank fractions
def rank_fractions(ranks, n_stars: int) -> dict:
    """The paper's fractions for ranks among ``n_stars`` stars (see the module docstring)."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise InputError("no ranks to summarize (no twin pairs)")
    return {
        "frac_rank0": float(np.mean(ranks == 0)),
        "frac_rank_lt_0p1pct": float(np.mean(ranks < 0.001 * n_stars)),
        "frac_rank_lt_1pct": float(np.mean(ranks < 0.01 * n_stars)),
        "median_rank": float(np.median(ranks)),
    }


def cdf_points(n_stars: int) -> np.ndarray:
    """0, 1, 2, 5, 10, 20, 50, ... below ``n_stars``."""
    pts = [0]
    for e in range(int(math.log10(max(n_stars, 1))) + 1):
        pts += [m * 10**e for m in (1, 2, 5)]
    return np.array(sorted({p for p in pts if p < max(n_stars, 1)}), dtype=np.int64)


def rank_cdf(ranks, at=None) -> tuple[np.ndarray, np.ndarray]:
    """``(r, F)``: fraction of ranks ``<= r``; at every distinct rank when ``at`` is None."""
    ranks = np.sort(np.asarray(ranks).ravel())
    r = np.unique(ranks) if at is None else np.asarray(at)
    if ranks.size == 0:
        return r, np.zeros(r.shape)
    return r, np.searchsorted(ranks, r, side="right") / ranks.size


def rank_summary(result: RankResult, group=None) -> dict:
    """Fractions, median, CDF and counts of a :class:`RankResult` (+ ``nearest_mate``
    when ``group`` has a group of more than two)."""
    n = result.n_stars
    out = {"metric": result.metric, "n_stars": int(n), "n_pairs": len(result),
           "n_query_stars": int(np.unique(result.query).size)}
    out.update(rank_fractions(result.rank, n))
    r, f = rank_cdf(result.rank, cdf_points(n))
    out["rank_cdf"] = {"rank": r.tolist(), "fraction": f.tolist()}
    if group is not None and (group_sizes(group) > 2).any():
        _, nearest = result.nearest()
        out["nearest_mate"] = rank_fractions(nearest, n)
    return out


# ---------------------------------------------------------------------- tags


def _twin_metric(tags_train, group_train, tags, train_info) -> tuple[np.ndarray, dict]:
    from chemtwin.search.twin_metric import TwinMetric

    metric = TwinMetric().fit(tags_train, group_train)
    return metric.transform(tags), {"train": train_info, "n_train_groups": metric.n_groups_}


def _drop_unusable(tags, group, what="tag"):
    tags = np.asarray(tags)
    good = np.isfinite(tags).all(axis=1) if tags.ndim == 2 else np.ones(len(tags), bool)
    if not good.all():
        log.warning("%d stars have no %s (NaN): left out of the ranks", int((~good).sum()), what)
    return tags[good], np.asarray(group)[good], good


def evaluate_tags(tags, group, metric: str = "l1", *, progress: bool = True, max_queries: int | None = None,
                  seed: int = 0, device: str = "cpu", return_ranks: bool = False, **rank_options):
    """Rank metrics for tags (N, d) and twin groups (N,); NaN rows are left out.

    Returns the summary dict (and the :class:`RankResult`, indices into the kept rows,
    when ``return_ranks``)."""
    check_metric(metric)
    tags = np.asarray(tags)
    group = np.asarray(group)
    if tags.ndim != 2 or len(tags) != len(group):
        raise InputError(f"tags {tags.shape} and group ({len(group)},) have different lengths")
    tags, group, _ = _drop_unusable(tags, group)
    result = doppelganger_ranks(tags, group, metric, max_queries=max_queries, seed=seed, device=device,
                                progress=progress, **rank_options)
    summary = rank_summary(result, group)
    if max_queries is not None:
        summary["max_queries"] = int(max_queries)
    return (summary, result) if return_ranks else summary


# ---------------------------------------------------------------------- datasets
def _open(data):
    from chemtwin.data.dataset import open_dataset

    if isinstance(data, str) or hasattr(data, "__fspath__"):
        return open_dataset(data), True
    return data, False






def _columns(ds, names) -> list[int]:
    missing = [c for c in names if c not in ds.label_names]
    if missing:
        raise InputError(f"{ds.path}: dataset has no label(s) {', '.join(missing)} (the model is conditioned on "
                         f"{', '.join(names)})")
    return [list(ds.label_names).index(c) for c in names]


def _group(ds) -> np.ndarray:
    g = ds.group
    return np.asarray(g() if callable(g) else g, dtype=np.int64)


def _require_twins(group, source) -> None:
    if not (group_sizes(group) >= 2).any():
        raise InputError(f"{source}: no twin groups (every star has group -1 or is alone in its group)")


def _pixel_mse(pred, flux, ivar) -> np.ndarray:
    """Per-star mean squared error over pixels with ivar > 0 (NaN when there are none)."""
    good = ivar > 0
    err = np.where(good, (np.asarray(pred, np.float64) - np.nan_to_num(flux.astype(np.float64))) ** 2, 0.0)
    n = good.sum(axis=1)
    return np.where(n > 0, err.sum(axis=1) / np.maximum(n, 1), np.nan)


def spectral_errors(model, data, batch_size: int = 1024, progress: bool = True) -> dict:
    """Latents and spectral errors of a ChemTwin-like model over a dataset, streamed.

    Returns ``{"z": (N, d) with NaN rows for unusable stars, "ok": (N,) bool,
    "mse_reconstruction", "mse_swapped", "n_swapped_pairs"}``.
    """
    from tqdm.auto import tqdm

    from chemtwin.data.spectra import check_spectra

    ds, close = _open(data)
    try:
        cols = _columns(ds, tuple(model.condition))
        group = _group(ds)
        _require_twins(group, ds.path)
        n = ds.n_stars
        z = None
        ok = np.zeros(n, bool)
        rec = np.full(n, np.nan)
        nb = -(-n // batch_size)
        # pass 1: encode, reconstruct
        for a in tqdm(range(0, n, batch_size), total=nb, desc="reconstruct", disable=not progress, leave=False):
            b = ds.read(a, min(a + batch_size, n))
            flux, ivar = np.asarray(b.flux, np.float32), np.asarray(b.ivar, np.float32)
            good = check_spectra(flux, ivar, a, str(ds.path))
            cond = np.asarray(b.labels, np.float32)[:, cols]
            bad = good & ~np.isfinite(cond).all(axis=1)
            if bad.any():
                raise InputError(f"{ds.path}: row {a + int(np.flatnonzero(bad)[0])} has a non-finite condition label")
            if not good.any():
                continue
            zb = np.asarray(model.transform(flux[good], ivar[good], cond[good]), np.float32)
            if z is None:
                z = np.full((n, zb.shape[1]), np.nan, np.float32)
            rows = a + np.flatnonzero(good)
            z[rows] = zb
            fin = np.isfinite(zb).all(axis=1)
            ok[rows[fin]] = True
            if fin.any():
                pred = model.swap(zb[fin], cond[good][fin])
                rec[rows[fin]] = _pixel_mse(pred, flux[good][fin], ivar[good][fin])
        if z is None:
            raise InputError(f"{ds.path}: no usable spectra (ivar is zero everywhere)")
        # pass 2: swapped latents, targets j read in order
        qi, tj = twin_pairs(group)
        keep = ok[qi] & ok[tj]
        qi, tj = qi[keep], tj[keep]
        order = np.argsort(tj, kind="stable")
        qi, tj = qi[order], tj[order]
        swapped_sum, swapped_n = 0.0, 0
        bounds = np.searchsorted(tj, np.arange(0, n + batch_size, batch_size))
        for k, a in enumerate(tqdm(range(0, n, batch_size), total=nb, desc="swapped", disable=not progress,
                                   leave=False)):
            lo, hi = bounds[k], bounds[k + 1]
            if lo == hi:
                continue
            b = ds.read(a, min(a + batch_size, n))
            flux, ivar = np.asarray(b.flux, np.float32), np.asarray(b.ivar, np.float32)
            cond = np.asarray(b.labels, np.float32)[:, cols]
            for c in range(lo, hi, batch_size):
                src, dst = qi[c : min(c + batch_size, hi)], tj[c : min(c + batch_size, hi)] - a
                pred = model.swap(z[src], cond[dst])
                e = _pixel_mse(pred, flux[dst], ivar[dst])
                e = e[np.isfinite(e)]
                swapped_sum += float(e.sum())
                swapped_n += int(e.size)
        mse_rec = float(np.nanmean(rec[ok])) if ok.any() else None
        return {"z": z, "ok": ok, "mse_reconstruction": mse_rec,
                "mse_swapped": swapped_sum / swapped_n if swapped_n else None, "n_swapped_pairs": swapped_n}
    finally:
        if close:
            ds.close()


def _result(method, summary, ds_info, model_info, mse_rec=None, mse_swapped=None, extra=None) -> dict:
    out = {"method": method, "metric": summary["metric"], "n_stars": summary["n_stars"],
           "n_pairs": summary["n_pairs"], "mse_reconstruction": mse_rec, "mse_swapped": mse_swapped}
    out.update({k: v for k, v in summary.items() if k not in out})
    out["model"] = model_info
    out["dataset"] = ds_info
    out.update(extra or {})
    return json_safe(out)


def _model_info(model, path=None) -> dict:
    cfg = getattr(model, "config", None)
    info = {"path": os.path.abspath(str(path)) if path is not None else None,
            "class": type(model).__name__,
            "condition": list(getattr(model, "condition", ()))}
    for key in ("model", "preset", "latent_dim", "lambda_adv", "seed"):
        if cfg is not None and hasattr(cfg, key):
            info[key] = getattr(cfg, key)
    return info


def evaluate_model(model, data, metric: str = "l1", *, batch_size: int = 1024, device: str = "cpu",
                   progress: bool = True, max_queries: int | None = None, seed: int = 0,
                   return_ranks: bool = False, twin_metric=None):
    """Everything for a trained model (a ChemTwin, or a model folder to load) on a dataset:
    reconstruction and swapped MSE, ranks of its latents, and how much of the conditioned labels
    its latents still carry (``condition_r2``, :func:`condition_leakage`).  With
    ``twin_metric`` (a training dataset with twin groups) the latents are ranked after
    the twin metric learned on that set's latents."""
    check_metric(metric)
    path = None
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        from chemtwin.tagging.estimator import ChemTwin

        path = model
        model = ChemTwin.load(model, device=device)
    ds, close = _open(data)
    tr, close_tr = None, False
    try:
        if twin_metric is not None:  # a bad training set fails before the slow passes
            tr, close_tr = _open(twin_metric)
            _require_twins(_group(tr), tr.path)
        err = spectral_errors(model, ds, batch_size=batch_size, progress=progress)
        z, extra = err["z"], {"n_swapped_pairs": err["n_swapped_pairs"]}
        if tr is not None:
            z, extra["twin_metric"] = _twin_metric(model.embed_dataset(tr, batch_size), _group(tr), z,
                                                   dataset_info(tr))
        summary, ranks = evaluate_tags(z, _group(ds), metric, progress=progress, max_queries=max_queries,
                                       seed=seed, return_ranks=True)
        condition = list(model.condition)
        extra["condition_r2"] = condition_leakage(z, ds.labels(condition), condition, seed=seed)
        out = _result("model", summary, dataset_info(ds), _model_info(model, path), err["mse_reconstruction"],
                      err["mse_swapped"], extra)
        return (out, ranks) if return_ranks else out
    finally:
        if close:
            ds.close()
        if close_tr:
            tr.close()


LEAKAGE_REGRESSORS = ("ridge", "knn", "mlp")


def condition_leakage(z, cond, names, *, max_stars: int = 3000, folds: int = 3, seed: int = 0) -> dict:
    """How much of each conditioned label (TEFF, LOGG, ...) a regressor can read off the latent:
    cross-validated R^2 of a ridge regression, 10 nearest neighbours and a small MLP, on up
    to ``max_stars`` random stars.  A disentangled latent gives R^2 near 0 (chance); the no-adversary
    baseline typically gives R^2 near 1.  Returns ``{name: {regressor: R^2}}``."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    z, cond = np.asarray(z, np.float64), np.asarray(cond, np.float64).reshape(len(z), -1)
    ok = np.flatnonzero(np.isfinite(z).all(1) & np.isfinite(cond).all(1))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.permutation(ok)[:max_stars])
    if len(rows) < 10 * folds:
        raise InputError(f"need at least {10 * folds} stars with finite latents to measure leakage, have {len(rows)}")
    regressors = {
        "ridge": RidgeCV(),
        "knn": KNeighborsRegressor(10),
        "mlp": MLPRegressor(hidden_layer_sizes=(64, 64), learning_rate_init=3e-3, max_iter=500, early_stopping=True,
                            random_state=seed),
    }
    # Both sides standardised: an MLP does not learn a target of ~4500 K from unit-scale inputs.
    regressors = {reg: TransformedTargetRegressor(make_pipeline(StandardScaler(), model), transformer=StandardScaler())
                  for reg, model in regressors.items()}
    split = KFold(folds, shuffle=True, random_state=seed)
    return {name: {reg: float(cross_val_score(model, z[rows], cond[rows, k], cv=split).mean())
                   for reg, model in regressors.items()}
            for k, name in enumerate(names)}


def _read_all(ds, names=()):
    """flux, ivar, condition labels of every star (for baselines held in memory)."""
    b = ds.read(0, ds.n_stars)
    cond = np.asarray(b.labels)[:, _columns(ds, names)] if names else None
    return np.asarray(b.flux, np.float32), np.asarray(b.ivar, np.float32), cond


def evaluate_raw(data, metric: str = "l1", *, progress: bool = True, max_queries: int | None = None,
                 seed: int = 0, device: str = "cpu", return_ranks: bool = False):
    """The raw-spectrum baseline: every spectrum (masked pixels filled with the set's
    per-pixel mean) is its own tag.  Held in memory; high-dimensional, so slow on a CPU
    for large sets: ``max_queries`` ranks a random subset of query stars."""
    from chemtwin.tagging.polyres import RawSpectrum

    check_metric(metric)
    ds, close = _open(data)
    try:
        group = _group(ds)
        _require_twins(group, ds.path)
        flux, ivar, _ = _read_all(ds)
        tags = RawSpectrum().fit_transform(flux, ivar)
        del flux, ivar
        summary, ranks = evaluate_tags(tags, group, metric, progress=progress, max_queries=max_queries, seed=seed,
                                       device=device, return_ranks=True)
        out = _result("raw", summary, dataset_info(ds), {"path": None, "class": "RawSpectrum"})
        return (out, ranks) if return_ranks else out
    finally:
        if close:
            ds.close()


def evaluate_polyres(train, data, metric: str = "l1", *, degree: int = 4, n_components: int = 50,
                     condition=("TEFF", "LOGG"), progress: bool = True, max_queries: int | None = None,
                     seed: int = 0, device: str = "cpu", model=None, return_ranks: bool = False,
                     twin_metric: bool = False):
    """The polynomial-residual baseline: fitted on ``train`` (or a fitted ``model``),
    evaluated on ``data``; with ``twin_metric`` its tags are ranked after
    the twin metric learned on ``train``'s tags and twin groups."""
    from chemtwin.tagging.polyres import PolyResiduals

    check_metric(metric)
    ds, close = _open(data)
    try:
        group = _group(ds)
        _require_twins(group, ds.path)
        train_info, train_tags = None, None
        if model is None or twin_metric:
            if train is None:
                raise InputError("polyres needs its training set (train=...) to fit on or to learn the twin metric from")
            tr, close_tr = _open(train)
            try:
                if model is None:
                    model = PolyResiduals(degree=degree, n_components=n_components, condition=condition)
                    model.fit_dataset(tr, progress=progress)
                train_info = dataset_info(tr)
                if twin_metric:
                    train_tags, train_group = model.transform_dataset(tr, progress=progress), _group(tr)
            finally:
                if close_tr:
                    tr.close()
        tags = model.transform_dataset(ds, progress=progress)
        extra = {}
        if twin_metric:
            tags, extra["twin_metric"] = _twin_metric(train_tags, train_group, tags, train_info)
        summary, ranks = evaluate_tags(tags, group, metric, progress=progress, max_queries=max_queries, seed=seed,
                                       device=device, return_ranks=True)
        info = {"path": None, "class": "PolyResiduals", "degree": model.degree,
                "n_components": int(len(model.components_)), "condition": list(model.condition),
                "train": train_info}
        out = _result("polyres", summary, dataset_info(ds), info, extra=extra)
        return (out, ranks) if return_ranks else out
    finally:
        if close:
            ds.close()


def evaluate_latent_file(latents, data=None, metric: str = "l1", *, progress: bool = True,
                         max_queries: int | None = None, seed: int = 0, return_ranks: bool = False):
    """Rank-only evaluation of a latent file (``z`` and ``group``, as ``chemtwin embed``
    writes).  With ``data`` the groups come from the dataset: through the latent file's
    ``row`` array when it has one, else row by row (the lengths must then agree).
    ``latents`` may be a folder of latent shards (``chemtwin embed --workers``)."""
    from chemtwin.search.latents import open_latents

    check_metric(metric)
    with open_latents(latents) as lf:
        z = lf.read(check=False)
        group = lf.group
        lat_path = os.path.abspath(str(lf.path))
        rows, attrs = lf.rows, json_safe(lf.attrs)
    ds_info = None
    if data is not None:
        ds, close = _open(data)
        try:
            ds_group = _group(ds)
            if rows is not None:
                if rows.shape != (len(z),) or (rows.size and (rows.min() < 0 or rows.max() >= ds.n_stars)):
                    raise InputError(f"{latents}: its 'row' array does not index the {ds.n_stars} stars of {ds.path}")
                ds_group = ds_group[rows]
            elif ds.n_stars != len(z):
                raise InputError(f"{latents} has {len(z)} latents but {ds.path} has {ds.n_stars} stars")
            if group is not None and not np.array_equal(group, ds_group):
                raise InputError(f"the groups in {latents} disagree with those of {ds.path}")
            group = ds_group
            ds_info = dataset_info(ds)
        finally:
            if close:
                ds.close()
    if group is None:
        raise InputError(f"{latents}: no 'group' array (give the dataset too, or embed a dataset with groups)")
    _require_twins(group, latents)
    summary, ranks = evaluate_tags(z, group, metric, progress=progress, max_queries=max_queries, seed=seed,
                                   return_ranks=True)
    model_info = {"path": attrs.get("model"), "class": "latents", "latents": lat_path,
                  **{k: attrs[k] for k in ("condition", "latent_dim", "model_kind") if k in attrs}}
    if ds_info is None:
        ds_info = {"path": attrs.get("data"), "n_stars": int(len(z)), "attrs": {}}
    out = _result("latents", summary, ds_info, model_info)
    return (out, ranks) if return_ranks else out


# ---------------------------------------------------------------------- figure
def draw_rank_cdf(ax, curves, title: str | None = None) -> None:
    """Cumulative rank distributions on a log x axis into ``ax``: ``curves`` is a list
    of ``(label, ranks, n_stars)`` or ``(label, ranks, n_stars, line style keywords)``."""
    n_max = 1
    for label, ranks, n_stars, *style in curves:
        r, f = rank_cdf(ranks)
        ax.step(np.r_[r + 1, n_stars], np.r_[f, 1.0], where="post", label=label, **(style[0] if style else {}))
        n_max = max(n_max, n_stars)
    for frac, name in ((0.001, "0.1% N"), (0.01, "1% N")):
        ax.axvline(frac * n_max, color="0.6", ls="--", lw=0.8)
        ax.text(frac * n_max, 0.02, f" {name}", color="0.4", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(1, max(n_max, 10))
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("doppelganger rank + 1 (stars closer than the twin, plus one)")
    ax.set_ylabel("fraction of twin pairs with rank <= r")
    ax.grid(alpha=0.3, which="both")
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)


def plot_rank_cdf(curves, path, title: str | None = None):
    """:func:`draw_rank_cdf` as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    draw_rank_cdf(ax, curves, title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
