"""Scale-out with Dask: generate + embed N spectra on a local cluster of 1 and of 2 workers.

    python benchmarks/dask_scale.py --quick                 # 10,000 spectra
    python benchmarks/dask_scale.py                         # 200,000 spectra (~12 GB of shards per run)
    python benchmarks/dask_scale.py --json out/dask_scale.json --workdir /big/disk

For each cluster size (LocalCluster, one thread per worker process) both steps run through the
command line exactly as a user runs them, pointed at the benchmark's cluster with --scheduler:

    chemtwin generate OUT --n-groups N/2 --snr 100 --shard-size 1024 --scheduler ADDRESS
    chemtwin embed MODEL OUT --out LATENTS --shard-size 1024 --scheduler ADDRESS

Timed: the wall time of each command (cluster start-up is reported apart: a long-lived cluster
pays it once).  Memory: the peak RSS of every worker process (``ru_maxrss``), measured after
each step; the workers are restarted between the steps so that each peak is its own step's.
The model is an untrained fader network of the default (fast) architecture: embedding costs
the same whatever the weights.  The JSON ends with the projection for 5 million spectra on 50
workers (docs/distributed.md shows the arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    import chemtwin  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chemtwin.cli import main as chemtwin
from chemtwin.data.shards import dask_client

PROJECT_SPECTRA, PROJECT_WORKERS = 5_000_000, 50


def _warm() -> int:
    """On a worker: import and build what the tasks use (not part of the timed steps)."""
    import chemtwin.cli.embed  # noqa: F401
    from chemtwin.data.generate import _synthesizer

    _synthesizer("aspcap")
    return os.getpid()


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker_peaks(client) -> list[float]:
    return sorted(round(v, 1) for v in client.run(_peak_rss_mib).values())


def _model(folder: Path) -> Path:
    import torch

    from chemtwin.core.grids import get_grid
    from chemtwin.tagging.estimator import ChemTwin
    from chemtwin.tagging.fader import FaderNet

    torch.manual_seed(0)
    wavelength = get_grid("aspcap").wavelength
    ct = ChemTwin()
    ct.net_, ct.wavelength_ = FaderNet(ct.config.net, wavelength.size), wavelength
    return ct.save(folder)


def run(workers: int, n: int, shard_size: int, root: Path, model: Path) -> dict:
    data, latents = root / f"twins-{workers}w", root / f"latents-{workers}w"
    t = time.perf_counter()
    with dask_client(workers=workers) as client:
        client.run(_warm)
        startup = time.perf_counter() - t
        idle = _worker_peaks(client)
        address = client.scheduler.address
        t = time.perf_counter()
        assert chemtwin(["-q", "generate", "-o", str(data), "--n-groups", str(n // 2), "--snr", "100", "--seed", "1",
                         "--shard-size", str(shard_size), "--scheduler", address]) == 0
        generate_s = time.perf_counter() - t
        generate_peaks = _worker_peaks(client)
        client.restart()
        client.run(_warm)
        t = time.perf_counter()
        assert chemtwin(["-q", "embed", str(model), str(data), "--out", str(latents), "--shard-size", str(shard_size),
                         "--scheduler", address]) == 0
        embed_s = time.perf_counter() - t
        embed_peaks = _worker_peaks(client)
    size = sum(p.stat().st_size for p in data.glob("shard-*.h5"))
    shutil.rmtree(data)
    shutil.rmtree(latents)
    return {"workers": workers, "startup_s": round(startup, 2), "idle_worker_rss_mib": idle,
            "generate_s": round(generate_s, 2), "generate_spectra_per_s": round(n / generate_s, 1),
            "generate_worker_peak_rss_mib": generate_peaks, "dataset_gb": round(size / 1e9, 2),
            "embed_s": round(embed_s, 2), "embed_spectra_per_s": round(n / embed_s, 1),
            "embed_worker_peak_rss_mib": embed_peaks}


def projection(one: dict, two: dict, n_measured: int, n_spectra: int, n_workers: int) -> dict:
    """Wall time for n_spectra on n_workers: the per-worker rate of the 1-worker run, scaled by
    the parallel efficiency measured from 1 to 2 workers (assumed to hold: one core per worker,
    a filesystem that keeps up), plus the cluster start-up."""
    out = {"spectra": n_spectra, "workers": n_workers}
    for step in ("generate", "embed"):
        rate1 = one[f"{step}_spectra_per_s"]
        efficiency = two[f"{step}_spectra_per_s"] / (2 * rate1)
        wall = n_spectra / (n_workers * rate1 * efficiency)
        out[step] = {"rate_per_worker": rate1, "efficiency_2_workers": round(efficiency, 3), "wall_s": round(wall, 1)}
    out["startup_s"] = two["startup_s"]
    out["total_s"] = round(out["generate"]["wall_s"] + out["embed"]["wall_s"] + out["startup_s"], 1)
    out["dataset_gb"] = round(n_spectra * two["dataset_gb"] / n_measured, 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 spectra instead of 200,000")
    parser.add_argument("--n", type=int, default=None, help="spectra (overrides --quick)")
    parser.add_argument("--shard-size", type=int, default=1024,
                        help="stars per shard of both steps (default 1024: 10 tasks at --quick, enough to keep 2 workers busy)")
    parser.add_argument("--workdir", default=None, help="folder for the shards (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    n = args.n or (10_000 if args.quick else 200_000)
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_average_start": os.getloadavg()}, "n": n, "runs": []}
    if args.workdir is not None:
        os.makedirs(args.workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dask_scale-", dir=args.workdir) as tmp:
        root = Path(tmp)
        model = _model(root / "model")
        for workers in (1, 2):
            results["runs"].append(run(workers, n, args.shard_size, root, model))
            print(json.dumps(results["runs"][-1]), flush=True)
    one, two = results["runs"]
    results["speedup"] = {step: round(one[f"{step}_s"] / two[f"{step}_s"], 2) for step in ("generate", "embed")}
    results["projection"] = projection(one, two, n, PROJECT_SPECTRA, PROJECT_WORKERS)
    results["machine"]["load_average_end"] = os.getloadavg()
    print(json.dumps({k: results[k] for k in ("speedup", "projection", "machine")}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
