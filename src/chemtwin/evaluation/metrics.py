"""Twin-retrieval scores (docs/science.md section 3), for any tags.

Rank metrics, over the doppelganger ranks of ``chemtwin.core.ranks`` (one rank per
ordered twin pair; for a pairs-only set, one per star), with ``N`` = number of stars
ranked (every star with a tag, group -1 included):

* ``frac_rank0``           fraction with rank 0 ("0% doppelgangers")
* ``frac_rank_lt_0p1pct``  fraction with rank < 0.001 N (rank < 25 for N = 25,000)
* ``frac_rank_lt_1pct``    fraction with rank < 0.01 N (rank < 250)
* ``median_rank``          median of the ranks
* ``rank_cdf``             fraction with rank <= r, at r = 0, 1, 2, 5, 10, 20, 50, ...

When some group has more than two members, ``nearest_mate`` repeats these with each
query star ranked against its closest group-mate.  Stars whose tag is NaN (ivar all zero)
are left out, with a warning; ``n_stars`` counts the stars that were ranked.

``condition_leakage``: how much of the conditioned labels a latent still carries.
``result_dict``: the layout of a result (``chemtwin evaluate``'s JSON, a bench row's file).
The spectral errors of models with a decoder are ``chemtwin.methods.fader.spectral_errors``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from sklearn.compose import TransformedTargetRegressor
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_score
from sklearn.neighbors import KNeighborsRegressor
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from chemtwin.core.files import json_safe
from chemtwin.core.ranks import (
    RankResult,
    check_metric,
    doppelganger_ranks,
    group_sizes,
)
from chemtwin.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["rank_fractions", "rank_cdf", "rank_summary", "evaluate_tags", "result_dict", "condition_leakage",
           "draw_rank_cdf", "plot_rank_cdf"]


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


# ---------------------------------------------------------------------- results


def result_dict(method: str, summary: dict, ds_info: dict, model_info: dict, mse_rec=None, mse_swapped=None,
                extra=None) -> dict:
    """The JSON-ready result of one evaluation: method, metric, counts, spectral errors, the rank
    summary, then the model and dataset entries and the method's own entries (``extra``)."""
    out = {"method": method, "metric": summary["metric"], "n_stars": summary["n_stars"],
           "n_pairs": summary["n_pairs"], "mse_reconstruction": mse_rec, "mse_swapped": mse_swapped}
    out.update({k: v for k, v in summary.items() if k not in out})
    out["model"] = model_info
    out["dataset"] = ds_info
    out.update(extra or {})
    return json_safe(out)


def condition_leakage(z, cond, names, *, max_stars: int = 3000, folds: int = 3, seed: int = 0) -> dict:
    """How much of each conditioned label (TEFF, LOGG, ...) a regressor can read off the latent:
    cross-validated R^2 of a ridge regression, 10 nearest neighbours and a small MLP, on up
    to ``max_stars`` random stars.  A disentangled latent gives R^2 near 0 (chance); the no-adversary
    baseline typically gives R^2 near 1.  Returns ``{name: {regressor: R^2}}``."""
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


# ---------------------------------------------------------------------- figure
def draw_rank_cdf(ax, curves, title: str | None = None, legend: bool = True) -> None:
    """Cumulative rank distributions on a log x axis into ``ax``: ``curves`` is a list
    of ``(label, ranks, n_stars)`` or ``(label, ranks, n_stars, line style keywords)``.
    ``legend=False`` leaves the legend to the caller (one figure legend for many panels)."""
    n_max = 1
    for label, ranks, n_stars, *style in curves:
        r, f = rank_cdf(ranks)
        ax.step(np.r_[r + 1, n_stars], np.r_[f, 1.0], where="post", label=label, **(style[0] if style else {}))
        n_max = max(n_max, n_stars)
    for frac, name in ((0.001, "0.1% N"), (0.01, "1% N")):
        if frac * n_max >= 1:  # inside the axis (rank + 1 >= 1); for small N the marker would hang outside
            ax.axvline(frac * n_max, color="0.6", ls="--", lw=0.8)
            ax.text(frac * n_max, 0.02, f" {name}", color="0.4", fontsize=8, clip_on=True)
    ax.set_xscale("log")
    ax.set_xlim(1, max(n_max, 10))
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("doppelganger rank + 1 (stars closer than the twin, plus one)")
    ax.set_ylabel("fraction of twin pairs with rank <= r")
    ax.grid(alpha=0.3, which="both")
    if title:
        ax.set_title(title)
    if legend:  # beside the axes, never over the curves
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0.0)


def plot_rank_cdf(curves, path, title: str | None = None):
    """:func:`draw_rank_cdf` as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 4.4), dpi=120, layout="constrained")
    draw_rank_cdf(ax, curves, title)
    fig.savefig(path)
    plt.close(fig)
    return path
