"""How well found clusters match known twin groups (``group`` >= 0; -1 = field star).

Definitions follow Price-Jones & Bovy (2019) and are worked through in docs/search.md.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score

from chemtwin.errors import InputError


def _truth_ids(group: np.ndarray) -> np.ndarray:
    """True group ids with every field star (group < 0) made its own singleton group."""
    group = np.asarray(group, dtype=np.int64)
    truth = group.copy()
    field_rows = np.flatnonzero(group < 0)
    if field_rows.size:
        base = int(group.max()) + 1 if (group >= 0).any() else 0
        truth[field_rows] = base + np.arange(field_rows.size)
    return truth


def clustering_metrics(
    labels,
    group,
    min_purity: float = 0.5,
    min_completeness: float = 0.5,
    min_group_size: int = 2,
) -> dict:
    """Score found clusters against known twin groups.

    Notation: a found cluster C is a set of stars with the same label >= 0 (noise, -1,
    is no cluster); a true group G is a set of stars with the same ``group`` >= 0; a
    field star (``group`` -1) counts as a group of its own.  Only groups with at least
    ``min_group_size`` members are *evaluated*.

    * ``purity`` of C: max_G |C ∩ G| / |C| (the share of its dominant group).
      Reported: the member-weighted mean over found clusters,
      sum_C max_G |C ∩ G| / sum_C |C| (``purity``), and the plain mean (``mean_cluster_purity``).
    * ``completeness`` of G: max_C |C ∩ G| / |G| (the largest share of the group in a
      single found cluster; 0 if all its stars are noise).  Reported: mean over
      evaluated groups.
    * G is **recovered** when some found cluster C has |C ∩ G| >= min_purity |C| and
      |C ∩ G| >= min_completeness |G| (defaults 0.5 and 0.5: a cluster at least half
      made of G, holding at least half of G).  ``recovered_fraction`` = recovered
      evaluated groups / evaluated groups.  This follows the matching of Price-Jones &
      Bovy (2019): a found cluster is judged by its dominant input group, by how
      homogeneous it is and how complete it is.
    * ``ari``: adjusted Rand index (noise stars and field stars as singletons).
    """
    labels = np.asarray(labels, dtype=np.int64)
    group = np.asarray(group, dtype=np.int64)
    if labels.shape != group.shape or labels.ndim != 1:
        raise InputError(f"labels {labels.shape} and groups {group.shape} must be 1-D and of equal length")
    if not (0 < min_purity <= 1 and 0 < min_completeness <= 1):
        raise InputError("min_purity and min_completeness must lie in (0, 1]")
    n = labels.size
    truth = _truth_ids(group)
    _, t_inv, t_size = np.unique(truth, return_inverse=True, return_counts=True)
    clustered = labels >= 0
    out = {
        "n_stars": int(n),
        "n_clusters": int(np.unique(labels[clustered]).size),
        "noise_fraction": float(1 - clustered.mean()) if n else 0.0,
        "min_purity": float(min_purity),
        "min_completeness": float(min_completeness),
        "min_group_size": int(min_group_size),
    }
    evaluated = t_size >= min_group_size
    # Field stars are singleton groups that are never evaluated, whatever min_group_size.
    field_t = np.zeros(t_size.size, bool)
    field_t[t_inv[group < 0]] = True
    evaluated &= ~field_t
    out["n_groups"] = int(evaluated.sum())

    if clustered.any():
        c_ids, c_inv, c_size = np.unique(labels[clustered], return_inverse=True, return_counts=True)
        pair = c_inv.astype(np.int64) * t_size.size + t_inv[clustered]
        pairs, counts = np.unique(pair, return_counts=True)
        pc, pt = pairs // t_size.size, pairs % t_size.size
        dominant = np.zeros(c_ids.size, np.int64)
        np.maximum.at(dominant, pc, counts)
        cluster_purity = dominant / c_size
        out["purity"] = float(dominant.sum() / c_size.sum())
        out["mean_cluster_purity"] = float(cluster_purity.mean())
        best_share = np.zeros(t_size.size)
        np.maximum.at(best_share, pt, counts / t_size[pt])
        tol = 1e-9  # so that e.g. 2/3 of 3 members counts as 2
        good = (counts >= min_purity * c_size[pc] - tol) & (counts >= min_completeness * t_size[pt] - tol)
        recovered = np.zeros(t_size.size, bool)
        recovered[pt[good]] = True
    else:
        out["purity"] = float("nan")
        out["mean_cluster_purity"] = float("nan")
        best_share = np.zeros(t_size.size)
        recovered = np.zeros(t_size.size, bool)
    if out["n_groups"]:
        out["completeness"] = float(best_share[evaluated].mean())
        out["n_recovered"] = int((recovered & evaluated).sum())
        out["recovered_fraction"] = out["n_recovered"] / out["n_groups"]
    else:
        out["completeness"] = float("nan")
        out["n_recovered"] = 0
        out["recovered_fraction"] = float("nan")

    found = labels.copy()
    noise = np.flatnonzero(~clustered)
    found[noise] = (labels.max() + 1 if clustered.any() else 0) + np.arange(noise.size)
    out["ari"] = float(adjusted_rand_score(truth, found)) if n else float("nan")
    return out
