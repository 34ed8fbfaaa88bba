"""Blind chemical tagging: clustering of latents into groups of one chemistry.

Clustering uses scikit-learn: Ward's hierarchical clustering (default), HDBSCAN or DBSCAN.
Ward's tree is cut where it stops merging stars that noise alone can explain, found
without twins (:func:`knee_threshold`); why Ward and this cut are the default is in
docs/search.md "Blind clustering".  HDBSCAN and DBSCAN use the same metric as twin search
(L1 by default); Ward is defined for L2.  Latents are **not standardized** by
default: the latent's own geometry is the twin metric (docs/science.md section 2), a
global scale does not change HDBSCAN's result, and rescaling every dimension to unit
variance would blow up dimensions that carry little chemistry (collapsed or noise
dimensions).  ``scale="standard"`` (zero mean, unit variance per dimension) is there
for spaces whose dimensions have unrelated units.

Scores against known twin groups: :mod:`chemtwin.search.cluster_metrics`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import DBSCAN, HDBSCAN, AgglomerativeClustering

from chemtwin import __version__
from chemtwin.core.files import atomic_output, json_safe, new_hdf5, prepare_output, temporary_path
from chemtwin.data.dataset_writer import write_star_columns
from chemtwin.errors import InputError
from chemtwin.search.index import TwinIndex
from chemtwin.search.tables import cluster_table, write_hdf5_table, write_table

log = logging.getLogger(__name__)

METHODS = ("ward", "hdbscan", "dbscan")
SCALES = ("none", "standard")
SKLEARN_METRIC = {"l1": "manhattan", "l2": "euclidean"}
# Above this many stars Ward may merge only k-nearest neighbours: memory O(N k), not O(N^2).
WARD_DENSE_MAX = 20_000
WARD_NEIGHBOURS = 10


@dataclass
class ClusterResult:
    """Cluster label per star (-1 = noise) and HDBSCAN's membership strength (0..1)."""

    labels: np.ndarray
    probabilities: np.ndarray
    params: dict = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        return int(self.labels.max() + 1) if self.labels.size and self.labels.max() >= 0 else 0

    @property
    def noise_fraction(self) -> float:
        return float(np.mean(self.labels < 0)) if self.labels.size else 0.0


def scale_latents(z: np.ndarray, scale: str = "none") -> np.ndarray:
    """Return the latents to cluster: as they are, or standardized per dimension."""
    if scale not in SCALES:
        raise InputError(f"unknown scale '{scale}' (choose from {', '.join(SCALES)})")
    z = np.asarray(z, dtype=np.float64)
    if scale == "standard":
        sd = z.std(axis=0)
        sd[sd == 0] = 1.0
        z = (z - z.mean(axis=0)) / sd
    return z


def knn_distance(z: np.ndarray, k: int, metric: str = "l1") -> np.ndarray:
    """Distance of every star to its k-th nearest neighbour, the star itself counted first."""
    index = TwinIndex.build(np.asarray(z, dtype=np.float32), metric=metric)
    k = int(min(max(k, 1), len(z)))
    dist, _ = index.search(np.asarray(z, dtype=np.float32), k)
    return dist[:, k - 1].astype(np.float64)


def auto_eps(z: np.ndarray, min_samples: int, metric: str = "l1", quantile: float | None = None) -> float:
    """A DBSCAN radius from the data, from each star's distance d_k to its
    ``min_samples``-th nearest neighbour (itself counted, as DBSCAN counts it).

    Default: the knee of the sorted d_k curve, i.e. the d_k where the curve (both axes
    scaled to 0..1) lies furthest below the straight line from its first to its last
    point: stars left of the knee sit in dense groups, those right of it in the sparse
    field.  With ``quantile`` given: that quantile of d_k instead.  A starting point for
    --eps, not a tuned value."""
    d = np.sort(knn_distance(z, min_samples, metric))
    if quantile is not None:
        eps = float(np.quantile(d, quantile))
    else:
        eps = float(d[_knee(d)])
    if eps > 0:
        return eps
    return float(np.min(d[d > 0])) if np.any(d > 0) else 1e-12


def _knee(ascending: np.ndarray) -> int:
    """Index of the knee of an ascending curve: where the curve, both axes scaled to 0..1,
    lies furthest below the straight line from its first to its last point."""
    span = ascending[-1] - ascending[0]
    if not span > 0:
        return ascending.size - 1
    x = np.linspace(0.0, 1.0, ascending.size)
    return int(np.argmax(x - (ascending - ascending[0]) / span))


