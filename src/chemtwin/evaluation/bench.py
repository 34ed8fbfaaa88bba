"""The whole benchmark protocol in one call: ``run_bench(out_dir, BenchConfig())``.

For every scenario (SNR inf, 100, 50, 30) it generates a training and a validation set of
twin pairs with the embedded synthesizer (the calibrated line list), trains the fader and its
no-adversary baseline (``cae``) at that scenario's SNR (as the 2021 paper did), and evaluates
every method on the same validation stars with the same doppelganger ranks.

Two protocols (``BenchConfig.protocol``) decide what the methods are given:

* ``"survey"`` (the default headline): only what a survey has.  TEFF/LOGG carry pipeline-like
  errors (``chemtwin.data.label_errors``) wherever a method reads them: the conditioning of the
  fader, cae and polyres, The Cannon's labels.  The model-based methods' model is another
  "code" than the one that made the spectra, at every SNR: the synthesizer with other atomic
  data (log gf off by 0.1 dex per line, 10 % of the lines missing: ``generate --mismatch``).
  The Payne fits with an emulator of that code, and The Cannon (and StarNet) train on labels
  that code's Payne fitted to the training spectra (``pipeline`` sets), as survey labels are.
  Only the scores and the oracle read the truth (``true_labels``).  Why not the drawn line list
  as that code: docs/benchmarks.md ("Survey protocol").
* ``"paper"``: the 2021 paper's information: exact TEFF/LOGG, The Cannon on the true labels,
  The Payne with an emulator of the code that made the spectra, and one "observed-like"
  scenario (``mismatch_snr``): spectra made with perturbed atomic data, where the Payne's
  emulator is then the wrong model.

* ``fader``, ``cae``     latents of the trained models (``chemtwin.tagging``)
* ``oracle``             Cramer-Rao limit from the synthesizer's Jacobian at the true labels, for a
                         method given TEFF/LOGG as the protocol gives them (not for the paper's
                         mismatch scenario, whose spectra its model did not make)
* ``polyres``            Price-Jones & Bovy polynomial residuals + PCA
* ``raw``                raw spectra, L1 (a random subset of query stars on big sets)
* ``cannon``, ``payne``  abundances estimated by The Cannon / The Payne, whitened
* ``fader_twin``, ``cae_twin``, ``polyres_twin``
                         the same tags ranked with the twin metric (L2 after whitening by
                         the scatter between the training set's twins): extra supervision
                         the papers did not use, so separate rows
* ``fader_decoded``, ``cae_decoded``
                         the latents ranked in the decoded-twin metric (L2 after whitening by the
                         scatter between the model's own decoder-made twins): twin-free

The methods are the registry's (``chemtwin.methods.METHODS``): by default every method
whose inputs a bench can provide, each given what it declares it needs (the training set, a
model of its kind that the bench trains, the Payne emulator the bench trains).

Same seed -> same labels in every scenario, so the oracle's Jacobians are computed once
and rows are comparable across SNRs.  Each step writes its output under ``out_dir`` (the
layout: ``chemtwin.evaluation.bench_folder``) and is skipped when that output exists (an
evaluation: when it was made with the same method settings, ``settings_record``); an
interrupted bench resumes where it stopped (a model half-trained resumes from its
checkpoint).  ``write_report`` turns ``results.json`` into ``report.md`` and the figures.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path


from chemtwin.core.files import check_free_space, json_safe, write_json
from chemtwin.core.ranks import check_metric
from chemtwin.data.augment import check_snr
from chemtwin.data.dataset import open_dataset
from chemtwin.data.generate import generate_dataset
from chemtwin.data.label_errors import LabelErrors
from chemtwin.errors import InputError
from chemtwin.evaluation.bench_folder import BenchFolder
from chemtwin.evaluation.evaluate import evaluate
from chemtwin.evaluation.report import write_report
from chemtwin.evaluation.summary import machine_record, software_record
from chemtwin.methods import METHODS, Method, get_method
from chemtwin.evaluation.pipeline_labels import write_pipeline_labels
from chemtwin.methods.label_fit import independent_labels
from chemtwin.tagging.fader_config import MODEL_KINDS, FaderConfig
from chemtwin.tagging.model_folder import model_status, read_model_dir
from chemtwin.tagging.payne_train import train_emulator
from chemtwin.tagging.training import train

log = logging.getLogger(__name__)

PROVIDED = {"train", "model", "emulator"}  # the inputs a bench gives the methods it runs
PROTOCOLS = ("survey", "paper")
RESULT_FIELDS = ("frac_rank0", "frac_rank_lt_0p1pct", "frac_rank_lt_1pct", "median_rank", "mse_reconstruction",
                 "mse_swapped", "n_stars", "n_pairs")


def runnable(method: Method) -> bool:
    """A bench can run ``method``: it provides every input it needs (a model only of a kind it trains)."""
    return set(method.needs) <= PROVIDED and ("model" not in method.needs or method.model_kind in MODEL_KINDS)


def bench_methods() -> tuple[str, ...]:
    """The methods a bench runs by default: every registered one it can provide for and that does
    not ask to run only when named (``Method.in_default_bench``), in registry order."""
    return tuple(name for name, m in METHODS.items() if runnable(m) and m.in_default_bench)


def on_request_methods() -> tuple[str, ...]:
    """The methods a bench runs only when ``methods`` names them (StarNet)."""
    return tuple(name for name, m in METHODS.items() if runnable(m) and not m.in_default_bench)


@dataclass
class BenchConfig:
    """Every knob of the benchmark.  Defaults: the paper's sizes; :meth:`quick_config`: a
    version that finishes in a few minutes on 2 CPU cores."""

    protocol: str = "survey"                  # "survey" or "paper" (module docstring)
    label_errors: LabelErrors = field(default_factory=LabelErrors)  # survey protocol: TEFF/LOGG errors
    n_train_pairs: int = 25_000
    n_val_pairs: int = 12_500
    snrs: tuple = (math.inf, 100.0, 50.0, 30.0)
    mismatch_snr: float | None = 100.0        # paper protocol: the observed-like scenario's SNR (None: none);
                                              # the survey protocol sets it to None
    pipeline_label_stars: int = 6000          # survey protocol: training stars the pipeline labels (Cannon, StarNet)
    methods: tuple | None = None              # None: bench_methods()
    time_limit: float = 1800.0                # seconds of training per model and scenario
    preset: str = "fast"
    latent_dim: int = 20
    metric: str = "l1"                        # the distance of tags that are not whitened
    raw_max_queries: int | None = 2000        # raw-spectrum ranks: query stars (None = all)
    payne_train_stars: int = 20_000           # noiseless training spectra for the Payne emulator
    payne_time_limit: float = 600.0           # seconds to train the Payne emulator
    holdout_stars: int = 1000                 # training-set stars fitted to whiten the Cannon's and Payne's abundances
    seed: int = 0
    device: str = "auto"
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides) -> BenchConfig:
        cfg = dict(n_train_pairs=1000, n_val_pairs=300, time_limit=15.0, raw_max_queries=None,
                   payne_train_stars=2000, payne_time_limit=20.0, holdout_stars=200, pipeline_label_stars=1000,
                   quick=True)
        cfg.update(overrides)
        return cls(**cfg)

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise InputError(f"unknown protocol {self.protocol!r}; choose from {', '.join(PROTOCOLS)}", "protocol")
        if isinstance(self.label_errors, dict):  # from a bench_config.json
            self.label_errors = LabelErrors(**self.label_errors)
        if self.protocol == "survey":
            self.mismatch_snr = None  # every survey scenario already gives the model-based methods the wrong model
        if self.pipeline_label_stars < 10:
            raise InputError(f"pipeline_label_stars must be at least 10, got {self.pipeline_label_stars}")
        self.snrs = tuple(float(s) for s in self.snrs)
        self.methods = bench_methods() if self.methods is None else tuple(self.methods)
        unknown = [m for m in self.methods if m not in METHODS or not runnable(METHODS[m])]
        if unknown:
            raise InputError(f"unknown method(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(bench_methods() + on_request_methods())}")
        if not self.snrs and self.mismatch_snr is None:
            raise InputError("no scenario: give at least one SNR")
        check_snr(self.snrs + ((self.mismatch_snr,) if self.mismatch_snr is not None else ()), allow_inf=True)
        if self.n_train_pairs < 2 or self.n_val_pairs < 2:
            raise InputError("need at least 2 training and 2 validation pairs")
        if not self.time_limit > 0:
            raise InputError(f"time limit must be positive, got {self.time_limit}")
        check_metric(self.metric)

    def trained_models(self) -> list[str]:
        """The model kinds the methods need trained, in the order of ``MODEL_KINDS``."""
        kinds = {get_method(m).model_kind for m in self.methods}
        return [k for k in MODEL_KINDS if k in kinds]

    def needs_emulator(self) -> bool:
        return any("emulator" in set(get_method(m).needs) | get_method(m).uses for m in self.methods)

    @property
    def survey(self) -> bool:
        return self.protocol == "survey"

    def needs_pipeline_labels(self) -> bool:
        return self.survey and any(get_method(m).learns_labels for m in self.methods)

    def scenarios(self) -> list[Scenario]:
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


def _config_record(cfg: BenchConfig) -> dict:
    return json_safe(asdict(cfg))


def _same_run(old: dict, new: dict) -> bool:
    """Same data and models: only the methods may differ (new rows are added, old ones kept)."""
    return {k: v for k, v in old.items() if k != "methods"} == {k: v for k, v in new.items() if k != "methods"}


def _prepare(out: Path, cfg: BenchConfig, overwrite: bool) -> BenchFolder:
    folder = BenchFolder(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    check_free_space(folder.results, what="a bench run")
    old = folder.read_config()
    if old is not None:
        if not _same_run(old, _config_record(cfg)):
            if not overwrite:
                raise InputError(f"{out} holds a bench run with other settings; use another folder or overwrite=True",
                                 "overwrite")
            folder.clear()
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} is not empty and holds no bench run; use another folder or overwrite=True", "overwrite")
    folder.make()
    folder.write_config(_config_record(cfg))
    return folder


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


def _generate(path: Path, n_pairs: int, seed: int, sc: Scenario, progress: bool, label_errors=None) -> None:
    generate_dataset(path, n_pairs, group_size=2, snr=sc.snr, seed=seed, mismatch=sc.mismatch, progress=progress,
                     label_errors=label_errors)


def _model_done(model_dir: Path) -> bool:
    status = model_status(model_dir)
    return status is not None and status.done


def _train(model_dir: Path, train_path: Path, val_path: Path, kind: str, cfg: BenchConfig, progress: bool) -> None:
    resume = (model_dir / "checkpoint.safetensors").is_file()
    fcfg = FaderConfig(model=kind, preset=cfg.preset, latent_dim=cfg.latent_dim, epochs=100_000,
                       time_limit=cfg.time_limit, seed=cfg.seed, device=cfg.device)
    with open_dataset(train_path) as tr, open_dataset(val_path) as va:
        train(tr, model_dir, fcfg, val_source=va, resume=resume, overwrite=not resume, progress=progress)


def _configured(name: str, folder: BenchFolder, cfg: BenchConfig) -> Method:
    """The method with the options this bench gives it."""
    # what a survey quotes of its TEFF/LOGG errors reaches the methods that can use it (the decoded-twin metric)
    quoted = tuple(cfg.label_errors.quoted().items()) if cfg.survey else None
    # the oracle's bound is for a method given what the protocol gives every method: TEFF/LOGG with
    # the quoted errors (survey) or exactly (paper), not the spectrum alone
    given = quoted if cfg.survey else (("TEFF", 0.0), ("LOGG", 0.0))
    return get_method(name).with_options(holdout_stars=cfg.holdout_stars, jacobian_file=str(folder.jacobians),
                                         label_errors=quoted, given_labels=given)


# Options that say where or how fast a method runs, not what it computes.
RUN_ONLY_OPTIONS = {"jacobian_file", "jacobian_batch", "threads", "n_jobs", "batch_size", "device"}


def settings_record(method: Method) -> dict:
    """A method's options as a result records them: a stored row is reused only when they match
    (a row computed with other settings, e.g. by an older chemtwin, is evaluated again)."""
    def keep(d):
        return {k: keep(v) if isinstance(v, dict) else v for k, v in d.items() if k not in RUN_ONLY_OPTIONS}
    return keep(json_safe(asdict(method))) if is_dataclass(method) else {}


def _current(name: str, sc: Scenario, folder: BenchFolder, cfg: BenchConfig) -> bool:
    old = folder.read_result(name, sc.name)
    return old is not None and old.get("settings") == settings_record(_configured(name, folder, cfg))


def _evaluate(name: str, sc: Scenario, folder: BenchFolder, cfg: BenchConfig, progress: bool):
    """(result, ranks) of one method on the scenario's validation set, given what it needs."""
    method = _configured(name, folder, cfg)
    labelled = "pipeline" if cfg.survey and method.learns_labels else "train"
    inputs = {"train": str(folder.dataset(labelled, sc.name)), "seed": cfg.seed, "progress": progress}
    if method.model_kind is not None:
        inputs["model"] = str(folder.model(method.model_kind, sc.name))
    if "emulator" in set(method.needs) | method.uses:
        # Whitened by the fit errors on stars of this scenario's training set: the Payne's
        # real errors (misfit and degeneracies included), as the Cannon's row is.
        inputs["emulator"] = str(folder.emulator)
    # whitened tags are ranked with L2 (their Mahalanobis distance); the others with the bench's metric
    metric = method.default_metric if method.whitened else cfg.metric
    max_queries = cfg.raw_max_queries if name == "raw" else None  # P-dimensional tags: a subset of queries
    result, ranks = evaluate(method, str(folder.dataset("val", sc.name)), metric=metric, max_queries=max_queries,
                             return_ranks=True, **inputs)
    return dict(result, settings=settings_record(method)), ranks


