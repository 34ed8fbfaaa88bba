"""The fast encoder with its weights fixed, affine or polynomial in TEFF/LOGG (``encoder_u_gain``), side by side.

    python benchmarks/encoder_gain.py --work /tmp/gain --json /tmp/gain/results.json
    python benchmarks/encoder_gain.py --degrees 1,2 --work /tmp/gain2
    python benchmarks/encoder_gain.py --quick --work /tmp/gain_quick                # minutes

For each SNR (``--snr``, default ``100,inf``) a training and a validation set of twin pairs are
generated (seeds 1 and 2, as ``lambda_sweep.py``), and one fast-preset fader per degree of the
encoder's weights in u (``--degrees``, default ``0,1``: fixed weights, and affine, the default since
2026-12-07) trains ``--seconds`` on the same data with the same seed.  Each is scored on all validation stars with
``train_protocol.evaluate_model``: rank 0 with L1 on raw latents and in the twin-free
decoded-twin metric, and how well TEFF/LOGG are recovered from z.  Rows are written to the JSON
as they finish; a rerun reuses trained models.  Threads: ``--threads`` (default 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import add_training_run_arguments, log, machine, write_results
from train_protocol import _generate, evaluate_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--snr", default="100,inf", help="comma-separated SNRs (default 100,inf)")
    ap.add_argument("--degrees", default="0,1", help="comma-separated degrees of the encoder's weights in u, 0-3 "
                                                     "(default 0,1)")
    add_training_run_arguments(ap, seconds=180.0, each="model", work="out/encoder_gain",
                               quick="300/150 pairs, 15 s per model, SNR 100 only (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.seconds, args.snr = "300,150", 15.0, "100"
    if not args.seconds > 0:
        print("encoder_gain: error: --seconds must be > 0", file=sys.stderr)
        return 2
    try:
        degrees = [int(d) for d in args.degrees.split(",")]
    except ValueError:
        degrees = [-1]
    if not all(0 <= d <= 3 for d in degrees):
        print(f"encoder_gain: error: --degrees must be integers from 0 to 3, got {args.degrees}", file=sys.stderr)
        return 2

    import torch

    from chemtwin.tagging.estimator import ChemTwin

    torch.set_num_threads(args.threads)
    n_train, n_val = (int(n) for n in args.pairs.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.json) if args.json else work / "results.json"
    results = {"protocol": {"train_pairs": n_train, "val_pairs": n_val, "seconds": args.seconds, "threads": args.threads,
                            "preset": "fast"}, "machine": machine(), "rows": []}
    for snr in args.snr.split(","):
        train, val = work / f"train_{n_train}_snr{snr}.h5", work / f"val_{n_val}_snr{snr}.h5"
        _generate(train, n_train, seed=1, snr=snr)
        _generate(val, n_val, seed=2, snr=snr)
        for gain in degrees:
            model_dir = work / f"fader_snr{snr}_gain{gain}"
            if not (model_dir / "model.safetensors").exists():
                ChemTwin(encoder_u_gain=gain, time_limit=args.seconds, epochs=100_000).fit(
                    str(train), out_dir=model_dir, overwrite=True, progress=False)
            t0 = time.monotonic()
            row = {"snr": snr, "encoder_u_gain": gain, **evaluate_model(model_dir, val, train)}
            row["eval_s"] = time.monotonic() - t0
            results["rows"].append(row)
            log(json.dumps({k: row[k] for k in ("snr", "encoder_u_gain", "frac_rank0", "decoded_frac_rank0",
                                                "teff_r2_mlp", "logg_r2_mlp")}))
            write_results(out_json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
