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
reconstruction and swapped-latent MSE and how well a ridge regression recovers TEFF and
LOGG from z (R^2; low = disentangled).  ``--quick`` runs the same with 600/300 pairs and
1 + 2 minutes.  ``evaluate_model`` is reusable on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _ranks(z, group):
    try:
        from chemtwin.evaluation.ranks import doppelganger_ranks

        return doppelganger_ranks(z, group, progress=False).rank
    except ImportError:  # the evaluation module is not there yet
        from chemtwin.tagging.training import twin_ranks

        r = twin_ranks(z, group)
        return r[r >= 0]


def _mse_rows(x_hat, flux, ivar) -> np.ndarray:
    """Per-star mean squared error over the pixels with ivar > 0."""
    good = ivar > 0
    return (np.where(good, x_hat - np.nan_to_num(flux), 0.0) ** 2).sum(1) / np.maximum(good.sum(1), 1)


def evaluate_model(model_dir, val_path, batch_size: int = 1024) -> dict:
    """Doppelganger fractions, reconstruction / swapped MSE and TEFF, LOGG R^2 from z."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import cross_val_score

    from chemtwin.data.dataset import open_dataset
    from chemtwin.tagging import ChemTwin

    ct = ChemTwin.load(model_dir)
    with open_dataset(val_path) as ds:
        z = ct.embed_dataset(ds, batch_size)
        group, cond = ds.group, ds.labels(list(ct.condition))
        ok = np.isfinite(z).all(1)
        ranks = _ranks(z[ok], group[ok])
        n = int(ok.sum())
        # each star's partner: the next member of its group (for pairs, its twin)
        order = np.lexsort((np.arange(len(group)), group))
        partner = np.full(len(group), -1)
        nxt = (group[order][1:] == group[order][:-1]) & (group[order][1:] >= 0)
        partner[order[:-1][nxt]] = order[1:][nxt]
        rec, swap = [], []
        for a in range(0, len(group), batch_size):
            b = ds.read(a, a + batch_size)
            rows = np.arange(a, a + len(b.flux))
            good = ok[rows]
            rec.append(_mse_rows(ct.swap(z[rows][good], cond[rows][good]), b.flux[good], b.ivar[good]))
            i = rows[(partner[rows] >= 0) & good]
            i = i[ok[partner[i]]]
            if i.size:
                twin = ds.take(partner[i])
                swap.append(_mse_rows(ct.swap(z[i], cond[partner[i]]), twin.flux, twin.ivar))
    r2 = {f"{name.lower()}_r2_from_z": float(cross_val_score(RidgeCV(), z[ok], cond[ok, k], cv=3).mean())
          for k, name in enumerate(ct.condition)}
    return {
        "n_val_stars": n, "rank0": float((ranks == 0).mean()), "rank_lt_0.1pct": float((ranks < 0.001 * n).mean()),
        "rank_lt_1pct": float((ranks < 0.01 * n).mean()), "median_rank": float(np.median(ranks)),
        "recon_mse": float(np.concatenate(rec).mean()), "swap_mse": float(np.concatenate(swap).mean()) if swap else None,
        **r2,
    }


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


def _generate(path: Path, n_groups: int, seed: int) -> None:
    if path.exists():
        return
    from chemtwin.cli import main

    rc = main(["generate", str(path), "--n-groups", str(n_groups), "--seed", str(seed)])
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
    args = ap.parse_args()

    n_train, n_val = (600, 300) if args.quick else (25_000, 12_500)
    minutes = [float(m) for m in (args.minutes or ("1,2" if args.quick else "30,60")).split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train, val = work / f"train_{n_train}.h5", work / f"val_{n_val}.h5"
    t = time.monotonic()
    _generate(train, n_train, seed=1)
    _generate(val, n_val, seed=2)
    results = {
        "protocol": {"train_pairs": n_train, "val_pairs": n_val, "snr": "inf", "minutes": minutes, "threads": args.threads,
                     "device": args.device, "generate_s": time.monotonic() - t},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": sys.version.split()[0]},
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
            from chemtwin.tagging.training import read_history

            hist = read_history(model_dir)
            batch = meta["config"]["batch_size"]
            spectra = hist[-1]["step"] * batch
            row = {"minutes": m, "wall_s_this_call": run["wall_s"], "peak_rss_gb": run["peak_rss_gb"],
                   "train_time_s": hist[-1]["time_s"], "epochs": hist[-1]["epoch"], "steps": hist[-1]["step"],
                   "spectra_seen": spectra, "throughput_spectra_per_s": spectra / max(hist[-1]["time_s"], 1e-9)}
            te = time.monotonic()
            row.update(evaluate_model(model_dir, val))
            row["eval_s"] = time.monotonic() - te
            rows.append(row)
            print(json.dumps({"preset": preset, **row}), flush=True)
            results["presets"][preset] = rows
            out_json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
