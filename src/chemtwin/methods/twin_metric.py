"""The twin metric on a method's tags (``fader_twin``, ``cae_twin``, ``polyres_twin``): whitening
by the scatter between the training set's twins (``chemtwin.search.twin_metric``), then L2, the
Mahalanobis distance of the twin scatter.  Supervision the published methods did not use, so
the bench reports these rows apart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from chemtwin.core.ranks import require_twins
from chemtwin.data.dataset import dataset_info
from chemtwin.methods.metric_wrapper import MetricWrapper
from chemtwin.search.twin_metric import TwinMetric


@dataclass(frozen=True)
class TwinMetricOn(MetricWrapper):
    suffix: ClassVar[str] = "_twin"
    label_suffix: ClassVar[str] = " + twin metric"
    learns_what: ClassVar[str] = "stars in twin groups to learn the metric from"
    entry: ClassVar[str] = "twin_metric"

    def check(self, ds) -> None:
        require_twins(np.asarray(ds.group, np.int64), ds.path)

    def learn(self, tags, ds):
        metric = TwinMetric().fit(tags, np.asarray(ds.group, np.int64))
        return metric.transform, {"train": dataset_info(ds), "n_train_groups": metric.n_groups_}
