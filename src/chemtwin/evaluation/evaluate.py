"""Evaluating one method on one dataset: its tags, ranked for twins, scored.

``evaluate(method, data, **inputs)`` is what ``chemtwin evaluate`` and every bench row run:

1. the dataset must hold twin groups (checked before anything slow);
2. ``method.fit(inputs, data)`` learns what the method needs (``chemtwin.methods.base``);
3. its tags of ``data`` are ranked with ``metric`` (default: the method's) and summarized
   (``chemtwin.evaluation.metrics``); tags conditioned on labels (a model's latents) are
   also measured for how much of those labels they still carry (``condition_r2``).

Returns the JSON-ready result (``metrics.result_dict``), and the ``RankResult`` with
``return_ranks``.

With ``members`` (a ``membership.Membership``, e.g. open-cluster members) the twin groups are
the clusters of the table, matched to the stars by ``star_id`` (the dataset's, or the latent
file's for ``--latents``); the rest are field stars.  The result then holds ``membership`` and
``clusters`` (``membership.cluster_summary``).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from chemtwin.core.ranks import check_metric, require_twins
from chemtwin.data.dataset import dataset_info, open_dataset
from chemtwin.errors import InputError
from chemtwin.evaluation.membership import Membership, cluster_summary
from chemtwin.evaluation.metrics import condition_leakage, evaluate_tags, result_dict
from chemtwin.methods import Inputs, Method, get_method
from chemtwin.search.latents import open_latents

log = logging.getLogger(__name__)


def evaluate(method: Method | str, data=None, *, metric: str | None = None, max_queries: int | None = None,
             device: str = "cpu", return_ranks: bool = False, members: Membership | None = None, **inputs):
    """Evaluate ``method`` (an object or a registered name) on the dataset ``data`` (a path, an
    open dataset, or None for a method that brings its stars, e.g. a latent file).  ``inputs``:
    the ``Inputs`` fields (``train``, ``model``, ``emulator``, ``calibration``, ``latents``,
    ``seed``, ``progress``).  ``max_queries``: rank that many random query stars (seed) against
    all; ``device``: where the ranks are computed; ``members``: the twin groups from a membership
    table (module docstring)."""
    method = get_method(method) if isinstance(method, str) else method
    inputs = Inputs(data=data, **inputs)
    metric = check_metric(metric or method.default_metric)
    opened = data is not None and not hasattr(data, "read")
    ds = open_dataset(data) if opened else data
    try:
        if members is not None:
            return _evaluate_members(method, ds, inputs, members, metric, max_queries, device, return_ranks)
        if ds is not None:
            require_twins(np.asarray(ds.group, np.int64), ds.path)
        fitted = method.fit(inputs, ds)
        tags = fitted.tag(ds)
        group = tags.group if tags.group is not None else np.asarray(ds.group, np.int64)
        summary, ranks = evaluate_tags(tags.values, group, metric, progress=inputs.progress, max_queries=max_queries,
                                       seed=inputs.seed, device=device, return_ranks=True)
        extra = dict(tags.extra)
        if fitted.condition:
            names = list(fitted.condition)
            try:
                extra["condition_r2"] = condition_leakage(tags.values, ds.true_labels(names), names, seed=inputs.seed)
            except InputError as exc:  # a diagnostic beside the ranks: too few stars skip it, not the ranks
                log.warning("condition leakage not measured: %s", exc)
                extra["condition_r2"] = None
        out = result_dict(method.result_name, summary, tags.dataset or dataset_info(ds), fitted.info,
                          tags.mse_reconstruction, tags.mse_swapped, extra)
        return (out, ranks) if return_ranks else out
    finally:
        if opened:
            ds.close()


def _member_groups(star_ids, members: Membership, source) -> np.ndarray:
    if star_ids is None:
        raise InputError(f"{source}: no star_id array to match the membership table {members.path} with")
    group = members.groups(star_ids)
    sizes = np.bincount(group[group >= 0]) if (group >= 0).any() else np.zeros(0, np.int64)
    if not (sizes >= 2).any():
        raise InputError(f"no cluster of the membership table {members.path} has two stars in {source} "
                         f"({int((group >= 0).sum())} member(s) found)")
    return group


def _evaluate_members(method, ds, inputs, members: Membership, metric, max_queries, device, return_ranks):
    """``evaluate`` with the membership table's clusters as the groups."""
    if "latents" in method.needs:  # the latent file's own stars; its groups are not used
        with open_latents(inputs.latents) as lf:
            star_ids, attrs = lf.star_id(), lf.attrs
            group = _member_groups(star_ids, members, inputs.latents)
            values = lf.read()
        info = {"path": attrs.get("model"), "class": "latents", "latents": os.path.abspath(str(inputs.latents))}
        tags_values, extra, mse = values, {}, (None, None)
        ds_info = {"path": attrs.get("data"), "n_stars": int(len(values)), "attrs": {}}
    else:
        if ds is None:
            raise InputError("a membership table needs the dataset (DATA.h5) whose stars it names")
        group = _member_groups(ds.star_id, members, ds.path)
        fitted = method.fit(inputs, ds)
        tags = fitted.tag(ds)
        info, tags_values, extra = fitted.info, tags.values, dict(tags.extra)
        mse = (tags.mse_reconstruction, tags.mse_swapped)
        ds_info = tags.dataset or dataset_info(ds)
    summary, ranks = evaluate_tags(tags_values, group, metric, progress=inputs.progress, max_queries=max_queries,
                                   seed=inputs.seed, device=device, return_ranks=True)
    kept = np.asarray(group)[np.isfinite(np.asarray(tags_values)).all(axis=1)]
    extra["membership"] = {"path": members.path, "cluster_column": members.cluster_column,
                           "n_clusters": len(members.names), "n_members_found": int((group >= 0).sum()),
                           "n_field": int((group < 0).sum())}
    extra["clusters"] = cluster_summary(ranks, kept, members)
    out = result_dict(method.result_name, summary, ds_info, info, mse[0], mse[1], extra)
    return (out, ranks) if return_ranks else out
