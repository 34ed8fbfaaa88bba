"""The bench folder (``chemtwin bench OUT_DIR``): where every file of a bench run lives.

Layout (``LAYOUT_VERSION`` 1; docs/benchmarks.md), scenarios named ``snrinf``, ``snr100``,
``snr100_mismatch``, ...:

* ``bench_config.json``                  the run's settings (``BenchConfig``); a rerun with the
                                         same settings resumes, other methods add rows
* ``data/{train,val}_{scenario}.h5``     the twin sets (chemtwin datasets)
* ``data/pipeline_{scenario}.h5``         survey protocol: training stars with pipeline labels
* ``data/payne_train_snrinf.h5``         the noiseless set the Payne's emulator learns from (survey
                                         protocol: made with the other line list)
* ``data/val_jacobians.h5``              the oracle's cache of Fisher matrices (all scenarios)
* ``models/{kind}_{scenario}/``          trained model folders (``chemtwin.tagging.model_folder``)
* ``models/payne_emulator.npz`` + ``.json``  the emulator and its training summary
* ``evals/{scenario}/{method}.json``     one evaluation result (``chemtwin evaluate``'s layout)
  and ``{method}.ranks.npy`` (int64, the rank of every twin pair)
* ``results.json``, ``report.md``, ``figures/*.png``

This module is the only one that knows these names: the bench writes through it and the
report reads through it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chemtwin.core.files import atomic_output, write_json

LAYOUT_VERSION = 1
CONFIG, RESULTS, REPORT = "bench_config.json", "results.json", "report.md"


@dataclass(frozen=True)
class BenchFolder:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def evals(self) -> Path:
        return self.root / "evals"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def report(self) -> Path:
        return self.root / REPORT

    def dataset(self, kind: str, scenario: str) -> Path:
        """``kind``: "train", "val" or "pipeline" (survey protocol: training stars with pipeline labels)."""
        return self.data / f"{kind}_{scenario}.h5"

    @property
    def emulator_data(self) -> Path:
        return self.data / "payne_train_snrinf.h5"

    @property
    def jacobians(self) -> Path:
        return self.data / "val_jacobians.h5"

    def model(self, kind: str, scenario: str) -> Path:
        return self.models / f"{kind}_{scenario}"

    @property
    def emulator(self) -> Path:
        return self.models / "payne_emulator.npz"

    @property
    def emulator_summary(self) -> Path:
        return self.models / "payne_emulator.json"

    def result(self, method: str, scenario: str) -> Path:
        return self.evals / scenario / f"{method}.json"

    def ranks(self, method: str, scenario: str) -> Path:
        return self.evals / scenario / f"{method}.ranks.npy"

    # ------------------------------------------------------------------ reading and writing
    def make(self) -> None:
        for p in (self.data, self.models, self.evals, self.figures):
            p.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        """Delete everything a run wrote (not the settings record)."""
        for p in (self.data, self.models, self.evals, self.figures):
            shutil.rmtree(p, ignore_errors=True)
        for p in (self.results, self.report):
            p.unlink(missing_ok=True)

    def read_config(self) -> dict | None:
        return json.loads(self.config.read_text()) if self.config.exists() else None

    def write_config(self, record: dict) -> None:
        write_json(self.config, record)

    def write_result(self, method: str, scenario: str, result: dict, ranks: np.ndarray) -> None:
        """An evaluation's result and ranks (ranks first: a result file means both are complete)."""
        out = self.result(method, scenario)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.ranks(method, scenario)) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(ranks, np.int64))
        write_json(out, result)

    def read_result(self, method: str, scenario: str) -> dict | None:
        f = self.result(method, scenario)
        return json.loads(f.read_text()) if f.is_file() else None

    def read_ranks(self, method: str, scenario: str) -> np.ndarray | None:
        f = self.ranks(method, scenario)
        return np.load(f, allow_pickle=False) if f.is_file() else None

    def read_emulator_summary(self) -> dict | None:
        f = self.emulator_summary
        return json.loads(f.read_text()) if f.is_file() else None
