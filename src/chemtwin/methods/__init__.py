"""Every way of tagging stars, by name: what ``chemtwin evaluate --method`` and ``chemtwin bench``
run, and the rows of the bench report (``methods.base`` says what a method is).

Adding a method: one class in its own module here (a frozen dataclass subclassing ``Method``,
its options as fields) and one line in ``METHODS``.  A learned metric on other methods' tags:
a ``MetricWrapper`` subclass (``methods.metric_wrapper``), listed wrapped around each base.
The order of ``METHODS`` is the order of the bench's rows and of the report's colours.
"""

from __future__ import annotations

from chemtwin.errors import InputError
from chemtwin.methods.base import INPUTS, Fitted, Inputs, Method, Tags
from chemtwin.methods.cannon import CannonLabels
from chemtwin.methods.cyclestarnet import CycleStarNetLatent, CycleStarNetPayne
from chemtwin.methods.fader import Cae, Fader, TrainedModel
from chemtwin.methods.latents import LatentFileTags
from chemtwin.methods.metric_wrapper import MetricWrapper
from chemtwin.methods.oracle import Oracle
from chemtwin.methods.payne import PayneLabels
from chemtwin.methods.polyres import Polyres
from chemtwin.methods.raw import Raw
from chemtwin.methods.starnet import StarNetLabels
from chemtwin.methods.twin_metric import DecodedTwinMetricOn, TwinMetricOn

__all__ = ["METHODS", "get_method", "Method", "MetricWrapper", "Inputs", "Tags", "Fitted", "INPUTS"]

METHODS: dict[str, Method] = {m.name: m for m in (
    Fader(),
    Cae(),
    Oracle(),
    Polyres(),
    Raw(),
    CannonLabels(),
    PayneLabels(),
    StarNetLabels(),     # not in a bench's default methods (in_default_bench = False)
    TwinMetricOn(Fader()),
    TwinMetricOn(Cae()),
    TwinMetricOn(Polyres()),
    DecodedTwinMetricOn(Fader()),
    DecodedTwinMetricOn(Cae()),
    CycleStarNetPayne(),  # a Cycle-StarNet folder: run only when asked (the bench trains none)
    CycleStarNetLatent(),
    TrainedModel(),      # any model folder (chemtwin evaluate MODEL_DIR DATA.h5)
    LatentFileTags(),    # chemtwin evaluate --latents
)}


def get_method(name: str) -> Method:
    """The registered method ``name``; InputError listing the known ones otherwise."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
