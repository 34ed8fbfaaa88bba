"""The bench in both protocols on the same spectra: what each method loses when it is given only
what a survey has.

    python benchmarks/bench_protocols.py --out OUT.json --work DIR [--train-pairs 3000 --val-pairs 1500
        --time-limit 90 --payne-stars 10000 --payne-time 240 --holdout 500 --pipeline-stars 3000]

Runs ``chemtwin.evaluation.bench.run_bench`` into ``DIR/survey`` and ``DIR/paper`` with the same
seed (so the same spectra and true labels) and writes the rank-0 table of both, with each run's
machine, wall time and peak memory, to OUT.json.  A rerun resumes each bench where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_protocols.json")
    parser.add_argument("--work", required=True, help="folder for the two bench runs (large: keep it outside the repo)")
    parser.add_argument("--train-pairs", type=int, default=3000)
    parser.add_argument("--val-pairs", type=int, default=1500)
    parser.add_argument("--time-limit", type=float, default=90.0, help="seconds of training per model")
    parser.add_argument("--payne-stars", type=int, default=10_000)
    parser.add_argument("--payne-time", type=float, default=240.0)
    parser.add_argument("--holdout", type=int, default=500)
    parser.add_argument("--pipeline-stars", type=int, default=3000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from chemtwin.evaluation.bench import PROTOCOLS, BenchConfig, run_bench

    summary = {"settings": vars(args), "runs": {}}
    for protocol in PROTOCOLS:
        cfg = BenchConfig(protocol=protocol, n_train_pairs=args.train_pairs, n_val_pairs=args.val_pairs,
                          time_limit=args.time_limit, payne_train_stars=args.payne_stars,
                          payne_time_limit=args.payne_time, holdout_stars=args.holdout,
                          pipeline_label_stars=args.pipeline_stars, raw_max_queries=None)
        results = run_bench(Path(args.work) / protocol, cfg, progress=False)
        summary["runs"][protocol] = {
            "rank0": {f"{r['method']} {r['scenario']}": r["frac_rank0"] for r in results["rows"]},
            **{k: results[k] for k in ("machine", "software", "wall_s_this_run", "peak_rss_gb_this_run")},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
