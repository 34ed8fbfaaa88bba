"""Exact doppelganger ranks at validation scale and at survey scale.

    python benchmarks/ranks_scale.py                # 25,000 and 1,000,000 stars x 20 dims
    python benchmarks/ranks_scale.py --quick        # 25,000 in full; 10^6 with 1,000 query stars only
    python benchmarks/ranks_scale.py --json out/ranks_scale.json

Latents: twin pairs, group centres ~ N(0, 1) in ``--dim`` dims, each star scattered by
``--scatter`` (0.3) per dim around its centre; generated chunk by chunk (the 10^6 run
holds only the 80 MB latent array).  For each size we time
``chemtwin.core.ranks.doppelganger_ranks`` (exact, every star a query, all N
candidates) and record the peak RSS of the process (``ru_maxrss``) after it, plus the
rank fractions as a sanity check.  The work is O(N^2 d): 10^6 stars cost about 1,600
times 25,000 stars, hours on a 2-core machine, in bounded memory.  ``--quick`` runs
25,000 stars in full and probes 10^6 stars with ``--probe-queries`` (1,000) query stars,
each ranked against all 10^6 stars: the memory of the big run and its time per query
(``extrapolated_seconds``) without the hours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

try:
    import chemtwin  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
from _common import peak_rss_mib, write_results

from chemtwin.core.ranks import doppelganger_ranks
from chemtwin.evaluation.metrics import rank_summary


def make_latents(n: int, dim: int, scatter: float, seed: int, chunk: int = 100_000):
    """``n`` latents in twin pairs (stars 2k and 2k+1 share group k), float32."""
    rng = np.random.default_rng(seed)
    n = n - n % 2
    z = np.empty((n, dim), np.float32)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        centres = rng.standard_normal(((b - a) // 2, dim), dtype=np.float32)
        z[a:b] = np.repeat(centres, 2, axis=0) + scatter * rng.standard_normal((b - a, dim), dtype=np.float32)
    return z, np.arange(n, dtype=np.int64) // 2


def one_size(n: int, args, max_queries: int | None = None) -> dict:
    z, group = make_latents(n, args.dim, args.scatter, args.seed)
    rss_before = peak_rss_mib()
    t0 = time.perf_counter()
    res = doppelganger_ranks(z, group, args.metric, threads=args.threads, max_queries=max_queries,
                             progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    s = rank_summary(res)
    n_query = int(np.unique(res.query).size)
    out = {"n": int(len(z)), "dim": args.dim, "metric": args.metric, "query_stars": n_query,
           "seconds": round(seconds, 3), "extrapolated_seconds": round(seconds * len(z) / n_query, 1),
           "peak_rss_mib": round(peak_rss_mib(), 1), "peak_rss_mib_before_ranks": round(rss_before, 1),
           "latents_mib": round(z.nbytes / 2**20, 1),
           **{k: s[k] for k in ("frac_rank0", "frac_rank_lt_0p1pct", "frac_rank_lt_1pct", "median_rank")}}
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    sizes = [(args.small, None), (args.big, args.probe_queries if args.quick else None)]
    result = {
        "benchmark": "ranks_scale", "quick": bool(args.quick), "threads": args.threads,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_at_start": list(os.getloadavg())},
        "runs": [],
    }
    for n, max_queries in sizes:  # small first: ru_maxrss after the big run is the big run's peak
        result["runs"].append(one_size(n, args, max_queries))
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="the small size in full, the big size with --probe-queries query stars only")
    p.add_argument("--probe-queries", type=int, default=1000,
                   help="query stars of the big size under --quick (default 1,000)")
    p.add_argument("--small", type=int, default=25_000, help="validation-scale number of stars (default 25,000)")
    p.add_argument("--big", type=int, default=1_000_000, help="survey-scale number of stars (default 1,000,000)")
    p.add_argument("--dim", type=int, default=20, help="latent dimension (default 20)")
    p.add_argument("--metric", default="l1", help="l1 (default), l2 or cosine")
    p.add_argument("--scatter", type=float, default=0.3, help="per-dim scatter of a star around its pair centre")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", type=Path, help="write the results here (default: stdout only)")
    args = p.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        write_results(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
