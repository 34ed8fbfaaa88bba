"""The whole benchmark protocol in one call: ``run_bench(out_dir, BenchConfig())``.

For every scenario (SNR inf, 100, 50, 30, and "observed-like" spectra made with perturbed
atomic data at one SNR) it generates a training and a validation set of twin pairs,
trains the fader and its no-adversary baseline (``cae``) at that scenario's SNR (as the
2021 paper did), and evaluates every method on the same validation stars with the same
doppelganger ranks:

* ``fader``, ``cae``     latents of the trained models (``chemtwin.tagging``)
* ``oracle``             Cramer-Rao limit from the synthesizer's Jacobian (not for the
                         mismatch scenario: there the true model is, by design, unknown)
* ``polyres``            Price-Jones & Bovy polynomial residuals + PCA
* ``raw``                raw spectra, L1 (a random subset of query stars on big sets)
* ``cannon``, ``payne``  abundances estimated by The Cannon / The Payne, whitened
* ``fader_twin``, ``cae_twin``, ``polyres_twin``
                         the same tags ranked with the twin metric (L2 after whitening by
                         the scatter between the training set's twins): extra supervision
                         the papers did not use, so separate rows

Same seed -> same labels in every scenario, so the oracle's Jacobians are computed once
and rows are comparable across SNRs.  Each step writes its output under ``out_dir`` and
is skipped when that output exists; an interrupted bench resumes where it stopped
(a model half-trained resumes from its checkpoint).  ``write_report`` turns
``results.json`` into ``report.md`` and the figures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from chemtwin.core.files import atomic_output, json_safe, write_json
from chemtwin.core.ranks import check_metric
from chemtwin.errors import InputError

log = logging.getLogger(__name__)

MODELS = ("fader", "cae")
BASELINES = ("oracle", "polyres", "raw", "cannon", "payne")
TWIN_METRIC = ("fader_twin", "cae_twin", "polyres_twin")
ALL_METHODS = MODELS + BASELINES + TWIN_METRIC
RESULT_FIELDS = ("frac_rank0", "frac_rank_lt_0p1pct", "frac_rank_lt_1pct", "median_rank", "mse_reconstruction",
                 "mse_swapped", "n_stars", "n_pairs")


@dataclass
class BenchConfig:
    """Every knob of the benchmark.  Defaults: the paper's protocol; :meth:`quick`: a
    version that finishes in a few minutes on 2 CPU cores."""

    n_train_pairs: int = 25_000
    n_val_pairs: int = 12_500
    snrs: tuple = (math.inf, 100.0, 50.0, 30.0)
    mismatch_snr: float | None = 100.0        # None: no observed-like scenario
    methods: tuple = ALL_METHODS
    time_limit: float = 1800.0                # seconds of training per model and scenario
    preset: str = "fast"
    latent_dim: int = 20
    metric: str = "l1"
    raw_max_queries: int | None = 2000        # raw-spectrum ranks: query stars (None = all)
    payne_train_stars: int = 20_000           # noiseless training spectra for the Payne emulator
    payne_time_limit: float = 600.0           # seconds to train the Payne emulator
    holdout_stars: int = 1000                 # training-set stars fitted to whiten the Cannon's and Payne's abundances
    seed: int = 0
    device: str = "auto"
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides) -> "BenchConfig":
        cfg = dict(n_train_pairs=1000, n_val_pairs=300, time_limit=15.0, raw_max_queries=None,
                   payne_train_stars=2000, payne_time_limit=20.0, holdout_stars=200, quick=True)
        cfg.update(overrides)
        return cls(**cfg)

    def __post_init__(self):
        self.snrs = tuple(float(s) for s in self.snrs)
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise InputError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
        if not self.snrs and self.mismatch_snr is None:
            raise InputError("no scenario: give at least one SNR")
        for s in self.snrs + ((self.mismatch_snr,) if self.mismatch_snr is not None else ()):
            if not s > 0:
                raise InputError(f"SNR must be positive (or inf), got {s}")
        if self.n_train_pairs < 2 or self.n_val_pairs < 2:
            raise InputError("need at least 2 training and 2 validation pairs")
        if not self.time_limit > 0:
            raise InputError(f"time limit must be positive, got {self.time_limit}")
        check_metric(self.metric)

    def trained_models(self) -> list[str]:
        return [m for m in MODELS if m in self.methods or f"{m}_twin" in self.methods]

    def scenarios(self) -> list["Scenario"]:
        out = [Scenario(snr=s, mismatch=False) for s in self.snrs]
        if self.mismatch_snr is not None:
            out.append(Scenario(snr=float(self.mismatch_snr), mismatch=True))
        return out


@dataclass(frozen=True)
class Scenario:
    snr: float
    mismatch: bool

    @property
    def name(self) -> str:
        snr = "inf" if math.isinf(self.snr) else f"{self.snr:g}"
        return f"snr{snr}" + ("_mismatch" if self.mismatch else "")

    @property
    def label(self) -> str:
        snr = "inf" if math.isinf(self.snr) else f"{self.snr:g}"
        return f"SNR {snr}" + (" mismatch" if self.mismatch else "")


@dataclass
class _Paths:
    root: Path
    data: Path = field(init=False)
    models: Path = field(init=False)
    evals: Path = field(init=False)
    figures: Path = field(init=False)

    def __post_init__(self):
        self.data, self.models = self.root / "data", self.root / "models"
        self.evals, self.figures = self.root / "evals", self.root / "figures"

    def dataset(self, kind: str, sc: Scenario) -> Path:
        return self.data / f"{kind}_{sc.name}.h5"

    def model(self, method: str, sc: Scenario) -> Path:
        return self.models / f"{method}_{sc.name}"

    def result(self, method: str, sc: Scenario) -> Path:
        return self.evals / sc.name / f"{method}.json"


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_start": list(os.getloadavg())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _config_record(cfg: BenchConfig) -> dict:
    return json_safe(asdict(cfg))


def _same_run(old: dict, new: dict) -> bool:
    """Same data and models: only the methods may differ (new rows are added, old ones kept)."""
    return {k: v for k, v in old.items() if k != "methods"} == {k: v for k, v in new.items() if k != "methods"}


def _prepare(out: Path, cfg: BenchConfig, overwrite: bool) -> _Paths:
    paths = _Paths(out)
    record = out / "bench_config.json"
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    if record.exists():
        old = json.loads(record.read_text())
        if not _same_run(old, _config_record(cfg)):
            if not overwrite:
                raise InputError(f"{out} holds a bench run with other settings; use another folder or overwrite=True", "overwrite")
            for p in (paths.data, paths.models, paths.evals, paths.figures):
                shutil.rmtree(p, ignore_errors=True)
            for name in ("results.json", "report.md"):
                (out / name).unlink(missing_ok=True)
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} is not empty and holds no bench run; use another folder or overwrite=True", "overwrite")
    for p in (paths.data, paths.models, paths.evals, paths.figures):
        p.mkdir(parents=True, exist_ok=True)
    write_json(record, _config_record(cfg))
    return paths


class _Steps:
    """Numbered log lines and the wall time of every step."""

    def __init__(self, total: int):
        self.total, self.done, self.times = total, 0, {}

    def run(self, name: str, fn, skip: bool = False):
        self.done += 1
        if skip:
            log.info("[%d/%d] %s: done earlier, skipped", self.done, self.total, name)
            return None
        log.info("[%d/%d] %s", self.done, self.total, name)
        t = time.monotonic()
        value = fn()
        self.times[name] = time.monotonic() - t
        return value


def _generate(path: Path, n_pairs: int, seed: int, sc: Scenario, progress: bool) -> None:
    from chemtwin.data.generate import generate_dataset

    generate_dataset(path, n_pairs, group_size=2, snr=sc.snr, seed=seed, mismatch=sc.mismatch, progress=progress)


def _model_done(model_dir: Path) -> bool:
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        return False
    return json.loads(cfg_file.read_text()).get("status") in ("finished", "stopped at the time limit")


def _train(model_dir: Path, train_path: Path, val_path: Path, method: str, cfg: BenchConfig, progress: bool) -> None:
    from chemtwin.data.dataset import open_dataset
    from chemtwin.tagging.fader import FaderConfig
    from chemtwin.tagging.training import train

    resume = (model_dir / "checkpoint.safetensors").is_file()
    fcfg = FaderConfig(model=method, preset=cfg.preset, latent_dim=cfg.latent_dim, epochs=100_000,
                       time_limit=cfg.time_limit, seed=cfg.seed, device=cfg.device)
    with open_dataset(train_path) as tr, open_dataset(val_path) as va:
        train(tr, model_dir, fcfg, val_source=va, resume=resume, overwrite=not resume, progress=progress)


def _save_eval(paths: _Paths, method: str, sc: Scenario, result: dict, ranks, seconds: float) -> None:
    out = paths.result(method, sc)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out.with_suffix(".ranks.npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(ranks.rank, np.int64))
    result = dict(result, eval_s=seconds)
    write_json(out, result)


def _evaluate(method: str, sc: Scenario, paths: _Paths, cfg: BenchConfig, progress: bool):
    from chemtwin.evaluation import metrics

    train, val = paths.dataset("train", sc), paths.dataset("val", sc)
    common = dict(progress=progress, seed=cfg.seed, return_ranks=True)
    if method in MODELS:
        return metrics.evaluate_model(str(paths.model(method, sc)), str(val), cfg.metric, **common)
    if method in ("fader_twin", "cae_twin"):
        # L2 in the whitened space: the Mahalanobis distance, as for the oracle and label baselines
        return metrics.evaluate_model(str(paths.model(_base(method), sc)), str(val), "l2", twin_metric=str(train),
                                      **common)
    if method == "polyres":
        return metrics.evaluate_polyres(str(train), str(val), cfg.metric, **common)
    if method == "polyres_twin":
        return metrics.evaluate_polyres(str(train), str(val), "l2", twin_metric=True, **common)
    if method == "raw":
        return metrics.evaluate_raw(str(val), cfg.metric, max_queries=cfg.raw_max_queries, **common)
    if method == "oracle":
        from chemtwin.evaluation.oracle import evaluate_oracle

        return evaluate_oracle(str(val), jacobian_file=str(paths.data / "val_jacobians.h5"), **common)
    from chemtwin.evaluation import label_baselines

    if method == "cannon":
        return label_baselines.evaluate_cannon(str(train), str(val), holdout_stars=cfg.holdout_stars, **common)
    if method == "payne":
        # Whitened by the fit errors on stars of this scenario's training set: the Payne's
        # real errors (misfit and degeneracies included), as the Cannon's row is.
        return label_baselines.evaluate_payne(str(paths.models / "payne_emulator.npz"), str(val),
                                              calibration=str(train), holdout_stars=cfg.holdout_stars, **common)
    raise InputError(f"unknown method {method!r}")


def _train_payne(paths: _Paths, cfg: BenchConfig, progress: bool) -> None:
    """The Payne's emulator learns the noiseless synthesizer (the 'perfect model'; in the
    mismatch scenario it is then the wrong model, as a grid of synthetic spectra is for
    observed stars)."""
    from chemtwin.data.dataset import open_dataset
    from chemtwin.evaluation.label_baselines import independent_labels
    from chemtwin.tagging.payne_train import train_emulator

    clean = paths.data / "payne_train_snrinf.h5"
    if not clean.exists():
        _generate(clean, (cfg.payne_train_stars + 1) // 2, cfg.seed + 2, Scenario(math.inf, False), progress)
    with open_dataset(clean) as ds:
        # The prior ties VMICRO/VMACRO to LOGG; as free labels they would make the fit degenerate.
        names = independent_labels(ds.label_names, ds.labels())
    emulator, report = train_emulator(clean, labels=names, epochs=None, time_limit=cfg.payne_time_limit,
                                      seed=cfg.seed, max_stars=cfg.payne_train_stars, progress=progress)
    summary = {k: v for k, v in report.as_dict().items() if k != "history"}
    write_json(paths.models / "payne_emulator.json", summary)
    emulator.save(paths.models / "payne_emulator.npz", overwrite=True)


def _base(method: str) -> str:
    return method.removesuffix("_twin")


def _applicable(method: str, sc: Scenario) -> bool:
    return not (method == "oracle" and sc.mismatch)


def run_bench(out_dir, cfg: BenchConfig, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Run (or finish) the benchmark into ``out_dir``; returns the results dict that is also
    written to ``out_dir/results.json`` (and turned into ``report.md`` and figures)."""
    from chemtwin.evaluation.report import write_report

    t_start = time.monotonic()
    out = Path(out_dir)
    paths = _prepare(out, cfg, overwrite)
    scenarios = cfg.scenarios()
    models = cfg.trained_models()
    evals = [(m, sc) for sc in scenarios for m in cfg.methods if _applicable(m, sc)]
    payne = "payne" in cfg.methods
    steps = _Steps(2 * len(scenarios) + len(models) * len(scenarios) + int(payne) + len(evals))
    mach = machine()

    for sc in scenarios:
        for kind, n_pairs, seed in (("train", cfg.n_train_pairs, cfg.seed), ("val", cfg.n_val_pairs, cfg.seed + 1)):
            path = paths.dataset(kind, sc)
            steps.run(f"generate {kind} set, {sc.label}", lambda: _generate(path, n_pairs, seed, sc, progress),
                      skip=path.exists())
    for sc in scenarios:
        for m in models:
            model_dir = paths.model(m, sc)
            steps.run(f"train {m}, {sc.label} ({cfg.time_limit:g} s)",
                      lambda: _train(model_dir, paths.dataset("train", sc), paths.dataset("val", sc), m, cfg, progress),
                      skip=_model_done(model_dir))
    if payne:
        emu = paths.models / "payne_emulator.npz"
        steps.run("train the Payne emulator", lambda: _train_payne(paths, cfg, progress), skip=emu.exists())
    for m, sc in evals:
        res_path = paths.result(m, sc)

        def one():
            t = time.monotonic()
            result, ranks = _evaluate(m, sc, paths, cfg, progress)
            _save_eval(paths, m, sc, result, ranks, time.monotonic() - t)

        steps.run(f"evaluate {m}, {sc.label}", one, skip=res_path.exists())

    results = collect_results(out, cfg, scenarios)
    emulator_report = paths.models / "payne_emulator.json"
    if emulator_report.is_file():
        results["payne_emulator"] = json.loads(emulator_report.read_text())
    results["machine"] = mach
    results["step_seconds"] = steps.times
    results["wall_s_this_run"] = time.monotonic() - t_start
    results["peak_rss_gb_this_run"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    write_json(out / "results.json", results)
    write_report(out, results)
    return results


def collect_results(out_dir, cfg: BenchConfig, scenarios=None) -> dict:
    """The table rows from the per-step JSON files under ``out_dir``."""
    paths = _Paths(Path(out_dir))
    rows = []
    for sc in scenarios or cfg.scenarios():
        for m in cfg.methods:
            f = paths.result(m, sc)
            if not f.is_file():
                continue
            r = json.loads(f.read_text())
            row = {"scenario": sc.name, "label": sc.label, "snr": sc.snr, "mismatch": sc.mismatch, "method": m,
                   "metric": r.get("metric"), "eval_s": r.get("eval_s")}
            row.update({k: r.get(k) for k in RESULT_FIELDS})
            if _base(m) in MODELS:
                meta = json.loads((paths.model(_base(m), sc) / "config.json").read_text())
                final = meta.get("final", {})
                row.update(train_s=final.get("time_s"), train_epochs=final.get("epoch"), train_steps=final.get("step"),
                           train_batch=meta["config"].get("batch_size"))
                if m in MODELS:  # the leakage table reads the model's own latents
                    row["condition_r2"] = r.get("condition_r2")
            rows.append(row)
    return {"config": _config_record(cfg), "rows": rows}
