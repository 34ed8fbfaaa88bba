"""Evaluating one method on one dataset: its tags, ranked for twins, scored.

``evaluate(method, data, **inputs)`` is what ``chemtwin evaluate`` and every bench row run:

1. the dataset must hold twin groups (checked before anything slow);
2. ``method.fit(inputs, data)`` learns what the method needs (``chemtwin.methods.base``);
3. its tags of ``data`` are ranked with ``metric`` (default: the method's) and summarized
   (``chemtwin.evaluation.metrics``); tags conditioned on labels (a model's latents) are
   also measured for how much of those labels they still carry (``condition_r2``).

Returns the JSON-ready result (``metrics.result_dict``), and the ``RankResult`` with
``return_ranks``.
"""

from __future__ import annotations

import logging

import numpy as np

from chemtwin.core.ranks import check_metric, require_twins
from chemtwin.data.dataset import dataset_info, open_dataset
from chemtwin.errors import InputError
from chemtwin.evaluation.metrics import condition_leakage, evaluate_tags, result_dict
from chemtwin.methods import Inputs, Method, get_method

log = logging.getLogger(__name__)


def evaluate(method: Method | str, data=None, *, metric: str | None = None, max_queries: int | None = None,
             device: str = "cpu", return_ranks: bool = False, **inputs):
    """Evaluate ``method`` (an object or a registered name) on the dataset ``data`` (a path, an
    open dataset, or None for a method that brings its stars, e.g. a latent file).  ``inputs``:
    the ``Inputs`` fields (``train``, ``model``, ``emulator``, ``calibration``, ``latents``,
    ``seed``, ``progress``).  ``max_queries``: rank that many random query stars (seed) against
    all; ``device``: where the ranks are computed."""
    method = get_method(method) if isinstance(method, str) else method
    inputs = Inputs(data=data, **inputs)
    metric = check_metric(metric or method.default_metric)
    opened = data is not None and not hasattr(data, "read")
    ds = open_dataset(data) if opened else data
    try:
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
                extra["condition_r2"] = condition_leakage(tags.values, ds.labels(names), names, seed=inputs.seed)
            except InputError as exc:  # a diagnostic beside the ranks: too few stars skip it, not the ranks
                log.warning("condition leakage not measured: %s", exc)
                extra["condition_r2"] = None
        out = result_dict(method.result_name, summary, tags.dataset or dataset_info(ds), fitted.info,
                          tags.mse_reconstruction, tags.mse_swapped, extra)
        return (out, ranks) if return_ranks else out
    finally:
        if opened:
            ds.close()
