"""What a method is: the one protocol behind every row of ``chemtwin evaluate`` and ``chemtwin bench``.

A method turns the stars of a dataset into **tags**, one vector per star, that are ranked for
twins with its default distance (``chemtwin.evaluation.evaluate`` does the ranking and the
scores).  It says what it needs, and the CLI and the bench provide exactly that:

* ``needs``  {input: why} that must be given, ``uses`` those it takes when they are.  The inputs
  (``Inputs``): ``train`` (a labelled training set with twin groups), ``model`` (a trained
  model folder), ``emulator`` (a Payne emulator), ``calibration`` (labelled stars to measure
  errors on), ``latents`` (a latent file).  The stars to tag are ``Inputs.data``.
* ``model_kind``  the model a bench trains for it ("fader", "cae"), with ``needs["model"]``.
* ``whitened``  its tags are whitened by their errors or scatter: ranked with L2, the
  Mahalanobis distance (``default_metric``), also in a bench run with another ``--metric``.
* ``applies_to_mismatch``  False where a bench's observed-like scenario makes it meaningless.
* ``learns_labels``  it learns from the training set's labels beyond TEFF/LOGG (The Cannon,
  StarNet): a bench's survey protocol trains it on pipeline labels, not the truth.
* ``wrappable``  a learned metric (``methods.metric_wrapper``) may be put on its tags.
* ``in_default_bench``  False where a bench runs it only when named (``--methods``): StarNet,
  whose training would make the quick bench slower.

``method.fit(inputs, target)`` learns what it needs (trains a model, loads a folder, fits an
emulator, measures errors) and returns a ``Fitted``: its ``tag(ds)`` gives the ``Tags`` of an
open dataset.  ``target`` is the open dataset that will be tagged (or None), for checks that
should fail before the slow part (its pixels) and settings taken from it (its wavelengths).  Options are the constructor's arguments (a frozen dataclass);
``with_options(**settings)`` takes those of the settings it has, which is how the CLI's flags
and the bench's settings reach every method without knowing which takes what.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np

INPUTS = ("train", "model", "emulator", "calibration", "latents")


@dataclass
class Inputs:
    """Everything a method may be given; ``data`` is the dataset whose stars are tagged and ranked."""

    data: object = None          # path of the dataset to tag (validation or target set)
    train: object = None         # labelled training set with twin groups
    model: object = None         # trained model folder
    emulator: object = None      # Payne emulator: .npz path or a PayneEmulator
    calibration: object = None   # labelled stars to measure a method's errors on
    latents: object = None       # latent file (or folder of latent shards)
    seed: int = 0
    progress: bool = True

    def missing(self, needs) -> list[str]:
        return [name for name in needs if getattr(self, name) is None]


@dataclass
class Tags:
    """The tags of a dataset's stars and what the method measured on the way."""

    values: np.ndarray                    # (N, d); a NaN row: no tag (left out of the ranks)
    mse_reconstruction: float | None = None
    mse_swapped: float | None = None
    extra: dict = field(default_factory=dict)  # result entries of the method (label_fit, oracle, twin_metric, ...)
    group: np.ndarray | None = None       # twin groups, when the tags are not the dataset's rows (a latent file)
    dataset: dict | None = None           # the result's "dataset" entry in that case


@dataclass
class Fitted:
    """A method ready to tag: ``tag(ds, evaluated)`` -> Tags.  ``evaluated`` is False when the
    tags serve to learn something else (a metric wrapper's training set): skip the scores."""

    info: dict                                    # the result's "model" entry
    tag: Callable[..., Tags]
    condition: tuple = ()                         # labels the tags are conditioned on (leakage is measured)
    model: object = None                          # the fitted model, for a metric that learns from it (a ChemTwin)


class Method:
    """Base of every method; subclasses are frozen dataclasses whose fields are their options."""

    name: ClassVar[str]
    label: ClassVar[str]                          # the report's row name
    needs: ClassVar[dict] = {}
    uses: ClassVar[frozenset] = frozenset()
    model_kind: ClassVar[str | None] = None
    whitened: ClassVar[bool] = False
    applies_to_mismatch: ClassVar[bool] = True
    learns_labels: ClassVar[bool] = False
    uses_known_twins: ClassVar[bool] = False      # learns from known twin groups, which a survey does not have
    wrappable: ClassVar[bool] = False
    in_default_bench: ClassVar[bool] = True       # False: a bench runs it only when asked (--methods)
    base: ClassVar[Method | None] = None          # the method a wrapper wraps
    published: ClassVar[dict] = {}                # {snr: [(source, (rank 0, < 0.1% N, < 1% N) in %)]}

    @property
    def default_metric(self) -> str:
        return "l2" if self.whitened else "l1"

    @property
    def result_name(self) -> str:
        """The ``method`` field of its results."""
        return self.name

    def fit(self, inputs: Inputs, target=None) -> Fitted:
        raise NotImplementedError

    def with_options(self, **settings) -> "Method":
        """A copy with those ``settings`` that are options of this method (None: keep the default)."""
        own = {f.name for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else set()
        given = {k: v for k, v in settings.items() if k in own and v is not None}
        return dataclasses.replace(self, **given) if given else self