def _train_payne(folder: BenchFolder, cfg: BenchConfig, progress: bool) -> None:
    """The Payne's emulator learns noiseless spectra of its code: in the paper protocol the
    synthesizer that made the data (the 'perfect model'; in the mismatch scenario it is then the
    wrong model), in the survey protocol the synthesizer with other atomic data (the perturbed
    line list of ``generate --mismatch``): a pipeline's model is never the sky's."""
    clean = folder.emulator_data
    if not clean.exists():
        _generate(clean, (cfg.payne_train_stars + 1) // 2, cfg.seed + 2, Scenario(math.inf, cfg.survey), progress)
    with open_dataset(clean) as ds:
        # The prior ties VMICRO/VMACRO to LOGG; as free labels they would make the fit degenerate.
        names = independent_labels(ds.label_names, ds.labels())
    emulator, report = train_emulator(clean, labels=names, epochs=None, time_limit=cfg.payne_time_limit,
                                      seed=cfg.seed, max_stars=cfg.payne_train_stars, progress=progress)
    summary = {k: v for k, v in report.as_dict().items() if k != "history"}
    write_json(folder.emulator_summary, summary)
    emulator.save(folder.emulator, overwrite=True)


def run_bench(out_dir, cfg: BenchConfig, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Run (or finish) the benchmark into ``out_dir``; returns the results dict that is also
    written to ``out_dir/results.json`` (and turned into ``report.md`` and figures)."""
    t_start = time.monotonic()
    out = Path(out_dir)
    folder = _prepare(out, cfg, overwrite)
    scenarios = cfg.scenarios()
    models = cfg.trained_models()
    evals = [(m, sc) for sc in scenarios for m in cfg.methods if get_method(m).applies_to_mismatch or not sc.mismatch]
    payne = cfg.needs_emulator() or cfg.needs_pipeline_labels()
    pipeline = scenarios if cfg.needs_pipeline_labels() else []
    steps = _Steps(2 * len(scenarios) + len(models) * len(scenarios) + int(payne) + len(pipeline) + len(evals))
    mach = machine_record()
    errors = cfg.label_errors if cfg.survey else None

    for sc in scenarios:
        for kind, n_pairs, seed in (("train", cfg.n_train_pairs, cfg.seed), ("val", cfg.n_val_pairs, cfg.seed + 1)):
            path = folder.dataset(kind, sc.name)
            steps.run(f"generate {kind} set, {sc.label}", lambda: _generate(path, n_pairs, seed, sc, progress, errors),
                      skip=path.exists())
    for sc in scenarios:
        for m in models:
            model_dir = folder.model(m, sc.name)
            train_set, val_set = folder.dataset("train", sc.name), folder.dataset("val", sc.name)
            steps.run(f"train {m}, {sc.label} ({cfg.time_limit:g} s)",
                      lambda: _train(model_dir, train_set, val_set, m, cfg, progress), skip=_model_done(model_dir))
    if payne:
        steps.run("train the Payne emulator", lambda: _train_payne(folder, cfg, progress),
                  skip=folder.emulator.exists())
    for sc in pipeline:
        path = folder.dataset("pipeline", sc.name)
        steps.run(f"pipeline labels of the training set, {sc.label}",
                  lambda: write_pipeline_labels(folder.dataset("train", sc.name), folder.emulator, path,
                                                cfg.pipeline_label_stars, seed=cfg.seed, progress=progress),
                  skip=path.exists())
    for m, sc in evals:
        def one():
            t = time.monotonic()
            result, ranks = _evaluate(m, sc, folder, cfg, progress)
            folder.write_result(m, sc.name, dict(result, eval_s=time.monotonic() - t), ranks.rank)

        steps.run(f"evaluate {m}, {sc.label}", one, skip=_current(m, sc, folder, cfg))

    results = collect_results(out, cfg, scenarios)
    emulator = folder.read_emulator_summary()
    if emulator is not None:
        results["payne_emulator"] = emulator
    results["machine"] = mach
    results["software"] = software_record()  # chemtwin version, git commit, date
    results["step_seconds"] = steps.times
    results["wall_s_this_run"] = time.monotonic() - t_start
    results["peak_rss_gb_this_run"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    write_json(folder.results, results)
    write_report(out, results)
    return results


def collect_results(out_dir, cfg: BenchConfig, scenarios=None) -> dict:
    """The table rows from the per-step JSON files under ``out_dir``."""
    folder = BenchFolder(out_dir)
    rows = []
    for sc in scenarios or cfg.scenarios():
        for m in cfg.methods:
            r = folder.read_result(m, sc.name)
            if r is None:
                continue
            method = get_method(m)
            row = {"scenario": sc.name, "label": sc.label, "snr": sc.snr, "mismatch": sc.mismatch, "method": m,
                   "metric": r.get("metric"), "eval_s": r.get("eval_s")}
            row.update({k: r.get(k) for k in RESULT_FIELDS})
            if method.model_kind is not None:
                meta = read_model_dir(folder.model(method.model_kind, sc.name))
                final = meta.get("final", {})
                row.update(train_s=final.get("time_s"), train_epochs=final.get("epoch"), train_steps=final.get("step"),
                           train_batch=meta["config"].get("batch_size"))
                if method.base is None:  # the leakage table reads the model's own latents
                    row["condition_r2"] = r.get("condition_r2")
            if "given_labels" in r.get("model", {}):  # what the oracle's bound assumes a method is given
                row["given_labels"] = r["model"]["given_labels"]
            rows.append(row)
    return {"config": _config_record(cfg), "rows": rows}
