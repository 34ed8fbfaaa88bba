"""The method registry: what every method declares, a learned metric on any method, and a new
method added with one class and one registration line reaching `evaluate` and the bench report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from fake_twins import write_fake

from chemtwin.cli import main
from chemtwin.evaluation.evaluate import evaluate
from chemtwin.methods import INPUTS, METHODS, Fitted, Method, Tags, get_method
from chemtwin.methods.twin_metric import TwinMetricOn


@dataclass(frozen=True)
class BandMeans(Method):
    """A toy method: the mean flux in each of ``bands`` stretches of the spectrum."""

    name: ClassVar[str] = "bands"
    label: ClassVar[str] = "band means (toy)"
    wrappable: ClassVar[bool] = True
    bands: int = 8

    def fit(self, inputs, target=None):
        def tag(ds, evaluated=True):
            b = ds.read()
            good = np.asarray(b.ivar) > 0
            flux = np.where(good, np.asarray(b.flux, np.float64), 0.0)
            edges = np.linspace(0, flux.shape[1], self.bands + 1).astype(int)
            sums = np.add.reduceat(flux, edges[:-1], axis=1)
            counts = np.add.reduceat(good, edges[:-1], axis=1)
            return Tags(sums / np.maximum(counts, 1), extra={"bands": self.bands})

        return Fitted({"path": None, "class": "BandMeans", "bands": self.bands}, tag)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, BandMeans.name, BandMeans())  # the one registration line
    return METHODS[BandMeans.name]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("methods")
    return write_fake(d / "train.h5", 60, seed=1), write_fake(d / "val.h5", 40, seed=2)


def test_every_registered_method_declares_what_it_is():
    for name, method in METHODS.items():
        assert method.name == name and method.label and get_method(name) is method
        assert set(method.needs) <= set(INPUTS) and set(method.uses) <= set(INPUTS)
        assert method.default_metric == ("l2" if method.whitened else "l1")
        assert method.model_kind is None or "model" in method.needs
    wrapped = METHODS["fader_twin"]
    assert wrapped.base is METHODS["fader"] or wrapped.base == METHODS["fader"]
    assert wrapped.label == "fader (chemtwin) + twin metric" and wrapped.result_name == "model"
    assert set(wrapped.needs) == {"model", "train"} and wrapped.model_kind == "fader" and wrapped.whitened


def test_options_reach_only_the_methods_that_have_them():
    polyres = get_method("polyres").with_options(degree=2, holdout_stars=7, jacobian_file="x.h5")
    assert polyres.degree == 2 and not hasattr(polyres, "holdout_stars")
    assert get_method("cannon").with_options(holdout_stars=7).holdout_stars == 7
    assert get_method("fader_twin").with_options(batch_size=5).base.batch_size == 5


def test_a_new_method_is_evaluated_by_name_and_its_ranks_are_its_tags(toy, sets, tmp_path):
    train, val = sets
    out = tmp_path / "toy.json"
    assert main(["-q", "evaluate", str(val), "--method", "bands", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["method"] == "bands" and res["metric"] == "l1" and res["model"]["bands"] == 8
    assert res["bands"] == 8 and res["n_stars"] == 80 and res["mse_swapped"] is None
    direct = evaluate(BandMeans(bands=8), val, progress=False)
    assert {k: direct[k] for k in ("frac_rank0", "median_rank")} == {k: res[k] for k in ("frac_rank0", "median_rank")}
    # a learned metric composes with it: the twin metric of the training set's twins
    white = evaluate(TwinMetricOn(toy), val, train=train, progress=False)
    assert white["metric"] == "l2" and white["twin_metric"]["n_train_groups"] == 60
    assert main(["-q", "evaluate", str(val), "--method", "bands", "--twin-metric", "--json", str(tmp_path / "w.json")]) == 2


def test_a_new_method_gets_a_bench_row_and_a_report_line(toy, tmp_path):
    out = tmp_path / "bench"
    assert main(["-q", "bench", "-o", str(out), "--n-train-pairs", "20", "--n-val-pairs", "20", "--snr", "inf",
                 "--time-limit", "1", "--methods", "raw,bands"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["raw", "bands"] and rows[1]["n_stars"] == 40
    table = (out / "report.md").read_text()
    assert "| band means (toy) | SNR inf |" in table
