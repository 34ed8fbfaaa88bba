"""Twin metrics on a method's tags (``chemtwin.search.twin_metric``), then L2, the Mahalanobis
distance of the twin scatter.

* ``fader_twin``, ``cae_twin``, ``polyres_twin``: the scatter between the training set's known
  twins.  Supervision the published methods did not use and a survey does not have, so the bench
  reports these rows apart.
* ``fader_decoded``, ``cae_decoded``: the scatter between the model's own decoder-made twins of
  the training set's stars (no group read): twin-free, fit for a default pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from chemtwin.core.ranks import require_twins
from chemtwin.data.dataset import dataset_info
from chemtwin.methods.metric_wrapper import MetricWrapper
from chemtwin.search.twin_metric import DecodedTwinMetric, TwinMetric


@dataclass(frozen=True)
class TwinMetricOn(MetricWrapper):
    suffix: ClassVar[str] = "_twin"
    label_suffix: ClassVar[str] = " + twin metric"
    learns_what: ClassVar[str] = "stars in twin groups to learn the metric from"
    uses_known_twins: ClassVar[bool] = True
    entry: ClassVar[str] = "twin_metric"

    def check(self, ds) -> None:
        require_twins(np.asarray(ds.group, np.int64), ds.path)

    def learn(self, tags, ds, fitted):
        metric = TwinMetric().fit(tags, np.asarray(ds.group, np.int64))
        return metric.transform, {"train": dataset_info(ds), "n_train_groups": metric.n_groups_}


@dataclass(frozen=True)
class DecodedTwinMetricOn(MetricWrapper):
    suffix: ClassVar[str] = "_decoded"
    label_suffix: ClassVar[str] = " + decoded-twin metric"
    learns_what: ClassVar[str] = "unlabelled stars whose decoder-made twins teach the metric"
    entry: ClassVar[str] = "decoded_twin_metric"
    n_pairs: int = 5000
    seed: int = 0
    label_errors: tuple = ()   # ((label, 1-sigma), ...): the errors the survey quotes with TEFF/LOGG

    def learn(self, tags, ds, fitted):
        metric = DecodedTwinMetric(self.n_pairs, self.seed, dict(self.label_errors)).fit_dataset(fitted.model, ds)
        return metric.transform, {"train": dataset_info(ds), "n_pairs": metric.n_pairs_,
                                  "label_errors": metric.label_errors}
