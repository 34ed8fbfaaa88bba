"""A learned metric on any method's tags: the base method's tags, transformed by a metric learned
from the tags of a set of stars, ranked with L2.

A wrapper is itself a method (``name`` = base's + ``suffix``, ``label`` = base's + ``label_suffix``):
it needs what its base needs plus the set it learns from (``learns_from``: an ``Inputs`` field),
tags that set with the base method, and learns its transform there (``learn``).  The supervised
twin metric (``methods.twin_metric``) learns from known twin groups; a metric that learns from
unlabelled stars is the same class with another ``learn``.  The model's own scores (spectral
errors) stay those of the base; only the ranked tags change.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, ClassVar

import numpy as np

from chemtwin.data.dataset import open_dataset
from chemtwin.errors import InputError
from chemtwin.methods.base import Fitted, Inputs, Method, Tags


@dataclass(frozen=True)
class MetricWrapper(Method):
    base: Method
    suffix: ClassVar[str]
    label_suffix: ClassVar[str]
    learns_from: ClassVar[str] = "train"
    learns_what: ClassVar[str]            # why it needs the ``learns_from`` input (CLI messages)
    entry: ClassVar[str]                  # the result's key for ``learn``'s description of the metric
    whitened: ClassVar[bool] = True

    def __post_init__(self):
        if not self.base.wrappable:
            raise InputError(f"{self.base.name} tags cannot take a learned metric")

    @property
    def name(self) -> str:
        return self.base.name + self.suffix

    @property
    def label(self) -> str:
        return self.base.label + self.label_suffix

    @property
    def needs(self) -> dict:
        return {**self.base.needs, self.learns_from: self.learns_what}

    @property
    def uses(self) -> frozenset:
        return self.base.uses

    @property
    def model_kind(self) -> str | None:
        return self.base.model_kind

    @property
    def applies_to_mismatch(self) -> bool:
        return self.base.applies_to_mismatch

    @property
    def result_name(self) -> str:
        return self.base.result_name

    def with_options(self, **settings) -> "MetricWrapper":
        """The wrapper's own options from ``settings``, and the base's."""
        own = {f.name for f in fields(self)} - {"base"}
        given = {k: v for k, v in settings.items() if k in own and v is not None}
        return replace(self, base=self.base.with_options(**settings), **given)

    def check(self, ds) -> None:
        """Fail before the slow passes when ``ds`` (the learning set) cannot teach the metric."""

    def learn(self, tags: np.ndarray, ds, fitted: Fitted) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
        """(transform of tags, the result's entry describing it) learned from the base's ``tags``
        of the stars of ``ds`` (``fitted``: the base, fitted)."""
        raise NotImplementedError

    def fit(self, inputs: Inputs, target=None) -> Fitted:
        source = getattr(inputs, self.learns_from)
        if source is None:
            raise InputError(f"{self.name} needs {self.learns_from}=... ({self.learns_what})", self.learns_from)
        with open_dataset(source) as ds:
            self.check(ds)
            fitted = self.base.fit(inputs, target)
            transform, entry = self.learn(fitted.tag(ds, evaluated=False).values, ds, fitted)

        def tag(ds, evaluated: bool = True) -> Tags:
            tags = fitted.tag(ds, evaluated)
            return replace(tags, values=transform(tags.values), extra={**tags.extra, self.entry: entry})

        return Fitted(fitted.info, tag, fitted.condition)
