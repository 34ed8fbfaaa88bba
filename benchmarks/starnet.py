"""StarNet against The Cannon on the synthetic domain: label RMSE at one SNR, training time, throughput.

    nice -n 10 python benchmarks/starnet.py --out /tmp/starnet.json [--work DIR] [--train-groups 1500]
        [--test-groups 250] [--snr 100] [--time-limit 240] [--epochs 30] [--threads 1]

1. Generates (``chemtwin.data.generate``, the embedded synthesizer, red-giant prior) a training
   set of 2 x ``--train-groups`` stars, twice with the same seed: noiseless and at SNR ``--snr``
   (the same stars and labels), and a test set of 2 x ``--test-groups`` other stars at SNR ``--snr``.
2. The Cannon (quadratic) is trained on the SNR ``--snr`` training spectra; StarNet on the same
   stars' noiseless spectra with noise to SNR ``--snr`` drawn afresh for every batch (its
   paper's recipe: synthetic spectra plus noise), the default network, every training star
   (no validation split), until ``--epochs`` or ``--time-limit``.
3. Both predict the test set.  Per label: RMSE against the true labels for each, their ratio;
   StarNet's pull std ((pred - true) / sigma: 1 when its errors are right).  Training seconds,
   prediction throughput (spectra/s, wall clock) at ``--threads`` and at 2 threads.

Labels: TEFF, LOGG, FE_H and the 16 X_FE (``label_fit.independent_labels``).  Writes one JSON
file; the datasets in --work are reused when present.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import log, machine


def generate(path: Path, groups: int, snr: float, seed: int) -> Path:
    from chemtwin.data.generate import generate_dataset

    if not path.exists():
        generate_dataset(path, n_groups=groups, snr=snr, seed=seed, progress=False, threads=1)
    return path


def rmse(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    ok = np.isfinite(pred).all(1)
    return np.sqrt(np.mean((pred[ok] - truth[ok]) ** 2, 0))


def throughput(fn, n: int, threads: int) -> tuple[float, object]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    torch.set_num_threads(previous)
    return n / seconds, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--work", default=None, help="folder for the datasets (default: a temporary one)")
    ap.add_argument("--train-groups", type=int, default=1500)
    ap.add_argument("--test-groups", type=int, default=250)
    ap.add_argument("--snr", type=float, default=100.0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--time-limit", type=float, default=240.0, help="StarNet's training seconds at most")
    ap.add_argument("--threads", type=int, default=1, help="torch / Cannon threads for training (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits

    from chemtwin.data.dataset import open_dataset
    from chemtwin.methods.label_fit import independent_labels
    from chemtwin.tagging.cannon import Cannon
    from chemtwin.tagging.starnet import StarNetConfig
    from chemtwin.tagging.starnet_training import Arrays, load_model, predict_dataset, train

    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="starnet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    clean = generate(work / f"train_{args.train_groups}_inf.h5", args.train_groups, float("inf"), args.seed + 1)
    noisy = generate(work / f"train_{args.train_groups}_{args.snr:g}.h5", args.train_groups, args.snr, args.seed + 1)
    test = generate(work / f"test_{args.test_groups}_{args.snr:g}.h5", args.test_groups, args.snr, args.seed + 2)
    log(f"datasets ready in {time.perf_counter() - t0:.0f} s")

    with open_dataset(noisy) as tr, open_dataset(test) as te:
        names = independent_labels(tr.label_names, tr.labels())
        batch = tr.read()
        train_labels = batch.labels[:, tr.label_columns(names)].astype(np.float64)
        truth = te.labels(names).astype(np.float64)
        test_batch = te.read()
        wavelength = tr.wavelength
    n_train, n_test = len(train_labels), len(truth)

    # The Cannon
    log(f"cannon: {len(names)} labels, {n_train} stars")
    with threadpool_limits(1, user_api="blas"):
        cannon = Cannon(names, order=2, n_jobs=args.threads)
        t = time.perf_counter()
        cannon.fit(batch.flux, batch.ivar, train_labels, wavelength=wavelength)
        cannon_train_s = time.perf_counter() - t
        del batch
        t = time.perf_counter()
        cannon_result = cannon.test(test_batch.flux, test_batch.ivar)
        cannon_test_s = time.perf_counter() - t
    cannon_pred = cannon_result.labels

    # StarNet
    with open_dataset(clean) as tr:
        data = Arrays.from_dataset(tr, names)
    cfg = StarNetConfig(labels=tuple(names), epochs=args.epochs, time_limit=args.time_limit, val_fraction=0.0,
                        seed=args.seed, device="cpu", augment={"snr": args.snr})
    folder = work / "starnet_model"
    log(f"starnet: {len(names)} labels, {n_train} stars, up to {args.epochs} epochs / {args.time_limit:g} s")
    t = time.perf_counter()
    final = train(data, folder, cfg, overwrite=True, progress=sys.stderr.isatty())
    starnet_train_s = time.perf_counter() - t
    del data
    model, _, _ = load_model(folder)
    with open_dataset(test) as te:
        rate1, (pred, sigma) = throughput(lambda: predict_dataset(model, te), n_test, args.threads)
        rate2, _ = throughput(lambda: predict_dataset(model, te), n_test, 2)
    pull = (pred - truth) / sigma

    r_cannon, r_starnet = rmse(cannon_pred, truth), rmse(pred, truth)
    per_label = {n: {"cannon_rmse": float(a), "starnet_rmse": float(b), "starnet_over_cannon": float(b / a),
                     "starnet_median_sigma": float(np.nanmedian(sigma[:, k])),
                     "starnet_pull_std": float(np.nanstd(pull[:, k]))}
                 for k, (n, a, b) in enumerate(zip(names, r_cannon, r_starnet))}
    results = {
        "what": "StarNet vs The Cannon, synthetic domain (embedded synthesizer), test at one SNR",
        "command": "python benchmarks/starnet.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(), "threads": args.threads, "snr": args.snr, "n_train": n_train, "n_test": n_test,
        "labels": names,
        "cannon": {"order": 2, "n_terms": cannon.vectorizer.n_terms, "train_s": cannon_train_s,
                   "test_s": cannon_test_s, "spectra_per_s": n_test / cannon_test_s,
                   "n_failed": int((~np.isfinite(cannon_pred).all(1)).sum())},
        "starnet": {"config": cfg.to_dict(), "train_s": starnet_train_s, "epochs": final.get("epoch"),
                    "steps": final.get("step"), "train_loss": final.get("train_loss"),
                    "spectra_per_s": rate1, "spectra_per_s_2_threads": rate2,
                    "n_params": sum(p.numel() for p in model.parameters())},
        "labels_where_starnet_is_no_worse": [n for n in names if per_label[n]["starnet_over_cannon"] <= 1.0],
        "median_rmse_ratio_abundances": float(np.median([per_label[n]["starnet_over_cannon"] for n in names
                                                         if n not in ("TEFF", "LOGG")])),
        "per_label": per_label,
    }
    Path(args.out).write_text(json.dumps(results, indent=1))
    log(json.dumps({k: v for k, v in results.items() if k not in ("per_label", "machine")}, indent=1))
    for n in names:
        p = per_label[n]
        log(f"{n:7s} cannon {p['cannon_rmse']:.4g}  starnet {p['starnet_rmse']:.4g}  ratio {p['starnet_over_cannon']:.2f}"
            f"  pull std {p['starnet_pull_std']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
