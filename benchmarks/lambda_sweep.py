"""The adversary's weight lambda, chosen without twins (issue 18): a sweep and what picks what.

    python benchmarks/lambda_sweep.py --work /tmp/lam --json /tmp/lam/results.json
    python benchmarks/lambda_sweep.py --quick --work /tmp/lam_quick                # minutes

For each lambda a fast-preset fader trains ``--seconds`` on ``--pairs`` training pairs at
``--snr`` (same data, seed and time for all) and is scored on the validation pairs.  Twin
scores (rank 0 with L1 and in the decoded-twin metric) say which lambda is best; the
twin-free quantities say which lambda a survey would pick:

* ``condition_leak`` (the pick): the mean of the R^2 with which a small MLP recovers TEFF and
  LOGG from z (``evaluate``'s ``condition_r2``, 3-fold cross-validated on up to 3,000 validation
  stars).  The adversary's job is to remove exactly that; too small a lambda leaves the labels
  in z, and past the best one they came back in our sweep (docs/model.md).  It reads
  latents and TEFF/LOGG only.  The sweep picks the lambda of least leak: the twin-best one
  at SNR 100, not at SNR inf, where the leak is flat (docs/model.md).
* ``chemical_information_nats`` (reported, not a pick: it prefers lambda = 0): 0.5 log det of
  the covariance of the latents, after what TEFF/LOGG predict of them is removed (a cubic
  polynomial fit), over the within-twin scatter of the decoder-made twins
  (``DecodedTwinMetric``, learned on the training spectra): the information a Gaussian channel
  carries about what varies between stars besides TEFF/LOGG, in units of how precisely one
  star's latent is known.  It reads spectra and TEFF/LOGG only.  It is fooled where the
  decoder ignores its TEFF/LOGG input and reads them from z: the decoder-made twins are then
  identical and the within-twin scatter looks small.
* the reconstruction MSE, reported beside them.

Every lambda's row is written to the JSON as it finishes; a rerun reuses trained models.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from _common import add_training_run_arguments, log, machine, write_results
from train_protocol import _generate, _train, evaluate_model


def _label_trend(cond: np.ndarray, degree: int = 3) -> np.ndarray:
    """Design matrix of all monomials of the standardised labels up to ``degree``."""
    u = (cond - cond.mean(axis=0)) / cond.std(axis=0)
    columns = [np.ones(len(u))]
    for total in range(1, degree + 1):
        for a in range(total + 1):
            columns.append(u[:, 0] ** a * u[:, 1] ** (total - a))
    return np.column_stack(columns)


def chemical_information(model_dir: Path, val: Path, train: Path, seed: int = 0) -> float:
    """0.5 log det Cov(z - E[z | TEFF, LOGG]) in the decoded-twin metric (module docstring); twin-free."""
    from chemtwin.data.dataset import open_dataset
    from chemtwin.search.twin_metric import DecodedTwinMetric
    from chemtwin.tagging.estimator import ChemTwin

    model = ChemTwin.load(model_dir)
    with open_dataset(train) as ds:
        metric = DecodedTwinMetric(seed=seed).fit_dataset(model, ds)
    with open_dataset(val) as ds:
        batch = ds.take(np.arange(ds.n_stars))
        cond = np.asarray(batch.labels)[:, ds.label_columns(model.condition_)].astype(np.float64)
        z = model.transform(batch.flux, batch.ivar, cond.astype(np.float32)).astype(np.float64)
    design = _label_trend(cond)
    trend = design @ np.linalg.lstsq(design, z, rcond=None)[0]
    white = (z - trend) @ metric.whitening_.T
    return 0.5 * float(np.linalg.slogdet(np.cov(white, rowvar=False))[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lambdas", default="0,0.001,0.003,0.01,0.03,0.1", help="comma-separated lambda values")
    ap.add_argument("--snr", default="100", help="SNR of both sets (default 100)")
    add_training_run_arguments(ap, seconds=90.0, each="lambda", work="out/lambda_sweep",
                               quick="300/150 pairs, 15 s per lambda, 3 lambdas (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.seconds, args.lambdas = "300,150", 15.0, "0,0.01,0.1"
    lambdas = [float(v) for v in args.lambdas.split(",")]
    if any(not np.isfinite(v) or v < 0 for v in lambdas):
        print("lambda_sweep: error: lambdas must be finite and >= 0", file=sys.stderr)
        return 2
    n_train, n_val = (int(n) for n in args.pairs.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train, val = work / f"train_{n_train}_snr{args.snr}.h5", work / f"val_{n_val}_snr{args.snr}.h5"
    _generate(train, n_train, seed=1, snr=args.snr)
    _generate(val, n_val, seed=2, snr=args.snr)
    out_json = Path(args.json) if args.json else work / "results.json"
    results = {"protocol": {"train_pairs": n_train, "val_pairs": n_val, "snr": args.snr, "seconds": args.seconds,
                            "threads": args.threads, "preset": "fast"}, "machine": machine(), "rows": []}
    for lam in lambdas:
        model_dir = work / f"fader_lambda{lam:g}"
        if not (model_dir / "config.json").exists():
            cmd = [sys.executable, "-m", "chemtwin", "-q", "train", str(train), "--out", str(model_dir), "--lambda", str(lam),
                   "--time-limit", str(args.seconds), "--threads", str(args.threads), "--epochs", "100000", "--overwrite"]
            _train(cmd, work / "train.log")
        t0 = time.monotonic()
        row = {"lambda": lam, **evaluate_model(model_dir, val, train),
               "chemical_information_nats": chemical_information(model_dir, val, train)}
        row["condition_leak"] = (row["teff_r2_mlp"] + row["logg_r2_mlp"]) / 2
        row["eval_s"] = time.monotonic() - t0
        results["rows"].append(row)
        log(json.dumps({k: row[k] for k in ("lambda", "frac_rank0", "decoded_frac_rank0", "condition_leak",
                                            "chemical_information_nats", "mse_reconstruction")}))
        write_results(out_json, json.dumps(results, indent=2) + "\n")
    rows = results["rows"]
    picks = {"leak": min(rows, key=lambda r: r["condition_leak"]),
             "information": max(rows, key=lambda r: r["chemical_information_nats"])}
    for name, picked in picks.items():
        results[f"picked_lambda_by_{name}"] = picked["lambda"]
    for key in ("frac_rank0", "decoded_frac_rank0"):
        best = max(rows, key=lambda r: r[key])
        results[f"best_lambda_by_{key}"] = best["lambda"]
        results[f"best_{key}"] = best[key]
        for name, picked in picks.items():
            results[f"picked_by_{name}_{key}"] = picked[key]
    write_results(out_json, json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k.startswith(("picked", "best"))}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
