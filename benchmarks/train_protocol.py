"""The paper-size training protocol, default architecture and ``--preset paper`` side by side.

    python benchmarks/train_protocol.py --json out/train_protocol.json           # full: hours
    python benchmarks/train_protocol.py --quick --json /tmp/train_quick.json     # minutes

Full protocol (issue 3): 25,000 training pairs and 12,500 validation pairs at SNR inf,
made with ``chemtwin generate``; each preset trains on the CPU (``--threads``, default 2)
for 30 minutes, is evaluated, is resumed to 60 minutes in all (``--resume --time-limit``:
the cosine schedule restarts from where 30 minutes of a 60-minute run would be), and is
evaluated again.  Recorded per preset and checkpoint: wall time, training throughput
(spectra/s), peak resident memory of the training process, and on the whole validation
set the doppelganger fractions (rank 0, < 0.1% and < 1% of N, median rank), the
reconstruction and swapped-latent MSE (all from ``chemtwin.evaluation``), and how well
ridge, 10-nearest-neighbour and small-MLP regressions recover TEFF and LOGG from z (R^2;
low = disentangled).  ``--quick`` runs the same with 600/300 pairs and 1 + 2 minutes.
``--pairs TRAIN,VAL`` and ``--snr`` change the sets (a learning curve at the medium bench's size:
``--presets fast --pairs 3000,1500 --snr 100 --minutes 1.5,3,6,12``).  Every checkpoint is also
ranked in the twin-free decoded-twin metric learned from the training set (``decoded_*`` keys).
``evaluate_model`` is reusable on its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import machine

RANK_KEYS = ("frac_rank0", "frac_rank_lt_0p1pct", "frac_rank_lt_1pct", "median_rank")


def evaluate_model(model_dir, val_path, train_path=None) -> dict:
    """``chemtwin evaluate``'s figures: doppelganger fractions, reconstruction and swapped MSE,
    and how well TEFF and LOGG are recovered from z (``condition_r2``; low = disentangled); with
    ``train_path``, also the ranks in the decoded-twin metric learned from it (``decoded_*``)."""
    from chemtwin.evaluation.evaluate import evaluate

    res = evaluate("model", str(val_path), model=str(model_dir), progress=False)
    out = {k: res[k] for k in ("n_stars", *RANK_KEYS, "mse_reconstruction", "mse_swapped")}
    for name, scores in res["condition_r2"].items():
        out.update({f"{name.lower()}_r2_{reg}": r2 for reg, r2 in scores.items()})
    if train_path is not None:
        res = evaluate("fader_decoded", str(val_path), model=str(model_dir), train=str(train_path), progress=False)
        out.update({f"decoded_{k}": res[k] for k in RANK_KEYS})
    return out


def _train(cmd: list[str], log_path: Path) -> dict:
    """Run a training command; wall time and peak RSS (sampled every 0.5 s) of the process tree."""
    import psutil

    t = time.monotonic()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        ps, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"training failed (exit {proc.returncode}); see {log_path}")
    return {"wall_s": time.monotonic() - t, "peak_rss_gb": peak / 2**30}


def _generate(path: Path, n_groups: int, seed: int, snr: str) -> None:
    if path.exists():
        return
    from chemtwin.cli import main

    rc = main(["generate", "-o", str(path), "--n-groups", str(n_groups), "--seed", str(seed), "--snr", snr])
    if rc != 0:
        raise SystemExit(f"chemtwin generate failed for {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="600/300 pairs, 1 and 2 minutes (a smoke run)")
    ap.add_argument("--work", default="out/train_protocol", help="folder for the data and models (default out/train_protocol)")
    ap.add_argument("--json", default=None, help="write the results here (default WORK/results.json)")
    ap.add_argument("--presets", default="fast,paper", help="comma-separated presets (default fast,paper)")
    ap.add_argument("--minutes", default=None, help="evaluation times, comma-separated (default 30,60; quick 1,2)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--pairs", default=None, metavar="TRAIN,VAL",
                    help="training and validation pairs (default 25000,12500; quick 600,300)")
    ap.add_argument("--snr", default="inf", help="SNR of both sets (default inf)")
    args = ap.parse_args()

    n_train, n_val = (600, 300) if args.quick else (25_000, 12_500)
    if args.pairs:
        n_train, n_val = (int(n) for n in args.pairs.split(","))
    minutes = [float(m) for m in (args.minutes or ("1,2" if args.quick else "30,60")).split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train, val = work / f"train_{n_train}_snr{args.snr}.h5", work / f"val_{n_val}_snr{args.snr}.h5"
    t = time.monotonic()
    _generate(train, n_train, seed=1, snr=args.snr)
    _generate(val, n_val, seed=2, snr=args.snr)
    results = {
        "protocol": {"train_pairs": n_train, "val_pairs": n_val, "snr": args.snr, "minutes": minutes, "threads": args.threads,
                     "device": args.device, "generate_s": time.monotonic() - t},
        "machine": machine(),
        "presets": {},
    }
    out_json = Path(args.json) if args.json else work / "results.json"
    for preset in args.presets.split(","):
        model_dir = work / f"model_{preset}"
        rows = []
        for k, m in enumerate(minutes):
            cmd = [sys.executable, "-m", "chemtwin", "-q", "train", str(train), "--out", str(model_dir), "--preset", preset,
                   "--val-data", str(val), "--time-limit", str(60 * m), "--threads", str(args.threads),
                   "--device", args.device, "--epochs", "100000"]
            cmd += ["--resume"] if k else ["--overwrite"]
            run = _train(cmd, work / f"train_{preset}.log")
            meta = json.loads((model_dir / "config.json").read_text())
            from chemtwin.tagging.model_folder import read_history

            hist = read_history(model_dir)
            batch = meta["config"]["batch_size"]
            spectra = hist[-1]["step"] * batch
            row = {"minutes": m, "wall_s_this_call": run["wall_s"], "peak_rss_gb": run["peak_rss_gb"],
                   "train_time_s": hist[-1]["time_s"], "epochs": hist[-1]["epoch"], "steps": hist[-1]["step"],
                   "spectra_seen": spectra, "throughput_spectra_per_s": spectra / max(hist[-1]["time_s"], 1e-9)}
            te = time.monotonic()
            row.update(evaluate_model(model_dir, val, train))
            row["eval_s"] = time.monotonic() - te
            rows.append(row)
            print(json.dumps({"preset": preset, **row}), flush=True)
            results["presets"][preset] = rows
            out_json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
