"""Cycle-StarNet on the observed-like domain: does it repair The Payne's mismatch?

    python benchmarks/cyclestarnet.py --work /tmp/cycbench --out cyclestarnet.json [--threads 1]
                                      [--emulator-time-limit 240] [--cycle-time-limit 240]

1. Data (``chemtwin generate`` / ``augment``; reused when present in --work):
   * synthetic domain ``syn.h5``: the embedded synthesizer, noiseless, labels known
     (``--syn-groups`` pairs);
   * observed-like domain: ``generate --mismatch`` (another line list) then ``augment``: LSF
     change (extra Gaussian broadening up to 8 km/s), tellurics, persistence (0.05), continuum
     errors (0.005) and noise at SNR 100; ``obs_train.h5`` (unlabelled for training: its labels
     are never read) and ``obs_test.h5`` (scored with its hidden labels);
   * ``clean_test.h5``: the same stars as obs_test, clean synthesizer at SNR 100 (the matched-model
     reference: The Payne where its emulator's physics is the data's).
2. The Payne emulator of the synthetic domain (``payne train``, 19 labels, --emulator-time-limit).
3. Cycle-StarNet (``cyclestarnet train syn.h5 obs_train.h5``, --cycle-time-limit).
4. Rows (``chemtwin.evaluation.evaluate``), all on obs_test unless said: The Payne, unadapted
   emulator; The Payne through Cycle-StarNet (full and residual with z_sp held at its mean,
   and residual with z_sp fitted: the method's default); The Cannon trained on the
   synthetic domain's labels; Cycle-StarNet's z_sh ranked directly; The Payne on clean_test
   (matched model).  The Payne rows whiten their abundances by their errors on --cal-stars (100)
   labelled stars of their own domain (``cal.h5``: observed-like, other seed; ``cal_clean.h5`` for
   the matched row); these labels serve the whitening only, never a training.  (The formal
   covariance of the fit through Cycle-StarNet can be singular: an abundance the adapted model
   barely responds to.)
   Each row: abundance RMSE per label and averaged over FE_H and the 16 X_FE, twin rank 0.

Writes one JSON file; prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from chemtwin.cli import main as cli
from chemtwin.core.files import write_json
from chemtwin.errors import InputError
from chemtwin.evaluation.evaluate import evaluate
from chemtwin.methods.cyclestarnet import CycleStarNetPayne
from chemtwin.methods.payne import PayneLabels
from chemtwin.spectral_models.labels import CHEMICAL_LABELS

EMULATOR_LABELS = ["TEFF", "LOGG", *CHEMICAL_LABELS]
AUGMENT = ["--snr", "100", "--vmacro-max", "8", "--telluric", "--persistence", "0.05", "--continuum", "0.005"]


def _run(argv):
    rc = cli(["-q", *argv])
    if rc:
        raise SystemExit(f"chemtwin {' '.join(argv)} failed ({rc})")


def data(work: Path, a) -> None:
    steps = [
        ("syn.h5", ["generate", "--n-groups", str(a.syn_groups), "--seed", "11"]),
        ("obs_train_raw.h5", ["generate", "--mismatch", "--n-groups", str(a.obs_groups), "--seed", "21"]),
        ("obs_test_raw.h5", ["generate", "--mismatch", "--n-groups", str(a.test_groups), "--seed", "31"]),
        ("clean_test.h5", ["generate", "--n-groups", str(a.test_groups), "--seed", "31", "--snr", "100"]),
        ("cal_raw.h5", ["generate", "--mismatch", "--n-groups", str(a.cal_stars // 2), "--seed", "41"]),
        ("cal_clean.h5", ["generate", "--n-groups", str(a.cal_stars // 2), "--seed", "41", "--snr", "100"]),
        ("obs_train.h5", ["augment", str(work / "obs_train_raw.h5"), "--seed", "5", *AUGMENT]),
        ("obs_test.h5", ["augment", str(work / "obs_test_raw.h5"), "--seed", "5", *AUGMENT]),
        ("cal.h5", ["augment", str(work / "cal_raw.h5"), "--seed", "6", *AUGMENT]),
    ]
    for name, argv in steps:
        if not (work / name).exists():
            _run([*argv, "-o", str(work / name), *(["--threads", "1"] if argv[0] == "generate" else [])])


def row(result: dict) -> dict:
    fit = result.get("label_fit") or {}
    acc = fit.get("accuracy") or {}
    chem = {k: v["rmse"] for k, v in acc.items() if k in CHEMICAL_LABELS}
    return {"method": result["method"], "metric": result["metric"], "rank0": result["frac_rank0"],
            "rank_lt_1pct": result["frac_rank_lt_1pct"], "median_rank": result["median_rank"],
            "abundance_rmse_mean": float(np.mean(list(chem.values()))) if chem else None,
            "rmse": {k: v["rmse"] for k, v in acc.items()},
            "median_reduced_chi2": fit.get("median_reduced_chi2"), "fit_s": fit.get("fit_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--syn-groups", type=int, default=1500)
    p.add_argument("--obs-groups", type=int, default=1000)
    p.add_argument("--test-groups", type=int, default=250)
    p.add_argument("--emulator-time-limit", type=float, default=240.0)
    p.add_argument("--cycle-time-limit", type=float, default=240.0)
    p.add_argument("--cycle-epochs", type=int, default=40)
    p.add_argument("--cal-stars", type=int, default=100)
    p.add_argument("--only", default=None, help="comma-separated rows to (re)run, merged into an existing --out")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data(work, a)
    emu = work / "emu.npz"
    if not emu.exists():
        _run(["payne", "train", str(work / "syn.h5"), "-o", str(emu), "--labels", ",".join(EMULATOR_LABELS),
              "--time-limit", str(a.emulator_time_limit), "--threads", str(a.threads)])
    model = work / "cycle"
    if not (model / "config.json").exists() or json.loads((model / "config.json").read_text())["status"] == "training":
        _run(["cyclestarnet", "train", str(work / "syn.h5"), str(work / "obs_train.h5"), "-o", str(model),
              "--emulator", str(emu), "--epochs", str(a.cycle_epochs), "--time-limit", str(a.cycle_time_limit),
              "--threads", str(a.threads), "--overwrite"])
    rows, timings = {}, {}
    common = {"progress": False, "seed": 0}
    cal = {"calibration": str(work / "cal.h5")}
    payne = dict(whiten="errors", holdout_stars=a.cal_stars, threads=2)
    plans = {
        "payne_unadapted": (PayneLabels(**payne), work / "obs_test.h5", {"emulator": str(emu), **cal}),
        "payne_cyclestarnet_full": (CycleStarNetPayne(**payne, mode="full", free_split=False), work / "obs_test.h5",
                                    {"model": str(model), **cal}),
        "payne_cyclestarnet_residual": (CycleStarNetPayne(**payne, mode="residual", free_split=False),
                                        work / "obs_test.h5", {"model": str(model), **cal}),
        "payne_cyclestarnet_residual_free_split": (CycleStarNetPayne(**payne), work / "obs_test.h5",
                                                   {"model": str(model), **cal}),
        "cannon_on_synthetic": ("cannon", work / "obs_test.h5", {"train": str(work / "syn.h5")}),
        "cyclestarnet_zsh": ("cyclestarnet", work / "obs_test.h5", {"model": str(model)}),
        "payne_matched_model": (PayneLabels(**payne), work / "clean_test.h5",
                                {"emulator": str(emu), "calibration": str(work / "cal_clean.h5")}),
    }
    if a.out.exists() and a.only:  # merge into an earlier run's results
        earlier = json.loads(a.out.read_text())
        rows, timings = earlier["rows"], earlier["timings_s"]
    for name, (method, path, inputs) in plans.items():
        if a.only and name not in a.only.split(","):
            continue
        t = time.perf_counter()
        try:
            rows[name] = row(evaluate(method, str(path), **common, **inputs))
        except InputError as exc:  # reported, not fatal: the other rows still run
            rows[name] = {"error": str(exc), "rank0": float("nan"), "abundance_rmse_mean": float("nan")}
        timings[name] = time.perf_counter() - t
        print(f"{name:30s} rank0 {rows[name]['rank0']:.3f}  abundance RMSE "
              f"{rows[name]['abundance_rmse_mean'] if rows[name]['abundance_rmse_mean'] is not None else float('nan'):.4f}"
              f"  ({timings[name]:.0f} s) {rows[name].get('error', '')}", flush=True)
    un, matched = rows["payne_unadapted"], rows["payne_matched_model"]
    cycle_rows = {k: v for k, v in rows.items() if k.startswith("payne_cyclestarnet")}
    summary = {f"rmse_ratio_{k}_vs_unadapted": v["abundance_rmse_mean"] / un["abundance_rmse_mean"]
               for k, v in cycle_rows.items()}
    summary.update({f"rank0_{k}_vs_matched": v["rank0"] / matched["rank0"]
                    for k, v in {**cycle_rows, "cyclestarnet_zsh": rows["cyclestarnet_zsh"]}.items()})
    summary["target_rmse_halved"] = bool(min(v["abundance_rmse_mean"] for v in cycle_rows.values())
                                         <= 0.5 * un["abundance_rmse_mean"])
    summary["target_rank0_80pct"] = bool(max(v["rank0"] for v in cycle_rows.values()) >= 0.8 * matched["rank0"])
    cycle_meta = json.loads((model / "config.json").read_text())
    write_json(a.out, {"rows": rows, "summary": summary, "timings_s": timings, "total_s": time.perf_counter() - t0,
                       "cyclestarnet": {"status": cycle_meta["status"], "final": cycle_meta.get("final"),
                                        "config": cycle_meta["config"]},
                       "settings": vars(a) | {"work": str(a.work), "out": str(a.out)}, "augment": AUGMENT})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
