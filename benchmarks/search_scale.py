"""Twin search at survey scale: exact L1/L2 and approximate indexes on 10^6 latents.

    python benchmarks/search_scale.py            # 1,000,000 x 20-d latents, 1,000 queries, k=10
    python benchmarks/search_scale.py --quick    # 100,000 latents
    python benchmarks/search_scale.py --json out/search_scale.json

What is timed (wall clock, FAISS on --threads threads, default 2):
* exact (flat) L1 and L2: index build *from the latent file* (streamed in chunks) plus the
  search of all queries; target < 30 s each on 2 cores at 10^6 stars;
* approximate (ivf, hnsw) for each metric: build, search, recall@k against the exact
  neighbours of the same metric, and the search speed-up over exact;
* peak RSS of the process (``ru_maxrss``) after every phase.

The latents mimic a survey of twin groups: group centres ~ N(0, 1) in d dims, 10 stars a
group scattered by 0.25 per dim (twins are close, but the 10th neighbour is often another group); each query is a *new* member of a random group (not in
the index).  The latent file is written chunk by chunk into a temporary folder, so the
process never holds the whole array apart from the index itself.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import chemtwin  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import log, peak_rss_mib, print_or_write_json

import faiss
import h5py

from chemtwin.search.index import TwinIndex

GROUP_SIZE = 10
SCATTER = 0.25


def make_latent_file(path: Path, n: int, dim: int, n_queries: int, seed: int, chunk: int = 100_000):
    """Write ``n`` clustered latents to ``path`` chunk by chunk; return the queries."""
    rng = np.random.default_rng(seed)
    n_groups = max(1, n // GROUP_SIZE)
    all_centres = rng.standard_normal((n_groups, dim), dtype=np.float32)  # n/10 x d: 8 MB at 10^6
    with h5py.File(path, "w") as f:
        z = f.create_dataset("z", shape=(n, dim), dtype="f4", chunks=(min(n, 65_536), dim))
        g = f.create_dataset("group", shape=(n,), dtype="i8")
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            grp = np.arange(a, b) % n_groups
            z[a:b] = all_centres[grp] + SCATTER * rng.standard_normal((b - a, dim), dtype=np.float32)
            g[a:b] = grp
    qgroup = rng.integers(0, n_groups, n_queries)
    queries = all_centres[qgroup] + SCATTER * rng.standard_normal((n_queries, dim), dtype=np.float32)
    del all_centres
    return np.ascontiguousarray(queries, dtype=np.float32), qgroup


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([np.intersect1d(f[f >= 0], t).size / k for f, t in zip(found, truth)]))


def run(args) -> dict:
    faiss.omp_set_num_threads(args.threads)
    n = 100_000 if args.quick else args.n
    result = {
        "n": n, "dim": args.dim, "queries": args.queries, "k": args.k, "threads": args.threads,
        "faiss_version": getattr(faiss, "__version__", "unknown"), "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "python": platform.python_version(),
        "target_exact_s": 30.0, "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="chemtwin-search-scale-") as tmp:
        path = Path(tmp) / "LATENTS.h5"
        t0 = time.perf_counter()
        queries, _ = make_latent_file(path, n, args.dim, args.queries, args.seed)
        result["write_latents_s"] = round(time.perf_counter() - t0, 3)
        result["peak_rss_after_write_mib"] = round(peak_rss_mib(), 1)
        log(f"wrote {n:,} x {args.dim} latents in {result['write_latents_s']:.1f} s")
        for metric in args.metrics:
            t0 = time.perf_counter()
            index = TwinIndex.from_file(path, metric=metric, kind="flat")
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            d_exact, i_exact = index.search(queries, args.k)
            search = time.perf_counter() - t0
            del index
            run_ = {"metric": metric, "kind": "flat", "build_s": round(build, 3), "search_s": round(search, 3),
                    "total_s": round(build + search, 3), "recall_at_k": 1.0,
                    "meets_target": bool(build + search < 30.0), "peak_rss_mib": round(peak_rss_mib(), 1)}
            result["runs"].append(run_)
            log(f"exact {metric}: build {build:.2f} s + search {search:.2f} s = {build + search:.2f} s "
                f"(target < 30 s), peak RSS {run_['peak_rss_mib']:.0f} MiB")
            for kind in args.approx:
                params = {}
                if kind == "hnsw":
                    params = {"M": args.hnsw_m, "ef_search": args.ef_search, "ef_construction": args.ef_construction}
                elif kind == "ivf":
                    params = {"nlist": args.nlist, "nprobe": args.nprobe}
                t0 = time.perf_counter()
                index = TwinIndex.from_file(path, metric=metric, kind=kind, seed=args.seed, **params)
                build_a = time.perf_counter() - t0
                t0 = time.perf_counter()
                _, i_a = index.search(queries, args.k)
                search_a = time.perf_counter() - t0
                rec = recall_at_k(i_a, i_exact)
                run_a = {"metric": metric, "kind": kind, "build_s": round(build_a, 3), "search_s": round(search_a, 3),
                         "total_s": round(build_a + search_a, 3), "recall_at_k": round(rec, 4),
                         "search_speedup_vs_exact": round(search / max(search_a, 1e-9), 2),
                         "total_speedup_vs_exact": round((build + search) / max(build_a + search_a, 1e-9), 2),
                         "params": {"M": index.M, "ef_construction": index.ef_construction, "ef_search": index.ef_search}
                         if kind == "hnsw" else {"nlist": index.nlist, "nprobe": index.nprobe},
                         "peak_rss_mib": round(peak_rss_mib(), 1)}
                result["runs"].append(run_a)
                log(f"{kind} {metric}: build {build_a:.2f} s, search {search_a:.3f} s "
                    f"({run_a['search_speedup_vs_exact']}x faster search), recall@{args.k} {rec:.4f}, {run_a['params']}")
                del index
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100,000 latents instead of --n")
    p.add_argument("--n", type=int, default=1_000_000, help="stars in the index (default 1,000,000)")
    p.add_argument("--dim", type=int, default=20, help="latent dimension (default 20)")
    p.add_argument("--queries", type=int, default=1000, help="query stars (default 1000)")
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--metrics", nargs="+", choices=("l1", "l2"), default=["l1", "l2"], help="metrics to time")
    p.add_argument("--approx", nargs="*", choices=("ivf", "hnsw"), default=["ivf", "hnsw"],
                   help="approximate kinds to compare (default ivf hnsw; none: --approx)")
    p.add_argument("--nlist", type=int, default=None, help="ivf cells (default about sqrt(n))")
    p.add_argument("--nprobe", type=int, default=None, help="ivf cells per query (default nlist/16, >= 16)")
    p.add_argument("--hnsw-m", type=int, default=32, help="hnsw links per node (default 32)")
    p.add_argument("--ef-construction", type=int, default=80, help="hnsw build breadth (default 80)")
    p.add_argument("--ef-search", type=int, default=64, help="hnsw search breadth (default 64)")
    p.add_argument("--threads", type=int, default=2, help="FAISS threads (default 2, the project's machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic latents")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    print_or_write_json(run(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