def knee_threshold(heights) -> float:
    """Where to cut Ward's tree, from its merge heights alone (no twin, no scale given).

    Ward's merge height is sqrt(2 x the increase of the within-cluster sum of squares).
    Merges inside a group of one chemistry cost what the measurement noise costs; merges
    across groups and field stars cost the population's chemical spread, larger by a
    factor, not an offset.  So the sorted *log* heights rise slowly over the noise-sized
    merges, then steeply: the cut is the knee of that curve (:func:`_knee`).  The same
    rule on a latent in any unit gives the same clusters (a log scale is shift-invariant)."""
    h = np.sort(np.asarray(heights, np.float64))
    h = h[h > 0]
    if h.size == 0:
        return 0.0
    return float(h[_knee(np.log(h))])


def _knn_graph(x: np.ndarray, k: int) -> sparse.csr_matrix:
    """Connectivity for Ward: each star joined to its k nearest neighbours (FAISS, exact)."""
    k = min(k, len(x) - 1)
    _, rows = TwinIndex.build(np.asarray(x, np.float32), metric="l2").search(np.asarray(x, np.float32), k + 1)
    star = np.repeat(np.arange(len(x)), k + 1)
    graph = sparse.csr_matrix((np.ones(star.size), (star, rows.ravel())), shape=(len(x), len(x)))
    graph.setdiag(0)
    graph.eliminate_zeros()
    return graph


def _ward(x: np.ndarray, threshold) -> tuple[np.ndarray, float]:
    """Labels of Ward's tree cut at ``threshold`` (a merge height, or "auto" = :func:`knee_threshold`)."""
    connectivity = None
    if len(x) > WARD_DENSE_MAX:
        connectivity = _knn_graph(x, WARD_NEIGHBOURS)
        log.info("Ward's tree of %d stars on their %d-nearest-neighbour graph (about 1.5 min per 100,000 stars on "
                 "2 cores)", len(x), WARD_NEIGHBOURS)
    with warnings.catch_warnings():
        # Groups far apart leave the neighbour graph in pieces; scikit-learn then joins the pieces, as wanted.
        warnings.filterwarnings("ignore", message="the number of connected components", category=UserWarning)
        tree = AgglomerativeClustering(n_clusters=None, distance_threshold=0.0, linkage="ward",
                                       connectivity=connectivity).fit(x)
    if threshold == "auto":
        threshold = knee_threshold(tree.distances_)
    threshold = float(threshold)
    if not np.isfinite(threshold) or threshold < 0:
        raise InputError(f"threshold must be a number >= 0 or 'auto', got {threshold}")
    return _cut(tree.children_, tree.distances_, threshold, len(x)), threshold


def _cut(children: np.ndarray, heights: np.ndarray, threshold: float, n_stars: int) -> np.ndarray:
    """Cluster of each star once the tree's merges below ``threshold`` are made.  As scikit-learn
    cuts: the first N - k merges in the tree's order, k = 1 + the merges at or above the threshold."""
    made = len(children) - int(np.count_nonzero(heights >= threshold))
    nodes = n_stars + len(children)
    joined = sparse.coo_matrix((np.ones(2 * made), (children[:made].ravel(), np.repeat(n_stars + np.arange(made), 2))),
                               shape=(nodes, nodes))
    _, component = connected_components(joined, directed=False)
    return np.unique(component[:n_stars], return_inverse=True)[1]


