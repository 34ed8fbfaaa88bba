"""Throughput of the embedded synthesizer and peak memory while writing a large dataset.

    python benchmarks/synth_throughput.py --out results/synth_throughput.json [--quick]

Measures (1) spectra/s of LineSynthesizer on the ASPCAP grid in one process for thread counts
(and, at 2 threads, with the drawn line list beside the default calibrated one), (2) wall time
and peak RSS of `generate` writing 200,000 spectra (20,000 with --quick) at SNR 100, end to end
(noise and HDF5 writes included), with each line list one after the other, and reports both with
the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine


def synth_rate(threads: int, seconds: float, linelist: str = "calibrated") -> float:
    from chemtwin.data.generate import synthesize
    from chemtwin.data.population import RedGiantPrior, twin_groups
    from chemtwin.spectral_models.linelist import load_linelist
    from chemtwin.spectral_models.lines import LineSynthesizer

    synth = LineSynthesizer(linelist=load_linelist(linelist))
    labels, _ = twin_groups(1024, 2, RedGiantPrior(), np.random.default_rng(0))
    synthesize(synth, labels[:64], threads)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        synthesize(synth, labels, threads)
        n += len(labels)
    return n / (time.perf_counter() - start)


def generate_run(n_groups: int, linelist: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "big.h5"
        code = (
            "import resource, time, sys\n"
            "from chemtwin.data.generate import generate_dataset\n"
            "t = time.perf_counter()\n"
            f"generate_dataset({str(out)!r}, n_groups={n_groups}, snr=100.0, seed=0, progress=False, "
            f"linelist={linelist!r})\n"
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        wall, rss_kb = result.stdout.split()
        return {"linelist": linelist, "n_spectra": 2 * n_groups, "wall_s": float(wall), "spectra_per_s": 2 * n_groups / float(wall),
                "peak_rss_mb": int(rss_kb) / 1024, "file_size_mb": out.stat().st_size / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="synth_throughput.json")
    parser.add_argument("--quick", action="store_true", help="20,000 spectra and short timing loops")
    args = parser.parse_args()
    seconds = 3.0 if args.quick else 15.0
    results = {"machine": machine(), "synthesizer": {}}
    for threads in (1, 2):
        rate = synth_rate(threads, seconds)
        results["synthesizer"][f"threads_{threads}_spectra_per_s"] = rate
        print(f"synthesizer, {threads} thread(s): {rate:.0f} spectra/s", flush=True)
    rate = synth_rate(2, seconds, "drawn")  # the other shipped line list, side by side
    results["synthesizer"]["drawn_linelist_threads_2_spectra_per_s"] = rate
    print(f"synthesizer, drawn line list, 2 threads: {rate:.0f} spectra/s", flush=True)
    n_groups = 10_000 if args.quick else 100_000
    results["generate"] = generate_run(n_groups, "calibrated")
    results["generate_drawn"] = generate_run(n_groups, "drawn")
    print(json.dumps([results["generate"], results["generate_drawn"]], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