def cluster_latents(
    z,
    method: str = "ward",
    *,
    min_cluster_size: int = 5,
    min_samples: int | None = None,
    eps: float | str | None = None,
    threshold: float | str = "auto",
    metric: str | None = None,
    scale: str = "none",
    selection: str = "eom",
    n_jobs: int | None = None,
) -> ClusterResult:
    """Cluster latents (N, d) with Ward's hierarchical clustering, HDBSCAN or DBSCAN.

    * ward (default): Ward's tree (L2 only) cut at ``threshold``, a merge height, or "auto"
      (:func:`knee_threshold`); clusters smaller than ``min_cluster_size`` become noise.
    * hdbscan: ``min_cluster_size`` (smallest group reported), ``min_samples`` (density
      smoothing; default = min_cluster_size), ``selection`` "eom" (excess of mass,
      favours big clusters) or "leaf" (finest clusters; often better for many small
      twin groups).
    * dbscan: ``eps`` (radius, or "auto" = the knee of :func:`auto_eps`) and ``min_samples``
      (default = min_cluster_size; points within eps, the star itself counted).

    ``metric``: l2 for ward, l1 (default) or l2 for the others.
    """
    if method not in METHODS:
        raise InputError(f"unknown clustering method '{method}' (choose from {', '.join(METHODS)})")
    metric = metric or ("l2" if method == "ward" else "l1")
    if method == "ward" and metric != "l2":
        raise InputError(f"ward clustering is defined for the l2 metric, not {metric}")
    if metric not in SKLEARN_METRIC:
        raise InputError(f"unknown metric '{metric}' (choose from {', '.join(SKLEARN_METRIC)})")
    z = np.asarray(z)
    if z.ndim != 2 or len(z) == 0:
        raise InputError(f"latents must be a non-empty 2-D array (stars, dims), got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        row = int(np.flatnonzero(~np.isfinite(z).all(axis=1))[0])
        raise InputError(f"latent row {row} holds NaN or inf")
    if int(min_cluster_size) < 2:
        raise InputError(f"min_cluster_size must be >= 2, got {min_cluster_size}")
    if min_samples is not None and int(min_samples) < 1:
        raise InputError(f"min_samples must be >= 1, got {min_samples}")
    x = scale_latents(z, scale)
    params = {"method": method, "metric": metric, "scale": scale, "min_cluster_size": int(min_cluster_size),
              "min_samples": None if min_samples is None else int(min_samples)}
    if method == "ward":
        if len(x) < 2:
            return ClusterResult(np.full(len(x), -1, np.int64), np.zeros(len(x), np.float32), params)
        labels, params["threshold"] = _ward(x, threshold)
        labels = _drop_small(labels, int(min_cluster_size))
        prob = (labels >= 0).astype(np.float32)
    elif method == "hdbscan":
        if selection not in ("eom", "leaf"):
            raise InputError(f"unknown cluster selection '{selection}' (choose eom or leaf)")
        if len(x) < 2:
            return ClusterResult(np.full(len(x), -1, np.int64), np.zeros(len(x), np.float32), params)
        ms = None if min_samples is None else min(int(min_samples), len(x))
        model = HDBSCAN(
            min_cluster_size=int(min(min_cluster_size, max(len(x), 2))), min_samples=ms,
            metric=SKLEARN_METRIC[metric], cluster_selection_method=selection, copy=False, n_jobs=n_jobs,
        )
        labels = model.fit_predict(x)
        prob = np.asarray(model.probabilities_, dtype=np.float32)
        params["selection"] = selection
    else:
        ms = int(min_samples if min_samples is not None else min_cluster_size)
        if eps is None:
            raise InputError("dbscan needs eps (a radius in latent units, or 'auto')", "eps")
        if isinstance(eps, str):
            if eps != "auto":
                try:
                    eps = float(eps)
                except ValueError:
                    raise InputError(f"eps must be a positive number or 'auto', got '{eps}'", "eps") from None
            else:
                eps = auto_eps(x, ms, metric)
        eps = float(eps)
        if not np.isfinite(eps) or eps <= 0:
            raise InputError(f"eps must be a positive number, got {eps}")
        labels = DBSCAN(eps=eps, min_samples=ms, metric=SKLEARN_METRIC[metric], n_jobs=n_jobs).fit_predict(x)
        # DBSCAN has no notion of minimum cluster size: drop clusters smaller than it.
        labels = _drop_small(labels, int(min_cluster_size))
        prob = (labels >= 0).astype(np.float32)
        params.update(eps=eps, min_samples=ms)
    return ClusterResult(np.asarray(labels, dtype=np.int64), prob, params)


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Mark clusters with fewer than ``min_size`` members as noise; renumber 0..n-1."""
    labels = np.asarray(labels, dtype=np.int64).copy()
    ok = labels >= 0
    if not ok.any():
        return labels
    ids, inverse, counts = np.unique(labels[ok], return_inverse=True, return_counts=True)
    keep = counts >= min_size
    new = np.full(ids.size, -1, np.int64)
    new[keep] = np.arange(int(keep.sum()))
    labels[ok] = new[inverse]
    return labels




def project_2d(z: np.ndarray, max_rows: int | None = None, seed: int = 0):
    """First two principal components of ``z``: (xy (N, 2), explained variance fractions (2,))."""
    z = np.asarray(z, dtype=np.float64)
    centre = z.mean(axis=0)
    fit = z
    if max_rows is not None and len(z) > max_rows:
        fit = z[np.random.default_rng(seed).choice(len(z), max_rows, replace=False)]
    _, s, vt = np.linalg.svd(fit - centre, full_matrices=False)
    comps = vt[:2] if vt.shape[0] >= 2 else np.vstack([vt, np.zeros_like(vt)])
    var = s**2
    explained = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    explained = np.pad(explained, (0, 2 - explained.size))
    return (z - centre) @ comps.T, explained


def plot_clusters(z, labels, path, group=None, title: str = "", max_points: int = 200_000, seed: int = 0) -> Path:
    """Scatter the first two principal components, coloured by found cluster (and, when
    ``group`` is given, a second panel coloured by true group).  Noise / field stars grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = np.asarray(z)
    labels = np.asarray(labels)
    rows = np.arange(len(z))
    note = ""
    if len(z) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(len(z), max_points, replace=False))
        note = f" ({max_points:,} of {len(z):,} stars shown)"
    xy, explained = project_2d(z, max_rows=max_points, seed=seed)
    xy = xy[rows]
    panels = [("found clusters", labels[rows])]
    if group is not None:
        panels.append(("true groups", np.asarray(group)[rows]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.4), squeeze=False, sharex=True, sharey=True,
                             layout="constrained")
    cmap = plt.get_cmap("tab20")
    size = 6 if len(rows) <= 20_000 else 1
    for ax, (name, lab) in zip(axes[0], panels):
        bg = lab < 0
        ax.scatter(xy[bg, 0], xy[bg, 1], s=size, c="0.8", lw=0, label="noise" if name.startswith("found") else "no group")
        if (~bg).any():
            ax.scatter(xy[~bg, 0], xy[~bg, 1], s=size, c=cmap((lab[~bg] % 20) / 19.999), lw=0)
        n = np.unique(lab[~bg]).size
        ax.set_title(f"{name}: {n}")
        ax.set_xlabel(f"PC 1 of latents ({100 * explained[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC 2 of latents ({100 * explained[1]:.1f}% of variance)")
        if bg.any():
            ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12), markerscale=3, fontsize=8, frameon=False)  # below the axes
    fig.suptitle((title or "clusters") + note)
    path = Path(path)

    tmp = temporary_path(path)
    try:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def write_clusters(path, result: ClusterResult, star_id=None, group=None, metrics: dict | None = None,
                   source: str | None = None, overwrite: bool = False, fmt: str = "hdf5") -> Path:
    """Write CLUSTERS.h5: ``cluster`` int64 (N,) (-1 noise), ``probability`` float32 (N,),
    ``star_id`` and ``group`` copied from the latent file when present; attributes
    ``params`` and ``metrics`` (JSON), ``method``, ``n_clusters``, ``source``; and the same as an
    astropy table ``table`` (``Table.read(path)`` opens it).  ``fmt`` fits / ecsv: that table
    alone, as a FITS binary table or ECSV (``chemtwin.search.tables``)."""

    path = prepare_output(path, overwrite)
    meta = {"method": result.params.get("method", ""), "params": json_safe(result.params),
            "n_clusters": result.n_clusters, "noise_fraction": result.noise_fraction,
            "metrics": json_safe(metrics or {}), "source": source or "", "chemtwin_version": __version__}
    table = cluster_table(result.labels, result.probabilities, star_id=star_id, group=group, meta=meta)
    if fmt != "hdf5":
        return write_table(table, path, fmt, overwrite=overwrite)
    with atomic_output(path) as tmp, new_hdf5(tmp) as f:
        write_hdf5_table(table, f)
        f.create_dataset("cluster", data=result.labels.astype(np.int64))
        f.create_dataset("probability", data=result.probabilities.astype(np.float32))
        write_star_columns(f, group, star_id)
        f.attrs["method"] = result.params.get("method", "")
        f.attrs["params"] = json.dumps(json_safe(result.params))
        f.attrs["n_clusters"] = result.n_clusters
        f.attrs["noise_fraction"] = result.noise_fraction
        f.attrs["metrics"] = json.dumps(json_safe(metrics or {}))
        f.attrs["source"] = source or ""
        f.attrs["chemtwin_version"] = __version__
    return path
